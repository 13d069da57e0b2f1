"""Universal ML potentials as rewards (CHGNet, SevenNet): one real evaluation each, offline, and the spec checks."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest

from asla import ProblemError, load_problem
from asla.bench.judge import reference_structure
from asla.builder import check_fits, random_build
from asla.calculators import make_calculator
from asla.reward import EnergyEvaluator

TINY = "tiny-pd2o"
PACKAGES = {"chgnet": "chgnet", "sevennet": "sevenn"}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any network connection fails: the weights must come from the installed wheel."""
    def refuse(*args, **kwargs):  # socket.connect's signature
        raise OSError("network access in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", ["chgnet", "sevennet"])
def test_real_evaluation_through_the_evaluator(name: str, offline: None) -> None:
    pytest.importorskip(PACKAGES[name], reason=f"{PACKAGES[name]} is not installed (extra asla[{name}])")
    problem = load_problem(TINY, calculator={"name": name, "device": "cpu"})
    atoms = random_build(problem, np.random.default_rng(0)).atoms()
    result = EnergyEvaluator(problem).evaluate(atoms)
    assert result.ok, result.error
    assert -5.0 < result.energy / len(atoms) < -2.0  # Pd2O on Pd(100): about -3.5 eV/atom with both potentials

    work = atoms.copy()
    work.calc = make_calculator(problem.calculator)
    forces = work.get_forces()
    assert forces.shape == (len(atoms), 3) and np.isfinite(forces).all()
    assert math.isclose(work.get_potential_energy(), result.energy, abs_tol=1e-4)
    # forces are the energy's negative gradient: a central difference along the largest force on the last atom
    k = int(np.argmax(np.abs(forces[-1])))
    h = 1e-3
    energies = []
    for sign in (1, -1):
        moved = work.copy()
        moved.calc = work.calc
        moved.positions[-1, k] += sign * h
        energies.append(moved.get_potential_energy())
    assert abs(-(energies[0] - energies[1]) / (2 * h) - forces[-1, k]) < 0.05 * max(1.0, abs(forces[-1, k]))


@pytest.mark.parametrize("spec, message", [
    ({"name": "chgnet", "model": "0.4.0"},
     r"^calculator.model: unknown chgnet model '0.4.0'; allowed \(shipped in the wheel\): 0.3.0, 0.2.0, r2scan$"),
    ({"name": "sevennet", "model": "7net-omat"},
     r"^calculator.model: unknown sevennet model '7net-omat'; allowed .*: 7net-0, 7net-0_22may2024, 7net-l3i5$"),
    ({"name": "sevennet", "modal": "mpa"}, r"^calculator.modal: sevennet takes no keyword 'modal'; allowed: "
     r"model, device$"),
    ({"name": "chgnet", "device": "gpu"}, r"^calculator.device: must be one of auto, cpu, cuda, got 'gpu'$"),
])
def test_bad_spec_is_one_line_naming_the_field(spec: dict, message: str) -> None:
    with pytest.raises(ProblemError, match=message):
        load_problem(TINY, calculator=spec)


def test_defaults_load_without_importing_the_packages() -> None:
    problem = load_problem(TINY, calculator={"name": "sevennet"})
    assert problem.calculator == {"name": "sevennet"}  # model and device default in the builder (7net-0, auto)


def test_shipped_chgnet_problem_has_chgnets_own_lattice(offline: None) -> None:
    """The template is strained unless its lattice constant is the potential's own (EMT's 3.879 A is 1.8% short)."""
    problem = load_problem("pd100-oxide-3x3-chgnet")
    assert problem.calculator["name"] == "chgnet"
    pytest.importorskip("chgnet", reason="chgnet is not installed (extra asla[chgnet])")
    from ase.build import bulk
    from ase.eos import EquationOfState

    calc = make_calculator({"name": "chgnet", "model": problem.calculator["model"], "device": "cpu"})
    volumes, energies = [], []
    for a in np.linspace(3.85, 4.05, 5):
        pd = bulk("Pd", "fcc", a=a)
        pd.calc = calc
        volumes.append(pd.get_volume())
        energies.append(pd.get_potential_energy())
    v0 = EquationOfState(volumes, energies).fit()[0]
    assert abs((4 * v0) ** (1 / 3) - problem.source["template"]["a"]) < 0.01


def test_cuda_without_a_gpu_is_refused_in_one_line() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("chgnet", reason="chgnet is not installed (extra asla[chgnet])")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the refusal cannot be seen here")
    with pytest.raises(ProblemError, match=r"^calculator.device: cuda requested but torch sees no CUDA device"):
        make_calculator({"name": "chgnet", "device": "cuda"})


@pytest.mark.parametrize("name", ["pd100-oxide-3x3-chgnet", "graphene-c24-chgnet"])
def test_shipped_mlip_problem_reference_reevaluates(name: str, offline: None) -> None:
    """The MLIP problems' references (scripts/reference_minima.py with the potential itself): the structure is on
    this problem's template with its bag, and one evaluation with the potential gives the stated energy."""
    problem = load_problem(name)
    check_fits(problem)
    ref = problem.reference
    assert ref.get("relaxed") is True and problem.reference_energy is not None
    assert "scripts/reference_minima.py" in ref["method"]
    atoms = reference_structure(problem)
    assert atoms is not None, f"{ref['structure']} not found"
    n_t = len(problem.template)
    assert len(atoms) == n_t + sum(problem.bag.values())
    assert np.allclose(atoms.positions[:n_t], problem.template.positions, atol=1e-6)   # not another lattice's slab
    placed = atoms.get_chemical_symbols()[n_t:]
    assert {s: placed.count(s) for s in set(placed)} == dict(problem.bag)
    pytest.importorskip("chgnet", reason="chgnet is not installed (extra asla[chgnet])")
    atoms.calc = make_calculator({**problem.calculator, "device": "cpu"})
    assert abs(atoms.get_potential_energy() - problem.reference_energy) < 1e-3
