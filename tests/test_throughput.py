"""scripts/throughput.py --quick end to end, so the benchmark does not rot: it must produce a JSON whose
numbers are positive and add up (shares of the loop, rates against seconds, rows for every cell and
relaxation setting) and a Markdown report. Timings are not asserted (the machine is shared)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("forward", "environment", "learn", "calculator", "bookkeeping")


def test_quick_throughput_run_is_consistent(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "throughput.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "throughput.json").read_text())
    rows = data["configs"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    assert {(r["cell"], r["relax_steps"]) for r in rows} == {(c, s) for c in (3, 5, 8) for s in (10, 0)}

    for r in rows:
        t = r["train"]
        assert r["grid"][0] * r["grid"][1] == r["pixels"]
        assert r["actions"] == 2 * r["layers"] * r["pixels"]  # Pd and O on every layer and pixel
        assert r["atoms_placed"] == r["cell"] ** 2 + (2 * r["cell"] ** 2) // 3
        shares = [t["share"][p] for p in PARTS]
        assert all(s >= 0 for s in shares) and 0.999 < sum(shares) <= 1.0 + 1e-9, t["share"]
        assert math.isclose(sum(t["seconds"][p] for p in PARTS), t["loop_seconds"], rel_tol=1e-9)
        assert t["loop_seconds"] <= t["wall_seconds"] + 1e-6
        assert math.isclose(t["episodes_per_s"], t["episodes"] / t["loop_seconds"], rel_tol=1e-9)
        assert t["episodes"] >= 1 and t["grad_steps"] == t["episodes"]  # warm-up off: one step per episode
        assert t["seconds"]["learn"] > 0 and t["seconds"]["forward"] > 0 and t["seconds"]["calculator"] > 0

        g = r["greedy"]
        assert g["episodes_per_s"] > g["episodes_per_s_with_energy"] > 0
        assert 0 < g["forward_seconds"] <= g["build_seconds"]

        f = r["floor"]
        assert f["structures"] == t["structures_evaluated"] >= 1
        assert f["seconds_per_structure"] > 0
        assert f["calls_per_structure"] == (11 if r["relax_steps"] == 10 else 1)  # 10 BFGS steps + the start
        assert r["ratio_to_floor"]["train"] > 0
        if r["relax_steps"]:  # the problem's optimizer is one of the three, timed on the same structures
            opts = f["by_optimizer"]
            assert set(opts) == {"BFGS", "LBFGS", "FIRE"} and all(v["seconds_per_structure"] > 0 for v in opts.values())
            assert opts[f["optimizer"]]["max_abs_energy_difference"] == 0.0
        else:
            assert f["by_optimizer"] == {}
        assert r["peak_rss_mb"]["end"] >= r["peak_rss_mb"]["after_training"] >= r["peak_rss_mb"]["after_setup"] > 50

    # relaxation makes the calculator dearer on the same cell (10 steps vs a single point)
    for cell in (3, 5, 8):
        relaxed, single = (next(r for r in rows if r["cell"] == cell and r["relax_steps"] == s) for s in (10, 0))
        assert relaxed["floor"]["seconds_per_structure"] > single["floor"]["seconds_per_structure"]

    settings = data["settings"]["grids"][0]
    assert all(v["median_seconds"] > 0 for v in settings["learn"].values())
    assert all(v["median_ms_per_sample"] > 0 for v in settings["forward"].values())
    assert {"threads=1 inference_mode contiguous batch=8", "threads=1 no_grad channels_last batch=8",
            "threads=1 inference_mode contiguous batch=1"} <= set(settings["forward"])
    assert data["summary"]["by_relax"].keys() == {"10", "0"}
    overhead = data["summary"]["relaxation"]
    assert {r["cell"] for r in overhead} == {3, 5, 8} and all(0 <= r["optimizer_share"] < 1 for r in overhead)

    md = (tmp_path / "throughput.md").read_text()
    assert "scripts/throughput.py --quick" in md and "## What dominates and what to do" in md
    for r in rows:  # one line per training run in the main table
        assert md.count(f"| {r['cell']}x{r['cell']} | {r['spacing']:g} | {r['grid'][0]}x{r['grid'][1]} |") == 2
