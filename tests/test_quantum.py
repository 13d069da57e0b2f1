"""Quantum rewards (tblite, GPAW), time limits, retries, relaxation before the reward, cache persistence."""
from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes

from asla import load_problem
from asla.builder import random_build
from asla.calculators import make_calculator
from asla.reward import EnergyEvaluator

TINY = "tiny-pd2o"


def test_tblite_real_evaluation_of_benzene():
    pytest.importorskip("tblite")
    m = molecule("C6H6")
    m.center(vacuum=4.0)
    m.calc = make_calculator({"name": "tblite", "method": "GFN1-xTB"})
    e = m.get_potential_energy()
    assert -440 < e < -425  # GFN1-xTB total energy of benzene, about -432.5 eV
    p = load_problem("benzene-xtb")
    assert p.grid.periodic is False and p.symmetry.size == 8  # square box: D4 about the centre, no translations
    ev = EnergyEvaluator(p).evaluate(random_build(p, np.random.default_rng(0)).atoms())
    assert ev.ok and math.isfinite(ev.energy) or not ev.ok and ev.error


def test_gpaw_real_evaluation_of_h2():
    pytest.importorskip("gpaw")
    h2 = molecule("H2")
    h2.center(vacuum=2.5)
    h2.calc = make_calculator({"name": "gpaw", "h": 0.25, "mixer": {"beta": 0.1, "nmaxold": 3, "weight": 50.0}})
    e = h2.get_potential_energy()
    assert -7.5 < e < -5.5  # PBE LCAO dzp, about -6.3 eV against GPAW's atomic references


class Flaky(Calculator):
    """Fails (or hangs) unless `mode` is 'ok': stands in for SCF trouble fixed by more robust settings."""

    implemented_properties = ["energy"]

    def __init__(self, mode: str = "fail", **kw):
        super().__init__(**kw)
        self.mode = mode

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        if self.mode == "fail":
            raise RuntimeError("KohnShamConvergenceError: did not converge")
        if self.mode == "hang":
            import time
            time.sleep(5)
        self.results = {"energy": -float(len(self.atoms))}


def _problem(**extra):
    return load_problem(TINY, calculator={"name": "tests.test_quantum:Flaky", "mode": "fail"}, **extra)


def test_retry_with_robust_settings_recovers():
    p = _problem(faults={"on_error": "worst", "retries": 1, "retry_settings": {"mode": "ok"}})
    res = EnergyEvaluator(p).evaluate(random_build(p, np.random.default_rng(0)).atoms())
    assert res.ok and res.energy == -11.0 and res.n_calls == 2


def test_time_limit_turns_a_hanging_calculation_into_a_flagged_failure(tmp_path):
    p = load_problem(TINY, calculator={"name": "tests.test_quantum:Flaky", "mode": "hang"},
                     faults={"on_error": "worst", "timeout": 0.3})
    ev = EnergyEvaluator(p, failure_dir=tmp_path)
    import time
    t0 = time.perf_counter()
    res = ev.evaluate(random_build(p, np.random.default_rng(0)).atoms())
    assert time.perf_counter() - t0 < 3
    assert not res.ok and "time limit" in res.error
    assert (tmp_path / "failed-00000.extxyz").exists()


def test_forced_failure_during_training_leaves_a_complete_resumable_run(tmp_path):
    from asla.agents.config import load_config
    from asla.agents.training import train
    problem = {"name": "tiny-broken", **load_problem(TINY).to_dict(),
               "calculator": {"name": "tests.test_quantum:Flaky", "mode": "fail"}}
    problem.pop("reference", None)
    cfg = load_config({"problem": problem, "episodes": 12, "network": {"width": 8, "depth": 2, "kernel": 3},
                       "checkpoint_every": 8, "learning": {"batch_size": 8, "warmup_episodes": 4}})
    summary = train(cfg, run_dir=tmp_path / "run", progress=False)
    assert summary["episodes"] == 12 and summary["failures"] >= 1 and summary["best_energy"] is None
    assert summary["failure_summary"]
    assert list((tmp_path / "run" / "failures").glob("failed-*.extxyz"))
    resumed = train(None, run_dir=tmp_path / "run", resume=True, progress=False,
                    overrides=["episodes=16"])
    assert resumed["episodes"] == 16


def test_relaxation_before_reward_counts_steps_and_keeps_template_fixed():
    p = load_problem("pd100-oxide-2x2", relax={"steps": 5, "fmax": 0.01})
    atoms = random_build(p, np.random.default_rng(1)).atoms()
    res = EnergyEvaluator(p).evaluate(atoms)
    assert res.ok and 2 <= res.n_calls <= 6
    n_t = len(p.template)
    assert np.allclose(res.atoms.positions[:n_t], atoms.positions[:n_t])
    assert not np.allclose(res.atoms.positions[n_t:], atoms.positions[n_t:])
    single = EnergyEvaluator(load_problem("pd100-oxide-2x2")).evaluate(atoms).energy
    assert res.energy < single
    zs = p.grid.layer_z
    assert np.all(res.atoms.positions[n_t:, 2] >= min(zs) - 1.0 - 1e-9)
    assert np.all(res.atoms.positions[n_t:, 2] <= max(zs) + 1.0 + 1e-9)


def test_cache_survives_save_and_load(tmp_path):
    import json
    p = load_problem(TINY)
    state = random_build(p, np.random.default_rng(0))
    ev = EnergyEvaluator(p)
    e = ev.evaluate(state.atoms(), key=state.canonical_key()).energy
    ev.save_cache(tmp_path / "cache.json")
    fresh = EnergyEvaluator(p)
    fresh.load_state_dict(json.loads((tmp_path / "cache.json").read_text()))
    again = fresh.evaluate(state.atoms(), key=state.canonical_key())
    assert again.cached and again.energy == e and fresh.n_calls == ev.n_calls == 1
