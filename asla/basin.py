"""The basin criterion: a candidate has found the global minimum if it relaxes into its basin.

A grid-built structure is never exactly relaxed, so comparing its single-point energy with a
relaxed reference would be unfair to a grid method. Every method's candidates are therefore
relaxed with the problem's calculator (template fixed; an offline check, not counted as search
evaluations) and compared with the reference within a tolerance (0.05 eV by default).

These are the building blocks; the one judgement of a run's trace ("found", and the strict criterion beside it)
is asla.bench.judge, used by the benchmark, its report and every script.
"""
from __future__ import annotations

import math

from ase import Atoms
from ase.constraints import FixAtoms

from .calculators import make_calculator
from .problem import Problem


def relax(problem: Problem, atoms: Atoms, fmax: float = 0.05, steps: int = 1000) -> Atoms:
    """Local relaxation (BFGS) with the template fixed; energy in info['relaxed_energy'] (nan on failure)."""
    work = atoms.copy()
    work.set_constraint(FixAtoms(indices=range(len(problem.template))))
    work.calc = make_calculator(problem.calculator)
    try:
        from ase.optimize import BFGS
        BFGS(work, logfile=None).run(fmax=fmax, steps=steps)
        work.info["relaxed_energy"] = float(work.get_potential_energy())
    except Exception:  # noqa: BLE001 - a failed relaxation just does not count as found
        work.info["relaxed_energy"] = math.nan
    return work


def relaxed_energy(problem: Problem, atoms: Atoms, **kwargs) -> float:
    return float(relax(problem, atoms, **kwargs).info["relaxed_energy"])


def in_basin(relaxed: float | None, ref: float | None, tol: float = 0.05) -> bool:
    """The criterion on a relaxed energy: finite and at most `tol` eV above the reference (None, nan: not)."""
    return relaxed is not None and ref is not None and math.isfinite(relaxed) and relaxed <= ref + tol


def found(problem: Problem, atoms: Atoms, tol: float = 0.05) -> bool:
    """True if `atoms` relaxes to within `tol` eV of the problem's reference minimum."""
    ref = problem.reference_energy
    return ref is not None and in_basin(relaxed_energy(problem, atoms), ref, tol)
