"""Typed recipes and problems: every bad value one line naming the field, the README's tables match the schema."""
from __future__ import annotations

import ast
import re
import time
from pathlib import Path

import pytest
import yaml

from asla import ConfigError, ProblemError, load_problem, schema
from asla.agents.config import DEFAULTS, Recipe, load_config, markdown_table
from asla.builder import check_fits
from asla.cli import main
from asla.problem import MAX_GRID_POINTS, ProblemSpec

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TINY = ROOT / "configs" / "tiny-pd2o.yaml"


# ---- recipes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, field, words", [
    ("learning.lr=fast", "learning.lr", "must be a positive number"),
    ("learning.lr=-1", "learning.lr", "must be a positive number"),
    ("learning.batch_size=0", "learning.batch_size", "must be an integer >= 1"),
    ("network.kernel=4", "network.kernel", "odd integer"),
    ("network.depth=-1", "network.depth", "must be an integer >= 1"),
    ("learning.n_best=-1", "learning.n_best", "must be an integer >= 0"),
    ("epsilon.start=nan", "epsilon.start", "must be a number >= 0 and <= 1"),
    ("epsilon.end=1.5", "epsilon.end", "<= 1"),
    ("learning.replay_capacity=0", "learning.replay_capacity", ">= 1"),
    ("workers=0", "workers", ">= 1"),
    ("seed=-1", "seed", ">= 0"),
    ("seed=1.5", "seed", "an integer"),
    ("learning.grad_steps_per_episode=1e9", "learning.grad_steps_per_episode", "<= 64"),
    ("episodes=0", "episodes", ">= 1"),
    ("record_evaluations=yes please", "record_evaluations", "true or false"),
    ("learning.loss=l1", "learning.loss", "allowed: huber, mse"),
    ("executor=mpi", "executor", "allowed: serial, process, ray"),
    ("device=tpu", "device", "allowed: cpu, cuda"),
    ("max_evaluations=0", "max_evaluations", ">= 1"),
    ("learning.lr_typo=1", "learning.lr_typo", "unknown key; allowed: batch_size"),
    ("network=3", "network", "is a section"),
    ("database=/etc/passwd/evaluations.db", "database", "is a file, not a folder"),
    ("run_dir=/etc/passwd/run", "run_dir", "is a file, not a folder"),
    ("seed_from_db=/no/such/demos.db", "seed_from_db", "does not exist"),
])
def test_bad_recipe_value_is_one_line_naming_the_field(override, field, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    msg = str(err.value)
    assert msg.startswith(field + ":"), msg
    assert words in msg and "\n" not in msg
    assert err.value.field == field


def test_bad_values_in_a_recipe_file_are_refused_too(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("problem: tiny-pd2o\nlearning: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"^learning.lr: must be a positive number, got 'fast'$"):
        load_config(recipe)
    recipe.write_text("problem: tiny-pd2o\nlearning: {n_best: -1}\n")
    with pytest.raises(ConfigError, match=r"^learning.n_best: "):
        load_config(recipe)


def test_device_cuda_without_cuda_is_refused():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"^device: 'cuda' is not available on this machine \(0 CUDA"):
        load_config(TINY, ["device=cuda"])
    assert load_config(TINY, ["device=cpu"])["device"] == "cpu"


def test_recipe_syntax_error_encoding_and_huge_number_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("problem: tiny-pd2o\nlearning: {lr: 1e-3\nseed: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert msg.startswith(f"config: {bad} is not valid YAML (line ") and "\n" not in msg
    bad.write_bytes(b"problem: tiny-pd2o\nseed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(bad)
    bad.write_text("problem: tiny-pd2o\nseed: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="^config: ") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    bad.write_text("problem: tiny-pd2o\nseed: " + "9" * 4000 + "\n")  # below Python's digit limit: the range refuses
    with pytest.raises(ConfigError, match=r"^seed: must be an integer >= 0"):
        load_config(bad)


def test_load_config_keeps_the_plain_dict_and_values_as_written():
    cfg = load_config(TINY)
    assert list(cfg) == [*DEFAULTS, "name"] and cfg["name"] == "tiny-pd2o"
    raw = yaml.safe_load(TINY.read_text())
    assert cfg["learning"]["lr"] == raw["learning"]["lr"] == 3.0e-3
    assert cfg["learning"]["grad_steps_per_episode"] == 2 and type(cfg["learning"]["grad_steps_per_episode"]) is int
    assert cfg["network"] == {**DEFAULTS["network"], **raw["network"]}
    assert cfg["problem_overrides"] == {}
    recipe = Recipe.from_dict({k: v for k, v in cfg.items() if k != "name"})
    assert recipe.learning.lr == 3.0e-3 and recipe.network.kernel == 5
    assert recipe.to_dict() == {k: v for k, v in cfg.items() if k != "name"}
    # YAML 1.1 reads 1e-3 (no dot) as a string: a number field takes it as the number
    assert load_config(TINY, ["learning.lr=1e-4"])["learning"]["lr"] == 1e-4
    assert load_config({"problem": "tiny-pd2o", "learning": {"lr": "1e-4"}})["learning"]["lr"] == 1e-4


def test_a_run_config_yaml_loads_again_for_resume():
    cfg = load_config(TINY, ["episodes=20"])
    cfg.update(run_dir="runs/x", command="asla train configs/tiny-pd2o.yaml", init_from=None)
    again = load_config(yaml.safe_load(yaml.safe_dump(cfg, sort_keys=False)))
    assert again == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_recipe_passes_the_schema(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg["name"] == name and cfg["problem"]


# ---- problems -----------------------------------------------------------------------------------

BASE = {"template": {"surface": "fcc100", "symbol": "Pd", "size": [2, 2, 2], "a": 3.8787, "vacuum": 6.0},
        "bag": {"Pd": 2, "O": 1}, "region": {"above_template": [1.2]}, "grid": {"spacing": 0.686, "divisions": [2, 2]},
        "rules": {"c_min": 0.7, "c_max": 1.4}, "calculator": {"name": "emt"}}


@pytest.mark.parametrize("change, field, words", [
    ({"relax": {"steps": "abc"}}, "relax.steps", "must be an integer >= 0"),
    ({"relax": {"steps": -5}}, "relax.steps", "must be an integer >= 0"),
    ({"relax": {"steps": 3.5}}, "relax.steps", "integer"),
    ({"relax": {"fmax": 0}}, "relax.fmax", "positive number"),
    ({"faults": {"retries": -1}}, "faults.retries", "must be an integer >= 0"),
    ({"faults": {"timeout": "soon"}}, "faults.timeout", "positive number"),
    ({"faults": {"on_error": "ignore"}}, "faults.on_error", "allowed: worst, raise"),
    ({"pbc": "yes"}, "pbc", "must be true, false or three of them"),
    ({"pbc": [1, 1, 0]}, "pbc", "three of them"),
    ({"region": {"above_template": [1.2], "layers": -1}}, "region.layers", "integer >= 1"),
    ({"region": {"above_template": [1.2], "layers": 2}}, "region.layers", "1 height(s)"),
    ({"region": {"above_template": [[1.2]]}}, "region.above_template", "positive number"),
    ({"sequence": [["Pd"], "Pd", "O"]}, "sequence[0]", "must be an element symbol"),
    ({"bag": {"Pd": [2]}}, "bag.Pd", "count must be an integer"),
    ({"bag": {"Pd": 10**6}}, "bag.Pd", "from 1 to 10000"),
    ({"template": {**BASE["template"], "symbol": ["Pd"]}}, "template.symbol", "unknown element"),
    ({"template": {**BASE["template"], "size": [2, -2, 2]}}, "template.size", "3 integers from 1"),
    ({"template": {**BASE["template"], "size": [1000, 1000, 3]}}, "template.size", "at most 20000"),
    ({"template": {"atoms": [[["Pd"], 0, 0, 0]]}, "cell": {"a": 5, "c": 10}}, "template.atoms[0]", "unknown element"),
    ({"template": {"atoms": [7]}, "cell": {"a": 5, "c": 10}}, "template.atoms[0]", "must be [symbol, x, y, z]"),
    ({"template": None, "cell": {"a": int("9" * 4000), "c": 10}}, "cell.a", "positive number"),
    ({"template": None, "cell": {"c": 10}}, "cell.a", "is required"),
    ({"grid": {"spacing": 0.686, "divisions": [2, 2], "pitch": 1}}, "grid.pitch", "unknown key; allowed: divisions"),
    ({"grid": {"shape": [8, "8"]}}, "grid.shape", "2 integers"),
    ({"observation": {"smear": 100}}, "observation.smear", "<= 5"),
    ({"template": {**BASE["template"], "size": [40, 40, 3]}, "grid": {"spacing": 0.5, "divisions": [40, 40]}},
     "grid", "x 4800 template atoms = 192,000,000 distances"),
    ({"reference": {"energy": "low"}}, "reference.energy", "must be a finite number"),
    ({"description": ["a", "list"]}, "description", "must be a string"),
])
def test_bad_problem_value_is_one_line_naming_the_field(change, field, words):
    with pytest.raises(ProblemError) as err:
        load_problem({**BASE, **change})
    msg = str(err.value)
    assert msg.startswith(field + ":"), msg
    assert words in msg and "\n" not in msg


@pytest.mark.parametrize("spacing", [0.01, 0.001])
def test_a_grid_too_fine_is_refused_up_front_with_its_size(spacing):
    t0 = time.perf_counter()
    with pytest.raises(ProblemError) as err:
        load_problem({**BASE, "grid": {"spacing": spacing, "divisions": [2, 2]}})
    assert time.perf_counter() - t0 < 2.0
    msg = str(err.value)
    assert msg.startswith("grid.spacing: gives a ") and f"above the limit of {MAX_GRID_POINTS:,}" in msg
    n = int(re.search(r"= ([\d,]+) points", msg).group(1).replace(",", ""))
    assert n > MAX_GRID_POINTS


def test_problem_files_bad_encoding_huge_number_deep_nesting_and_alias_bomb(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(yaml.safe_dump(BASE).encode() + b"description: caf\xe9\n")
    with pytest.raises(ProblemError, match=r"^problem: .* is not UTF-8 text"):
        load_problem(path)
    path.write_text(yaml.safe_dump(BASE) + "description: x\nrelax: {steps: " + "7" * 5000 + "}\n")
    with pytest.raises(ProblemError, match="^problem: ") as err:
        load_problem(path)
    assert "\n" not in str(err.value)
    path.write_text(yaml.safe_dump(BASE) + "reference: {note: " + "[" * 200 + "]" * 200 + "}\n")
    with pytest.raises(ProblemError, match="nested deeper than"):
        load_problem(path)
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"{c}: &{c} [{', '.join(['*' + p] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)]
    path.write_text(yaml.safe_dump(BASE) + "reference:\n  note:\n" + "".join(f"    {b}\n" for b in bomb))
    t0 = time.perf_counter()
    with pytest.raises(ProblemError, match=r"^problem: holds more than \d+ values"):
        load_problem(path)
    assert time.perf_counter() - t0 < 5.0


def test_every_shipped_problem_passes_the_schema_and_keeps_its_attributes():
    p = load_problem("benzene-xtb")
    assert p.pbc == (False, False, False) and p.faults.retries == 1 and p.faults.timeout == 60.0
    assert p.relax.steps == 0 and p.relax.optimizer == "LBFGS" and p.rules.c_min == 0.75
    assert p.reference_energy == pytest.approx(-432.515745) and p.observation == {}
    tiny = load_problem("tiny-pd2o", **{"relax.steps": 3, "pbc": True})
    assert tiny.relax.steps == 3 and tiny.pbc == (True, True, True)


# ---- the builder/problem cycle and the fit check ---------------------------------------------

def test_problem_module_does_not_import_the_builder():
    tree = ast.parse((ROOT / "asla" / "problem.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and "builder" in m for m in imported), imported


def test_load_problem_does_no_random_builds_and_check_fits_does(monkeypatch):
    import asla.builder
    calls = []
    real = asla.builder.random_build
    monkeypatch.setattr(asla.builder, "random_build", lambda *a: calls.append(1) or real(*a))
    eight = {"template.size": [8, 8, 3], "grid.spacing": 0.457, "grid.divisions": [8, 8],
             "bag": {"Pd": 64, "O": 42}, "reference": {}}
    p = load_problem("pd100-oxide-3x3", **eight)
    assert calls == [] and p.grid.shape == (48, 48)
    check_fits(load_problem("tiny-pd2o"))
    assert len(calls) >= 1
    # a bag that passes the area check but has no legal first move: only check_fits finds out
    far = load_problem({**BASE, "region": {"above_template": [4.5]}})
    with pytest.raises(ProblemError, match=r"^bag: .* no legal completion in 50 random builds"):
        check_fits(far)


def test_cli_check_refuses_a_bag_with_no_legal_completion(tmp_path, capsys):
    path = tmp_path / "far.yaml"
    path.write_text(yaml.safe_dump({**BASE, "region": {"above_template": [4.5]}}))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asla: error: bag: ") and "\n" not in err


# ---- the command line: exit status 2, one line, nothing written ----------------------------------

@pytest.mark.parametrize("override, field", [
    ("learning.lr=-1", "learning.lr"), ("network.kernel=4", "network.kernel"), ("workers=0", "workers"),
    ("problem_overrides.relax.steps=abc", "relax.steps"), ("problem_overrides.grid.spacing=0.001", "grid.spacing"),
])
def test_cli_train_with_a_bad_value_exits_2_and_writes_nothing(tmp_path, capsys, override, field):
    run_dir = tmp_path / "run"
    assert main(["train", str(TINY), "--set", override, "--run-dir", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"asla: error: {field}:") and err.count("\n") == 1, err
    assert not run_dir.exists()


def test_cli_check_with_a_bad_value_exits_2(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**BASE, "relax": {"steps": "abc"}}))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("asla: error: relax.steps: must be an integer") and err.count("\n") == 1


# ---- the README's option tables against the schema ------------------------------------------------

def _section(heading: str) -> str:
    start = README.index(heading) + len(heading)
    return README[start:README.index("\n## ", start)]


def test_readme_recipe_table_is_the_schema():
    body = _section("## Learning options (recipe keys)\n")
    table = "\n".join(line for line in body.strip().splitlines() if line.startswith("|"))
    assert table == markdown_table(), "regenerate it: python -m asla.agents.config"
    keys = [k for k, _, _ in schema.rows(Recipe)]
    assert "learning.lr" in keys and all(f"| `{k}` |" in table for k in keys)


def test_readme_problem_example_is_a_valid_problem_naming_every_field():
    block = re.search(r"A problem is a YAML file.*?```yaml\n(.*?)```", README, re.S).group(1)
    data = yaml.safe_load(block.replace("energy: ..., method: ...", "energy: 1.0, method: example"))
    problem = load_problem(data)
    assert problem.bag == {"Pd": 9, "O": 6} and problem.grid.n_layers == 3
    for field in (f.name for f in __import__("dataclasses").fields(ProblemSpec)):
        assert re.search(rf"\b{field}\b", block), f"problem field {field} is not in the README's example"


@pytest.mark.parametrize(("calculator", "field"), [
    ({"name": "emt", "cutoff": 6.0}, "calculator.cutoff"),
    ({"name": "lj", "epsilon": 1.0, "sigam": 2.0}, "calculator.sigam"),
    ({"name": "tblite", "methd": "GFN2-xTB"}, "calculator.methd"),
])
def test_an_unknown_calculator_keyword_is_refused_not_ignored(calculator, field):
    with pytest.raises(ProblemError) as err:
        load_problem("tiny-pd2o", calculator=calculator)
    message = str(err.value)
    assert message.startswith(field) and "allowed:" in message and "\n" not in message


def test_known_calculator_keywords_pass():
    assert load_problem("tiny-pd2o", calculator={"name": "lj", "epsilon": 2.0, "sigma": 2.5}).calculator["sigma"] == 2.5
    assert load_problem("tiny-pd2o", calculator={"name": "emt", "asap_cutoff": True}).calculator["asap_cutoff"]
