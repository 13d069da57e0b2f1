"""Supervised pretraining (asla.agents.pretrain, asla pretrain): known structures onto the grid, in random orders,
into the training loop's learner."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

from asla.agents.agent import Agent
from asla.agents.pretrain import (
    DoesNotFit,
    Known,
    PretrainReport,
    build_orders,
    demonstrations,
    pretrain,
    read_structures,
    snap,
)
from asla.agents.qnetwork import NetworkConfig
from asla.builder import BuildState, atoms_from_actions, random_build
from asla.cli import main
from asla.errors import ConfigError, ProblemError
from asla.problem import load_problem
from asla.reward import EnergyEvaluator
from asla.storage import write_structures

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_2X2 = ROOT / "docs" / "reference" / "pd100-oxide-2x2.extxyz"
SMALL = {"network": {"width": 8, "depth": 2, "kernel": 3}, "learning": {"batch_size": 16}}


def _tiny_recipe(**learning) -> dict:
    return {"problem": "tiny-pd2o", "seed": 0, **SMALL, "learning": {**SMALL["learning"], **learning}}


def _random_file(problem_name: str, path: Path, n: int, seed: int) -> Path:
    """n random legal builds of the problem with their single-point energies, as asla random writes them."""
    problem = load_problem(problem_name)
    rng, ev, frames = np.random.default_rng(seed), EnergyEvaluator(problem), []
    while len(frames) < n:
        state = random_build(problem, rng)
        if state.done:
            frames.append(ev.evaluate(state.atoms()).atoms)
    write_structures(path, frames, n_template=len(problem.template), calculator=problem.calculator["name"])
    return path


def _placed_distances(problem, original, snapped) -> np.ndarray:
    """Per placed atom of `original`, the distance to the nearest atom of the same element placed in `snapped`."""
    n_t = len(problem.template)
    out = []
    for a in original[n_t:]:
        same = [b.position for b in snapped[n_t:] if b.symbol == a.symbol]
        out.append(problem.grid.min_image_distances(a.position[None], np.array(same)).min())
    return np.array(out)


def test_a_structure_mapped_to_the_grid_and_back_keeps_its_positions_within_the_tolerance():
    problem = load_problem("pd100-oxide-2x2")
    ref = read_structures(REFERENCE_2X2)[0].atoms  # a relaxed structure: off the grid by up to a few tenths of an A
    actions, moved = snap(problem, ref, tolerance=0.5)
    back = atoms_from_actions(problem, actions)
    d = _placed_distances(problem, ref, back)
    assert len(d) == sum(problem.bag.values()) and d.max() <= 0.5 + 1e-9
    assert 0.0 < moved == pytest.approx(d.max())  # it really moved, and no farther than it says
    assert sorted(back.get_chemical_symbols()[len(problem.template):]) == sorted(
        ref.get_chemical_symbols()[len(problem.template):])
    # a grid build goes to itself: the same actions, no distance
    state = random_build(problem, np.random.default_rng(3))
    again, moved = snap(problem, state.atoms())
    assert sorted(again) == sorted(state.actions) and moved < 1e-9


def test_structures_that_do_not_fit_are_skipped_and_counted_with_their_reason():
    problem = load_problem("pd100-oxide-2x2")
    ref = read_structures(REFERENCE_2X2)[0].atoms
    n_t = len(problem.template)
    o = [i for i in range(n_t, len(ref)) if ref[i].symbol == "O"]
    missing = ref.copy()
    del missing[o[0]]
    lifted = ref.copy()
    lifted.positions[o[0], 2] += 2.0  # 2 A above the top layer
    overlap = ref.copy()
    overlap.positions[o[1]] = overlap.positions[o[0]] + [0.05, 0.0, 0.0]
    clash = ref.copy()  # two O one pixel apart: both on the grid, but closer than c_min allows
    clash.positions[o[1]] = clash.positions[o[0]] + [problem.grid.spacing[0], 0.0, 0.0]
    no_slab = ref.copy()
    del no_slab[0]
    shifted = ref.copy()
    shifted.set_cell(ref.cell.array * [1.1, 1.1, 1.0], scale_atoms=False)
    cases = {"composition": missing, "off-grid": lifted, "overlap": overlap, "rules": clash, "template": no_slab,
             "cell": shifted}
    for reason, atoms in cases.items():
        with pytest.raises(DoesNotFit) as info:
            actions, _ = snap(problem, atoms)
            build_orders(problem, actions, 2, np.random.default_rng(0))
        assert info.value.kind == reason, str(info.value)
    report = PretrainReport()
    known = [Known(f"case-{r}", a, 1.0) for r, a in cases.items()] + [Known("good", ref, 2.4)]
    demos = demonstrations(problem, known, 2, np.random.default_rng(0), energy="stored", report=report)
    assert [d.source for d in demos] == ["good"]
    assert report.skipped == {reason: 1 for reason in cases}
    assert all(report.skipped_examples[r].startswith(f"case-{r}: {r}:") for r in cases)


def test_the_orders_of_one_structure_differ_and_all_end_in_the_same_build():
    problem = load_problem("pd100-oxide-2x2")
    actions, _ = snap(problem, read_structures(REFERENCE_2X2)[0].atoms)
    orders = build_orders(problem, actions, 6, np.random.default_rng(1))
    assert len({tuple(o) for o in orders}) > 1  # random orders, not one order six times
    keys = set()
    for order in orders:
        state = BuildState(problem)
        for a in order:  # each order is legal step by step (place raises otherwise)
            state.place(a)
        assert state.done and sorted(order) == sorted(actions)
        keys.add(state.canonical_key())
    assert len(keys) == 1
    assert build_orders(problem, actions, 6, np.random.default_rng(1)) == orders  # seeded


def test_pretraining_on_good_structures_makes_the_greedy_build_lower_in_energy():
    """The proof that it works: the greedy agent after pretraining on the reference structure and random builds
    builds lower than the same network before it (same seed, same initial weights), on two seeds."""
    recipe = {"problem": "pd100-oxide-2x2", "problem_overrides": {"relax": {"steps": 10}},
              "network": {"width": 16, "depth": 3, "kernel": 5}, "learning": {"batch_size": 32, "target": "max"}}
    problem = load_problem("pd100-oxide-2x2", relax={"steps": 10})
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        data = _random_file("pd100-oxide-2x2", Path(tmp) / "random.extxyz", 12, seed=5)
        for seed in (0, 1):
            out = Path(tmp) / f"agent-{seed}"
            report = pretrain({**recipe, "seed": seed}, [data, REFERENCE_2X2], out, steps=80, orders=4)
            assert report.used == 13 and report.energies["lowest"] == pytest.approx(problem.reference_energy,
                                                                                    abs=0.01)
            torch.manual_seed(seed)  # the network pretraining started from
            before = Agent.for_problem(problem, NetworkConfig(width=16, depth=3, kernel=5, periodic=True))
            after = Agent.load(out)
            e_before = before.build(problem)[0].energy
            e_after = after.build(problem)[0].energy
            assert e_after < e_before - 0.5, (seed, e_before, e_after)
            assert e_after < report.energies["median"]  # better than a typical structure it was shown


def test_asla_pretrain_writes_an_agent_that_asla_train_fine_tunes(tmp_path, capsys):
    from asla.agents.training import train
    data = _random_file("tiny-pd2o", tmp_path / "known.extxyz", 8, seed=0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(_tiny_recipe()))
    out = tmp_path / "pre"
    assert main(["pretrain", str(recipe), "--data", str(data), "--out", str(out), "--steps", "20", "--orders", "3",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "8 structures read" in text and "--init-from" in text
    report = json.loads((out / "pretrain.json").read_text())
    assert report["format"] == "asla-pretrain" and report["steps"] == 20 and report["evaluations"] > 0
    assert report["episodes"] == 3 * report["used"] and report["used"] + report["duplicates"] == 8
    card = json.loads((out / "agent.json").read_text())
    assert card["pretrained"]["steps"] == 20 and card["problem"] == "tiny-pd2o"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out), size_guidance={"scalars": 0})
    acc.Reload()
    assert len(acc.Scalars("losses/pretrain_q")) == 20 and "losses/pretrain_q_mean" in acc.Tags()["scalars"]
    from asla.agents.config import load_config
    summary = train(load_config({**_tiny_recipe(), "episodes": 8, "n_builders": 4}), run_dir=tmp_path / "ft",
                    init_from=str(out), progress=False)
    assert summary["episodes"] == 8
    assert json.loads((tmp_path / "ft" / "agent.json").read_text())["init_from"]["path"] == str(out)


def test_same_seed_same_agent_and_stored_energies_cost_no_evaluation(tmp_path):
    data = _random_file("tiny-pd2o", tmp_path / "known.extxyz", 6, seed=2)
    a = pretrain(_tiny_recipe(), [data], tmp_path / "a", steps=5, orders=2, energy="stored")
    pretrain(_tiny_recipe(), [data], tmp_path / "b", steps=5, orders=2, energy="stored")
    c = pretrain({**_tiny_recipe(), "seed": 1}, [data], tmp_path / "c", steps=5, orders=2, energy="stored")
    assert a.evaluations == 0 and a.loss_last == pytest.approx(pretrain(
        _tiny_recipe(), [data], tmp_path / "a2", steps=5, orders=2, energy="stored").loss_last)
    wa, wb, wc = (Agent.load(tmp_path / n).net.state_dict() for n in ("a", "b", "c"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert c.seed == 1
    stored = [k.energy for k in read_structures(data)]
    assert a.energies["lowest"] == pytest.approx(min(stored))


def test_bad_input_gives_one_line_naming_the_field_and_writes_nothing(tmp_path, capsys):
    good = _random_file("tiny-pd2o", tmp_path / "known.extxyz", 3, seed=0)
    garbage = tmp_path / "garbage.extxyz"
    garbage.write_text("this is not\nan extxyz file\n")
    misfit = tmp_path / "misfit.extxyz"  # the 2x2 oxide's reference is not a tiny-pd2o structure
    misfit.write_text(REFERENCE_2X2.read_text())
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(_tiny_recipe()))
    cases = [(["--data", str(garbage)], "--data"), (["--data", str(tmp_path / "none.db")], "--data"),
             (["--data", str(misfit)], "--data"), (["--data", str(good), "--steps", "0"], "--steps"),
             (["--data", str(good), "--energy", "dft"], "--energy")]
    for extra, field in cases:
        out = tmp_path / "out"
        assert main(["pretrain", str(recipe), "--out", str(out), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"asla: error: {field}"), err
        assert not out.exists()
    assert main(["pretrain", "no-such-problem-recipe", "--data", str(good), "--out", str(tmp_path / "o")]) == 2
    assert "config" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ProblemError, match="unknown problem"):
        pretrain({"problem": "no-such-problem"}, [good], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # a misfit names its reason
    with pytest.raises(ConfigError, match="1 template .*no Pd of the structure within 0.5 A"):
        pretrain(_tiny_recipe(), [misfit], tmp_path / "o")


def test_an_evaluations_database_of_a_run_is_read_with_its_energies(tmp_path):
    problem = load_problem("tiny-pd2o")
    rng, frames = np.random.default_rng(0), []
    for n in range(3):
        a = random_build(problem, rng).atoms()
        a.calc = SinglePointCalculator(a, energy=10.0 + n)
        frames.append(a)
    write_structures(tmp_path / "evaluations.db", frames, n_template=len(problem.template), calculator="emt")
    known = read_structures(tmp_path / "evaluations.db")
    assert [k.energy for k in known] == [10.0, 11.0, 12.0]
    assert all(len(snap(problem, k.atoms)[0]) == 3 for k in known)


def test_random_builds_join_as_contrast_and_their_evaluations_are_counted(tmp_path):
    data = _random_file("tiny-pd2o", tmp_path / "known.extxyz", 2, seed=4)
    r = pretrain(_tiny_recipe(), [data], tmp_path / "a", steps=3, orders=2, energy="stored", random=5)
    assert r.random >= 1 and r.random + r.duplicates - (2 - r.used) == 5  # every random build used or a repeat
    # stored energies cost nothing; each random build costs one single point (a repeat is a cache hit)
    assert 1 <= r.evaluations <= 5 and r.episodes == 2 * (r.used + r.random)
    assert json.loads((tmp_path / "a" / "agent.json").read_text())["pretrained"]["random"] == r.random
    with pytest.raises(ConfigError, match="--random"):
        pretrain(_tiny_recipe(), [data], tmp_path / "b", random=-1)


def test_the_measurement_script_pretrains_from_files_and_compares_greedy_builds(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_from_method.py"), "--problem",
                           "pd100-oxide-2x2", "--data", str(REFERENCE_2X2), "--random", "3", "--steps", "3",
                           "--orders", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    greedy = json.loads((out / "greedy.json").read_text())
    assert greedy["pretrain"]["used"] == 1 and greedy["pretrain"]["random"] == 3
    assert np.isfinite(greedy["untrained"]) and np.isfinite(greedy["pretrained"])
    assert "--transfer-from" in done.stdout and (out / "agent" / "agent.safetensors").exists()
