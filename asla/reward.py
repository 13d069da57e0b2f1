"""Energy of finished structures and the bounded reward derived from it.

The evaluator is the only place the expensive calculator is called, so it also counts
evaluations (single points plus relaxation steps), caches symmetry-equivalent structures,
enforces the time limit, and turns calculator faults into the problem's configured outcome
instead of a crash that loses the run.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from .calculators import make_calculator
from .errors import CalculatorError
from .problem import Problem
from .storage import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    energy: float  # total energy in eV (relaxed if the problem relaxes); nan when failed
    ok: bool
    n_calls: int  # calculator evaluations spent on this structure (0 on a cache hit)
    seconds: float
    cached: bool = False
    error: str | None = None
    atoms: Atoms | None = field(default=None, repr=False)


class KeepInRegion:
    """ASE constraint: placed atoms stay within [zmin, zmax] while relaxing (no desorption into vacuum)."""

    def __init__(self, indices, zmin: float, zmax: float) -> None:
        self.index = np.asarray(list(indices), dtype=int)
        self.zmin, self.zmax = zmin, zmax

    def adjust_positions(self, atoms: Atoms, new: np.ndarray) -> None:
        new[self.index, 2] = np.clip(new[self.index, 2], self.zmin, self.zmax)

    def adjust_forces(self, atoms: Atoms, forces: np.ndarray) -> None:
        z = atoms.positions[self.index, 2]
        f = forces[self.index, 2]
        blocked = ((z <= self.zmin + 1e-9) & (f < 0)) | ((z >= self.zmax - 1e-9) & (f > 0))
        forces[self.index[blocked], 2] = 0.0

    def get_removed_dof(self, atoms: Atoms) -> int:
        return 0

    def index_shuffle(self, atoms: Atoms, ind) -> None:
        """ASE's protocol for `atoms[ind]` (a calculator that slices the structure it is given): keep the atoms
        that remain, renumbered; IndexError when none does (ASE then drops the constraint)."""
        selected, mine = np.arange(len(atoms))[ind], set(self.index.tolist())
        kept = [new for new, old in enumerate(selected) if old in mine]
        if not kept:
            raise IndexError("KeepInRegion: none of its atoms is kept")
        self.index = np.asarray(kept, dtype=int)

    def todict(self) -> dict:
        return {"name": "KeepInRegion",
                "kwargs": {"indices": self.index.tolist(), "zmin": self.zmin, "zmax": self.zmax}}


class EvaluationTimeout(Exception):
    """An energy evaluation ran past `faults.timeout` (raised by its SIGALRM limit). An interruption, not a verdict
    on the structure: code that caches results (the judge's RelaxationStore) must not keep it as one. Not a
    TimeoutError: that is an OSError, which file and calculator code inside the limit may catch and swallow."""


class EnergyEvaluator:
    """Evaluates finished builds of one problem with its calculator."""

    def __init__(self, problem: Problem, failure_dir: str | Path | None = None, use_cache: bool = True,
                 keep_forces: bool = False) -> None:
        self.problem = problem
        self.failure_dir = Path(failure_dir) if failure_dir else None
        self.use_cache = use_cache
        # keep_forces: each result's atoms also hold the real forces (a surrogate trained on forces needs them);
        # off by default, since a DFT code may pay for forces it is not asked for
        self.keep_forces = keep_forces
        self.cache: dict[tuple[int, ...], float] = {}
        self.n_calls = 0
        self.n_structures = 0
        self.n_cache_hits = 0
        self.failures: list[dict] = []
        self._calc = None

    # -- public API ---------------------------------------------------------------------
    def evaluate(self, atoms: Atoms, key: tuple[int, ...] | None = None) -> Evaluation:
        """Energy of `atoms`; never raises for calculator faults unless the problem says ``raise``."""
        if self.use_cache and key is not None and key in self.cache:
            self.n_cache_hits += 1
            e = self.cache[key]
            return Evaluation(energy=e, ok=math.isfinite(e), n_calls=0, seconds=0.0, cached=True,
                              atoms=_with_energy(atoms, e))
        self.n_structures += 1
        faults = self.problem.faults
        spec = dict(self.problem.calculator)
        t0 = time.perf_counter()
        error, n_calls, energy, final, forces = None, 0, float("nan"), atoms, None
        for attempt in range(faults.retries + 1):
            if attempt:
                spec = {**spec, **faults.retry_settings}
                self._calc = None
            n_calls_try = 0  # > 0 once _run returned: a non-finite energy below is counted already
            try:
                energy, n_calls_try, final, forces = self._run(atoms, spec)
                n_calls += n_calls_try
                if not math.isfinite(energy):
                    raise CalculatorError(f"calculator {spec['name']} returned a non-finite energy ({energy})")
                if self.problem.relax.steps > 0 and faults.min_distance > 0:
                    collapse = collapsed_pair(final, faults.min_distance)
                    if collapse:
                        raise CollapsedStructure(f"the relaxation with {spec['name']} collapsed two atoms: {collapse}")
                error = None
                break
            except Exception as exc:  # noqa: BLE001 - any calculator failure is handled per problem policy
                n_calls += 0 if n_calls_try else 1  # a call that raised counts once
                self._calc = None  # a failed calculator may hold a broken state
                error = _describe(exc, spec)
                energy = float("nan")
                if isinstance(exc, CollapsedStructure):
                    break  # deterministic: other SCF settings would relax into the same hole
        self.n_calls += n_calls
        seconds = time.perf_counter() - t0
        if error is not None:
            self._record_failure(atoms, error)
            if faults.on_error == "raise":
                raise CalculatorError(error)
        if self.use_cache and key is not None:
            self.cache[key] = energy
        return Evaluation(energy=energy, ok=error is None, n_calls=n_calls, seconds=seconds, error=error,
                          atoms=_with_energy(final, energy, forces if error is None else None))

    def relative(self, energy: float) -> float | None:
        ref = self.problem.reference_energy
        return None if ref is None else energy - ref

    # -- persistence of the cache --------------------------------------------------------
    def state_dict(self) -> dict:
        return {"cache": [[list(k), v] for k, v in self.cache.items()], "n_calls": self.n_calls,
                "n_structures": self.n_structures, "n_cache_hits": self.n_cache_hits, "failures": self.failures}

    def load_state_dict(self, state: dict) -> None:
        self.cache = {tuple(k): float(v) for k, v in state.get("cache", [])}
        self.n_calls = int(state.get("n_calls", 0))
        self.n_structures = int(state.get("n_structures", 0))
        self.n_cache_hits = int(state.get("n_cache_hits", 0))
        self.failures = list(state.get("failures", []))

    def save_cache(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.state_dict()))

    # -- internals ----------------------------------------------------------------------
    def _calculator(self, spec: dict):
        if self._calc is None or spec != getattr(self, "_calc_spec", None):
            self._calc = make_calculator(spec)
            self._calc_spec = spec
        return self._calc

    def _run(self, atoms: Atoms, spec: dict) -> tuple[float, int, Atoms, np.ndarray | None]:
        work = atoms.copy()
        work.calc = self._calculator(spec)
        with _time_limit(self.problem.faults.timeout):
            relax = self.problem.relax
            if relax.steps > 0:
                n_template = len(self.problem.template)
                zs = self.problem.grid.layer_z
                work.set_constraint([FixAtoms(indices=range(n_template)),
                                     KeepInRegion(range(n_template, len(work)), min(zs) - 1.0, max(zs) + 1.0)])
                from ase import optimize
                opt = getattr(optimize, relax.optimizer)(work, logfile=None)
                opt.run(fmax=relax.fmax, steps=relax.steps)
                n_calls = opt.nsteps + 1
                work.set_constraint()
            else:
                n_calls = 1
            energy = float(work.get_potential_energy())
            forces = np.array(work.get_forces(), dtype=float) if self.keep_forces else None  # no constraint: real
        return energy, n_calls, work, forces

    def _record_failure(self, atoms: Atoms, error: str) -> None:
        entry = {"index": len(self.failures), "error": error, "time": time.time(), "file": None}
        log.warning("energy evaluation failed: %s", error)
        if self.failure_dir is not None:
            from ase.io import write
            self.failure_dir.mkdir(parents=True, exist_ok=True)
            path = self.failure_dir / f"failed-{len(self.failures):05d}.extxyz"
            a = atoms.copy()
            a.info["error"] = error
            write(path, a, format="extxyz")
            entry["file"] = str(path)
        self.failures.append(entry)


class CollapsedStructure(CalculatorError):
    """A relaxation ended with two atoms closer than `faults.min_distance` of their covalent radii: a hole of the
    potential, not a structure."""


def collapsed_pair(atoms: Atoms, fraction: float) -> str | None:
    """The closest pair of atoms closer than `fraction` of the sum of their covalent radii (minimum image), as one
    line; None if there is none. Machine-learned potentials are trained on no such pairs and may reward them:
    relaxed with CHGNet 0.3.0, two Pd atoms on Pd(100) merged at 0.31 A and lay 0.8 eV below every sound structure
    (docs/reference-minima.md), and a learner maximising the reward would find such holes."""
    from ase.data import covalent_radii
    if len(atoms) < 2:
        return None
    r = covalent_radii[atoms.numbers]
    d = atoms.get_all_distances(mic=True) + np.eye(len(atoms)) * 1e9
    ratio = d / (r[:, None] + r[None, :])
    i, j = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
    if ratio[i, j] >= fraction:
        return None
    sym = atoms.get_chemical_symbols()
    return (f"{sym[i]} {i} and {sym[j]} {j} at {d[i, j]:.2f} A, below {fraction:g} x the sum of their covalent radii "
            f"({fraction * (r[i] + r[j]):.2f} A)")


def _describe(exc: BaseException, spec: dict) -> str:
    if isinstance(exc, EvaluationTimeout):
        return f"calculator {spec['name']} exceeded the time limit (faults.timeout)"
    if isinstance(exc, CollapsedStructure):
        return str(exc)[:300]
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"calculator {spec['name']} failed: {type(exc).__name__}: {msg}"[:300]


class _time_limit:
    """Wall-clock limit via SIGALRM (main thread only; elsewhere it is not enforced)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.active = bool(seconds) and threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.active:
            self.old = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, float(self.seconds))

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)

    @staticmethod
    def _raise(signum, frame):
        raise EvaluationTimeout()


def _with_energy(atoms: Atoms, energy: float, forces: np.ndarray | None = None) -> Atoms:
    a = atoms.copy()
    a.calc = SinglePointCalculator(a, energy=energy, forces=forces)
    return a


class RewardScale:
    """Map energies to rewards in [-1, 1]: 1 at the lowest energy seen, 0 at a high quantile.

    ``linear``: ``r = clip((E_high - E) / (E_high - E_low), -1, 1)``. ``log``: the distance above the best is
    compressed, ``r = 1 - log(1 + (E - E_low) / d) / log(1 + (E_high - E_low) / d)`` with
    ``d = resolution * (E_high - E_low)``, so that structures a fraction of an eV above the best still differ
    clearly in reward when random builds spread over tens of eV (a Q-network cannot resolve 0.5% of its
    range). Failed builds get -1. Raw energies are kept and rewards recomputed, because the scale moves as the
    search finds lower structures.
    """

    def __init__(self, quantile: float = 0.9, window: int = 5000, kind: str = "linear",
                 resolution: float = 0.01) -> None:
        self.quantile = quantile
        self.window = window
        self.kind = kind
        self.resolution = resolution
        self.energies: list[float] = []
        self.low = math.inf

    def update(self, energies) -> None:
        new = [float(e) for e in np.atleast_1d(energies) if np.isfinite(e)]
        self.energies.extend(new)
        self.low = min([self.low, *new])
        if len(self.energies) > 2 * self.window:
            self.energies = self.energies[-self.window:]

    def bounds(self) -> tuple[float, float]:
        if not self.energies:
            return 0.0, 1.0
        e = np.asarray(self.energies[-self.window:])
        low = min(self.low, float(e.min()))
        high = float(np.quantile(e, self.quantile))
        if high - low < 1e-6:
            high = low + 1.0
        return low, high

    def state_dict(self) -> dict:
        """What moves as the search goes on (JSON): the energies in the window and the lowest ever (None before
        the first). The quantile, window, kind and resolution come from the recipe and are not part of it."""
        return {"energies": list(self.energies), "low": self.low if math.isfinite(self.low) else None}

    def load_state_dict(self, state: dict) -> None:
        self.energies = [float(e) for e in state["energies"]]
        self.low = math.inf if state["low"] is None else float(state["low"])

    def __call__(self, energies) -> np.ndarray:
        return rewards(np.asarray(energies, dtype=float), *self.bounds(), kind=self.kind, resolution=self.resolution)


def rewards(energies: np.ndarray, low: float, high: float, kind: str = "linear",
            resolution: float = 0.01) -> np.ndarray:
    if kind == "log":
        d = resolution * (high - low)
        above = np.maximum(np.asarray(energies, dtype=float) - low, 0.0)
        r = 1.0 - np.log1p(above / d) / np.log1p((high - low) / d)
    else:
        r = (high - energies) / (high - low)
    r = np.clip(r, -1.0, 1.0)
    return np.where(np.isfinite(energies), r, -1.0)
