"""The surrogate layer: AGOX models fitted on real (EMT) evaluations, and relaxation of builds in them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator

pytest.importorskip("agox")

from asla.builder import random_build  # after the skip
from asla.calculators import make_calculator
from asla.errors import ConfigError
from asla.problem import load_problem
from asla.surrogate import (
    CalculatorSurrogate,
    GPRSurrogate,
    Prediction,
    SparseGPRSurrogate,
    SurrogateConfig,
    make_surrogate,
    rank_by_acquisition,
    surrogate_relax,
)


def _evaluations(problem, n: int, seed: int) -> list:
    """n random legal builds with their real EMT energies and forces."""
    rng = np.random.default_rng(seed)
    calc = make_calculator(problem.calculator)
    out = []
    while len(out) < n:
        state = random_build(problem, rng)
        if not state.done:
            continue
        atoms = state.atoms()
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def oxide():
    return load_problem("pd100-oxide-2x2")


@pytest.fixture(scope="module")
def data(oxide):
    return _evaluations(oxide, 60, seed=0)


@pytest.fixture(scope="module")
def gpr(oxide, data):
    model = GPRSurrogate(oxide)
    model.update(data[:40])
    return model


def _mae(pred, true) -> float:
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(true))))


def test_gpr_predicts_held_out_energies_better_than_its_prior(oxide, data, gpr):
    from agox.models.GPR.priors.repulsive import Repulsive
    train, test = data[:40], data[40:]
    true = [a.get_potential_energy() for a in test]
    prior = Repulsive()
    # the prior alone, with the GP's constant mean (the training residuals' average): what the GP adds to
    offset = np.mean([a.get_potential_energy() - prior.predict_energy(a) for a in train])
    prior_mae = _mae([prior.predict_energy(a) + offset for a in test], true)
    gpr_mae = _mae([gpr.predict(a).energy for a in test], true)
    assert gpr.n_points == 40 and gpr.is_ready(20) and not gpr.is_ready(41)
    assert gpr_mae < 0.6 * prior_mae, (gpr_mae, prior_mae)
    assert all(gpr.predict(a).sigma > 0 for a in test[:3])


def test_gpr_on_tiny_problem_beats_prior():
    from agox.models.GPR.priors.repulsive import Repulsive
    tiny = load_problem("tiny-pd2o")
    data = _evaluations(tiny, 45, seed=1)
    model = GPRSurrogate(tiny)
    model.update(data[:30])
    prior = Repulsive()
    offset = np.mean([a.get_potential_energy() - prior.predict_energy(a) for a in data[:30]])
    true = [a.get_potential_energy() for a in data[30:]]
    assert _mae([model.predict(a).energy for a in data[30:]], true) < _mae(
        [prior.predict_energy(a) + offset for a in data[30:]], true)


def test_relaxation_keeps_template_fixed_and_atoms_in_region_and_lowers_model_energy(oxide, data, gpr):
    build = data[45]
    n_t = len(oxide.template)
    res = surrogate_relax(oxide, build, gpr, steps=30, fmax=0.05, fallback="last_good")
    assert res.relaxed and res.steps > 0
    assert np.array_equal(res.atoms.positions[:n_t], build.positions[:n_t])
    assert not np.allclose(res.atoms.positions[n_t:], build.positions[n_t:])
    z = res.atoms.positions[n_t:, 2]
    zs = oxide.grid.layer_z
    assert np.all(z >= min(zs) - 1.0 - 1e-9) and np.all(z <= max(zs) + 1.0 + 1e-9)
    assert res.energy < res.energy_start - 0.5
    assert res.energy == pytest.approx(gpr.predict(res.atoms).energy)
    assert res.atoms.calc is None and len(res.atoms.constraints) == 0  # ready for the real single point
    assert res.seconds > 0


class _Collapse(Calculator):
    """A diverging model: pulls every placed atom towards one point, with no repulsion."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, n_template: int) -> None:
        super().__init__()
        self.n_template = n_template

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        r = self.atoms.positions[self.n_template:]
        d = r - r.mean(axis=0)
        forces = np.zeros((len(self.atoms), 3))
        forces[self.n_template:] = -20.0 * d
        self.results = {"energy": float(10.0 * (d ** 2).sum()), "forces": forces}


class _NaN(Calculator):
    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        self.results = {"energy": math.nan, "forces": np.full((len(self.atoms), 3), math.nan)}


def test_diverging_model_falls_back_to_the_build(oxide, data):
    build = data[50]
    model = CalculatorSurrogate(_Collapse(len(oxide.template)))
    res = surrogate_relax(oxide, build, model, steps=200, fmax=0.01)
    assert res.diverged and not res.relaxed
    assert "closer than" in res.reason
    assert np.array_equal(res.atoms.positions, build.positions)
    kept = surrogate_relax(oxide, build, model, steps=200, fmax=0.01, fallback="last_good")
    assert kept.diverged and kept.relaxed and kept.steps > 0
    assert not np.array_equal(kept.atoms.positions, build.positions)
    nan = surrogate_relax(oxide, build, CalculatorSurrogate(_NaN()), steps=10, fmax=0.05)
    assert nan.diverged and not nan.relaxed and np.array_equal(nan.atoms.positions, build.positions)


def test_energy_floor_stops_a_model_hole(oxide, data):
    model = CalculatorSurrogate(make_calculator({"name": "emt"}))
    model.update(data[:5])  # its own lowest energy on these sets the floor
    assert model.lowest_energy == pytest.approx(min(a.get_potential_energy() for a in data[:5]))
    res = surrogate_relax(oxide, data[50], model, steps=100, fmax=0.05, floor_per_atom=0.01)
    assert res.diverged and "floor" in res.reason and not res.relaxed


def test_too_few_points_means_no_relaxation(oxide, data):
    model = GPRSurrogate(oxide)
    model.update(data[:5])
    res = surrogate_relax(oxide, data[50], model, steps=50, fmax=0.05, min_points=20)
    assert not res.relaxed and not res.diverged and res.steps == 0
    assert "min_points=20" in res.reason
    assert np.array_equal(res.atoms.positions, data[50].positions)


def test_physics_prior_gp_learns_only_the_difference(oxide, data, gpr):
    """With the real calculator (EMT) as its prior, the GP has (almost) nothing left to learn."""
    delta = make_surrogate(SurrogateConfig(model="delta-gpr", calculator={"name": "emt"}), oxide)
    delta.update(data[:20])
    true = [a.get_potential_energy() for a in data[40:]]
    assert _mae([delta.predict(a).energy for a in data[40:]], true) < 0.05
    assert _mae([gpr.predict(a).energy for a in data[40:]], true) > 0.2


def test_sparse_gpr_trains_on_forces(oxide, data):
    model = SparseGPRSurrogate(oxide, descriptor="fingerprint", forces=True)
    assert model.trains_on_forces and model.name == "sgpr-fingerprint-forces"
    model.update(data[:20])
    f_true = np.concatenate([a.get_forces()[len(oxide.template):].ravel() for a in data[40:50]])
    f_pred = np.concatenate([model.model.predict_forces(a)[len(oxide.template):].ravel() for a in data[40:50]])
    assert np.corrcoef(f_true, f_pred)[0, 1] > 0.3
    no_forces = data[0].copy()
    no_forces.calc = SinglePointCalculator(no_forces, energy=data[0].get_potential_energy())
    with pytest.raises(ValueError, match="forces"):
        model.update([no_forces])


def test_state_dict_round_trip_is_json_and_predicts_the_same(oxide, data, gpr):
    state = json.loads(json.dumps(gpr.state_dict()))
    again = GPRSurrogate(oxide)
    again.load_state_dict(state)
    assert again.n_points == gpr.n_points
    for a in data[40:43]:
        assert again.predict(a).energy == pytest.approx(gpr.predict(a).energy, abs=1e-8)
        assert again.predict(a).sigma == pytest.approx(gpr.predict(a).sigma, abs=1e-8)


def test_refit_every_controls_hyperparameter_optimisation(oxide, data):
    model = GPRSurrogate(oxide, refit_every=5)
    model.update(data[:20])
    theta = model.model.kernel.theta.copy()
    model.update(data[20:22])  # 2 < 5 new points: conditioned at fixed hyperparameters
    assert np.array_equal(model.model.kernel.theta, theta) and model.n_points == 22
    model.update(data[22:25])  # 5 new points: re-optimised
    assert not np.array_equal(model.model.kernel.theta, theta)


def test_rank_by_acquisition():
    preds = [Prediction(1.0, 0.0), Prediction(2.0, 1.0), Prediction(0.5, 0.0), Prediction(math.nan, 0.0)]
    assert rank_by_acquisition(preds, kappa=0.0, k=2) == [2, 0]
    assert rank_by_acquisition(preds, kappa=2.0, k=2) == [1, 2]  # 2 - 2*1 = 0 is lowest


@pytest.mark.parametrize("block, field", [
    ({"model": "mlp"}, "surrogate.model"),
    ({"modle": "gpr"}, "surrogate.modle"),
    ({"min_points": -1}, "surrogate.min_points"),
    ({"steps": 0}, "surrogate.steps"),
    ({"kappa": -1.0}, "surrogate.kappa"),
    ({"fmax": 0}, "surrogate.fmax"),
    ({"fallback": "crash"}, "surrogate.fallback"),
    ({"screen_candidates": 2, "screen_k": 3}, "surrogate.screen_k"),
    ({"forces": True}, "surrogate.forces"),
    ({"model": "calculator"}, "surrogate.calculator"),
    ({"descriptor": "soap"}, "surrogate.descriptor"),
    ({"enabled": "yes"}, "surrogate.enabled"),
])
def test_config_errors_name_the_field(block, field):
    with pytest.raises(ConfigError) as err:
        SurrogateConfig.from_dict(block)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_config_defaults_and_round_trip():
    cfg = SurrogateConfig.from_dict({"model": "sgpr", "forces": True, "descriptor": "soap"})
    assert SurrogateConfig.from_dict(cfg.to_dict()) == cfg
    assert SurrogateConfig.from_dict(None) == SurrogateConfig()


def test_relaxation_in_the_acquisition_and_config_kwargs(oxide, data, gpr):
    cfg = SurrogateConfig(steps=5, relax_in_acquisition=True, kappa=2.0, fallback="last_good", min_points=10)
    kwargs = cfg.relax_kwargs()
    assert kwargs["kappa"] == 2.0 and kwargs["steps"] == 5 and kwargs["min_points"] == 10
    res = surrogate_relax(oxide, data[46], gpr, **kwargs)
    start = gpr.predict(data[46]).acquisition(2.0)
    assert res.steps >= 1 and res.trajectory_energies[0] == pytest.approx(start, rel=1e-6)
    assert min(res.trajectory_energies) < start
    assert SurrogateConfig().relax_kwargs()["kappa"] == 0.0  # default: relax in E, screen by E - kappa*sigma
