"""Installing asla adds one top-level package, and everything ships inside it (issue: one import namespace)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheel(tmp_path: Path) -> Path:
    """Build a wheel from a copy of the sources, so that no build/ folder lands in the checkout."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("asla", "agents", "envs", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src),
                    "-w", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("asla-*.whl"))


def test_non_editable_install_has_one_namespace(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"asla", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = """
import importlib, sys
for name in ("agents", "envs", "configs"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        sys.exit(f"top-level {name} importable")
import gymnasium
import asla, asla.agents, asla.envs
site = sys.argv[1]
assert asla.__file__.startswith(site) and asla.agents.__file__.startswith(site), (asla.__file__, site)
env = gymnasium.make("asla/tiny-pd2o-v0")
obs, info = env.reset(seed=0)
assert obs.shape[0] > 0 and info["action_mask"].any()
assert "pd100-oxide-3x3" in asla.list_problems()
assert "pd100-oxide-3x3" in asla.agents.list_pretrained()
from asla.agents.config import load_config
assert load_config("tiny-pd2o")["problem"] == "tiny-pd2o"
print("ok")
"""
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    run = subprocess.run([str(python), "-c", probe, site], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
