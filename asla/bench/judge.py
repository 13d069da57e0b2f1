"""THE definition of "found", used by the benchmark, its report and every script: the basin criterion on a run's
trace of best-energy improvements, and beside it the strict criterion.

Basin criterion (../shared/ASLA.md section 9): an improvement has found the global minimum if its structure,
relaxed with the problem's calculator (template fixed; `asla.basin.relax`, offline, not counted), ends within
`TOL` eV of the reference energy. A grid build is never exactly relaxed, so its single-point energy is not
compared with a relaxed reference.

Strict criterion: the relaxed structure IS the reference structure, the same arrangement up to the problem's
symmetry (`same_structure`). The energy window alone can count a distinct arrangement: a held-back problem had
one 0.017 eV above its minimum, inside the 0.05 eV window.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.io import read

from asla import basin
from asla.basin import in_basin
from asla.problem import Problem
from asla.reward import EvaluationTimeout
from asla.storage import write_json, write_structures

TOL = 0.05  # eV, the basin criterion's tolerance
STRICT_TOL = 0.2  # A: largest displacement of any atom from its reference site still counted as the same structure
MAX_MOVE = 0.5  # A: consecutive evaluations moving no atom further are steps of one local relaxation (a descent)


def relax(problem: Problem, atoms: Atoms) -> Atoms:
    """The relaxation every criterion judges by (module-level, so a test can replace it): `asla.basin.relax`, or
    inside `resumable_relaxations` the same BFGS relaxation resumable and kept on disk."""
    store = _STORE.get()
    return store.relax(problem, atoms) if store is not None else basin.relax(problem, atoms)


# ---- judge relaxations that outlive the machine (DFT) -----------------------------------------------------

# A judge relaxation with GPAW costs 12-56 BFGS steps of a minute each (docs/dft-reference.md): on such problems the
# benchmark keeps each one resumable (asla.relaxation) and its result on disk, where a killed run, a rejudged record
# and the next seed reuse it.
RESUMABLE_CALCULATORS = ("gpaw",)


class RelaxationStore:
    """Judge relaxations kept in a folder, by structure: `<key>.json` (relaxed energy, converged, counts) and
    `<key>.extxyz` (the relaxed structure) once finished; `progress/` the per-step checkpoints of one under way
    (commit both to continue on another machine); `work/` what only this machine needs. The key is a hash of
    `structure_key` (species, positions and cell to 1e-8 A, what a trace file keeps). A relaxation that raises is
    kept as failed (nan), as `asla.basin.relax` judges it."""

    def __init__(self, directory: Path, fmax: float = 0.05, steps: int = 1000) -> None:
        self.directory, self.fmax, self.steps = Path(directory), fmax, steps

    @staticmethod
    def name(atoms: Atoms) -> str:
        return "r-" + hashlib.sha1(structure_key(atoms)).hexdigest()[:16]

    def relax(self, problem: Problem, atoms: Atoms) -> Atoms:
        from asla.relaxation import Checkpoint, relax_resumable
        name = self.name(atoms)
        record_path, structure_path = self.directory / f"{name}.json", self.directory / f"{name}.extxyz"
        if record_path.exists():
            record = json.loads(record_path.read_text())
            done = read(structure_path) if structure_path.exists() else atoms.copy()
            done.info["relaxed_energy"] = math.nan if record["energy"] is None else float(record["energy"])
            return done
        keep = self.directory / "progress"
        record: dict[str, Any] = {"fmax": self.fmax, "step_cap": self.steps}
        try:
            result = relax_resumable(problem, atoms, name, self.directory / "work", keep, self.fmax, self.steps,
                                     log=lambda line: print(f"judge {line}", flush=True))
            energy = math.nan if result.error else float(result.atoms.get_potential_energy())
            record.update(converged=result.converged, error=result.error, **result.progress)
            done = result.atoms.copy()
        except EvaluationTimeout:
            raise  # interrupted, not failed: no record, the checkpoint stays for the next attempt
        except Exception as exc:  # noqa: BLE001 - a failed relaxation just does not count as found
            energy, done = math.nan, atoms.copy()
            record.update(converged=False, error=f"{type(exc).__name__}: {exc}")
        record["energy"] = energy if math.isfinite(energy) else None
        done.calc = None
        done.info["relaxed_energy"] = energy
        write_structures(structure_path, [done])
        write_json(record_path, record)
        Checkpoint(keep, name).remove()  # the record supersedes it
        return done


_STORE: contextvars.ContextVar[RelaxationStore | None] = contextvars.ContextVar("judge_store", default=None)


@contextlib.contextmanager
def resumable_relaxations(directory: Path | None) -> Iterator[None]:
    """Within this block the judge's relaxations are a RelaxationStore's in `directory` (None: as always)."""
    token = _STORE.set(RelaxationStore(directory) if directory is not None else None)
    try:
        yield
    finally:
        _STORE.reset(token)


def store_for(problem: Problem, directory: Path) -> Path | None:
    """`directory` where the problem's calculator makes a judge relaxation worth keeping, else None."""
    return directory if problem.calculator.get("name") in RESUMABLE_CALCULATORS else None


KEY_DECIMALS = 8  # ASE's extxyz writes positions as %16.8f: the precision a trace file keeps


def structure_key(atoms: Atoms) -> bytes:
    """Identity of a structure for reusing its relaxation: species, positions and cell to 1e-8 A, as a trace file
    (extxyz) keeps them, so a structure read back from a trace is the one relaxed during the run. Exact bytes were
    the key until a DFT rejudge from the trace missed every relaxation the run had kept and started them again
    (20-50 GPAW steps each). Formatting, not rounding: %.8f of a value read back from %.8f is the same text."""
    values = np.concatenate([np.asarray(atoms.positions, float).ravel(), np.asarray(atoms.cell[:], float).ravel()])
    numbers = ",".join(str(int(z)) for z in atoms.numbers)
    return (numbers + "|" + " ".join(f"{v:.{KEY_DECIMALS}f}" for v in values)).encode()


def small_move(a: Atoms, b: Atoms, max_move: float = MAX_MOVE) -> bool:
    """No atom moved more than `max_move` A between two structures (optimisers step at most 0.2 A; a new
    structure moves atoms further)."""
    return len(a) == len(b) and float(np.abs(b.positions - a.positions).max()) <= max_move


def same_descent(a: dict, b: dict, max_move: float = MAX_MOVE) -> bool:
    """Consecutive evaluations with small moves (`small_move`): steps of one local relaxation."""
    return b["evaluations"] == a["evaluations"] + 1 and small_move(a["atoms"], b["atoms"], max_move)


# ---- the strict criterion ---------------------------------------------------------------------------------

def reference_structure(problem: Problem, base: Path | None = None) -> Atoms | None:
    """The problem's reference structure (`reference.structure`), or None where it has none or it cannot be read.

    A relative path is looked for beside the problem's YAML (`base`), in the working directory and in the
    source tree of asla (the shipped problems name `docs/reference/<name>.extxyz`, which is not installed)."""
    from ase.io import read
    name = (problem.reference or {}).get("structure")
    if not name:
        return None
    path = Path(name)
    roots = [Path(base)] if base else []
    roots += [Path.cwd(), Path(__file__).resolve().parents[2]]
    for candidate in ([path] if path.is_absolute() else [root / path for root in roots]):
        if candidate.exists():
            try:
                return read(candidate)
            except Exception:  # noqa: BLE001 - an unreadable file is a reference we cannot judge by, said so
                return None
    return None


def _cartesian_ops(problem: Problem) -> list[np.ndarray]:
    """The in-plane point operations of the problem's symmetry group (grid and template), as Cartesian 3x3
    matrices: asla.grid keeps them as integer maps of pixel indices."""
    grid = problem.grid
    ab = np.asarray(grid.ab, dtype=float)[:, :2].T  # columns: the in-plane cell vectors
    n = np.diag([grid.na, grid.nb]).astype(float)
    ops = []
    for m in problem.symmetry.matrices:
        r2 = ab @ np.linalg.inv(n) @ m @ n @ np.linalg.inv(ab)
        if np.allclose(r2 @ r2.T, np.eye(2), atol=1e-6):  # an isometry (every valid grid operation is one)
            r = np.eye(3)
            r[:2, :2] = r2
            ops.append(r)
    return ops


def same_structure(problem: Problem, atoms: Atoms, reference: Atoms, tol: float = STRICT_TOL) -> bool | None:
    """Whether two relaxed structures are the same arrangement up to the problem's symmetry.

    Every point operation of the problem's symmetry group (asla.grid: the grid's rotations and mirrors that map the
    template onto itself) combined with every translation that takes one atom of the rarest species onto one of
    the reference's, then each species matched to the reference by an optimal assignment (scipy), in-plane
    distances by the minimum image: the same structure if every atom lies within `tol` A of its match. Relaxed
    copies of one minimum differ by hundredths of an Angstrom; a distinct arrangement puts atoms in other sites,
    an Angstrom or more away. A molecule built in one plane without periodicity is compared by `same_molecule`
    (any in-plane rotation). None: not judged (another composition, or several layers without periodicity).

    Why not a library comparator: ASE's SymmetryEquivalenceCheck rebuilds the lattice from vectors between atoms
    of the rarest species and so rejects a slab whose adsorbate is rattled by 0.005 A (tried on the 2x2 oxide);
    pymatgen's StructureMatcher is not a dependency here, and its tolerance scales with the volume per atom, which
    the vacuum of a slab inflates.
    """
    from scipy.optimize import linear_sum_assignment
    if sorted(atoms.numbers) != sorted(reference.numbers):
        return None
    if not problem.grid.periodic:
        return same_molecule(atoms, reference, tol) if problem.grid.n_layers == 1 else None
    cell = np.asarray(problem.cell, dtype=float)
    inv = np.linalg.inv(cell[:2, :2])
    numbers = np.asarray(atoms.numbers)
    rare = min(set(numbers.tolist()), key=lambda z: (int(np.sum(numbers == z)), z))
    anchor = int(np.flatnonzero(numbers == rare)[0])

    def wrapped(d: np.ndarray) -> np.ndarray:  # in-plane minimum image of displacement vectors (..., 3)
        f = d[..., :2] @ inv
        f -= np.rint(f)
        return np.concatenate([f @ cell[:2, :2], d[..., 2:]], axis=-1)

    for r in _cartesian_ops(problem):
        rotated = atoms.positions @ r.T
        for target in reference.positions[reference.numbers == rare]:
            moved = rotated + (target - rotated[anchor])
            worst = 0.0
            for z in set(numbers.tolist()):
                a, b = moved[numbers == z], reference.positions[reference.numbers == z]
                dist = np.linalg.norm(wrapped(a[:, None, :] - b[None, :, :]), axis=-1)
                rows, cols = linear_sum_assignment(dist)
                worst = max(worst, float(dist[rows, cols].max()))
                if worst > tol:
                    break
            if worst <= tol:
                return True
    return False


def _within(a: Atoms, moved: np.ndarray, reference: Atoms, tol: float) -> bool:
    """Every atom of `a` (at `moved`) within `tol` A of its own reference atom of the same species, matched by an
    optimal assignment per species (scipy)."""
    from scipy.optimize import linear_sum_assignment
    for z in set(a.numbers.tolist()):
        dist = np.linalg.norm(moved[a.numbers == z][:, None, :] - reference.positions[reference.numbers == z][None],
                              axis=-1)
        rows, cols = linear_sum_assignment(dist)
        if float(dist[rows, cols].max()) > tol:
            return False
    return True


def same_molecule(atoms: Atoms, reference: Atoms, tol: float = STRICT_TOL) -> bool:
    """Whether two relaxed molecules built in one plane (no periodicity) are the same structure, wherever in the
    box and however turned within the plane it lies: the grid's own rotations are not all of a molecule's, which
    relaxes at any angle. Every in-plane rotation and mirror that takes a pair of atoms (one of the rarest species,
    and the atom farthest from it) onto a pair of the reference's of the same species and near the same distance,
    then the optimal assignment per species as in `same_structure`."""
    numbers = np.asarray(atoms.numbers)
    pos = np.asarray(atoms.positions, dtype=float)
    rare = min(set(numbers.tolist()), key=lambda z: (int(np.sum(numbers == z)), z))
    i = int(np.flatnonzero(numbers == rare)[0])
    j = int(np.argmax(np.linalg.norm(pos - pos[i], axis=1)))
    if j == i:
        return _within(atoms, pos - pos[i] + reference.positions[reference.numbers == rare][0], reference, tol)
    ref = np.asarray(reference.positions, dtype=float)
    d_ij = float(np.linalg.norm(pos[j, :2] - pos[i, :2]))
    for k in np.flatnonzero(reference.numbers == numbers[i]):
        for m in np.flatnonzero(reference.numbers == numbers[j]):
            if m == k or abs(float(np.linalg.norm(ref[m, :2] - ref[k, :2])) - d_ij) > 2 * tol:
                continue
            for mirror in (1.0, -1.0):
                p = (pos - pos[i]) * [1.0, mirror, 1.0]
                turn = math.atan2(*(ref[m, 1::-1] - ref[k, 1::-1])) - math.atan2(p[j, 1], p[j, 0])
                c, s = math.cos(turn), math.sin(turn)
                moved = p @ np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]]) + ref[k]
                if _within(atoms, moved, reference, tol):
                    return True
    return False


class StrictCheck:
    """The strict criterion for one problem: its reference structure read once."""

    def __init__(self, problem: Problem, base: Path | None = None, tol: float = STRICT_TOL) -> None:
        self.problem, self.tol = problem, tol
        self.reference = reference_structure(problem, base)

    @property
    def available(self) -> bool:
        return self.reference is not None and (self.problem.grid.periodic or self.problem.grid.n_layers == 1)

    def __call__(self, relaxed: Atoms) -> bool | None:
        if not self.available:
            return None
        return same_structure(self.problem, relaxed, self.reference, self.tol)


# ---- the online check: stop a run when found --------------------------------------------------------------

class FoundCheck:
    """A `stop_when` for a benchmark run: True once an improvement relaxes into the minimum's basin (the criterion
    of `first_in_basin`, asked of the improvements within `window` eV). A run stopped by it contributes the same
    first hit to the success curves as the run to the end of its budget would: the curves need only that.
    Its relaxations (`relaxed`: energies, `structures`: relaxed structures, by `structure_key`) are handed to
    `first_in_basin`, which would otherwise relax the same structures again offline.

    As offline, a descent (improvements moving no atom more than 0.5 A: the steps of one local relaxation) is
    judged by its start, at once, and by its lowest point, once the descent has ended, i.e. at the next improvement
    that starts elsewhere; its steps in between are not relaxed. RSS and basin hopping improve the best at every
    step of a relaxation (60-140 per run on the xTB graphene): relaxing each took 15-20 min per run there, against
    16-230 s for the descents' ends. A hit that only a descent's later steps reach stops the run late (or not at
    all); the record's first hit is still the offline judgement's.

    With `strict` (a StrictCheck) a hit must also be the reference structure itself: a run stops at its strict hit
    (the suite has distinct minima 1-17 meV above the reference, inside the basin's 0.05 eV, that would otherwise
    stop a run before it reaches the minimum), and both of its first hits stand as offline."""

    def __init__(self, problem: Problem, tol: float = TOL, window: float = 5.0,
                 strict: StrictCheck | None = None) -> None:
        self.problem, self.tol, self.window = problem, tol, window
        self.strict = strict if strict is not None and strict.available else None
        self.relaxed: dict[bytes, float] = {}
        self.structures: dict[bytes, Atoms] = {}
        self._descent: Any = None  # the lowest point so far of the current descent

    def _hit(self, atoms: Atoms) -> bool:
        key = structure_key(atoms)
        if key not in self.relaxed:
            done = relax(self.problem, atoms)
            self.relaxed[key], self.structures[key] = float(done.info["relaxed_energy"]), done
        found = in_basin(self.relaxed[key], self.problem.reference_energy, self.tol)
        return found and (self.strict is None or bool(self.strict(self.structures[key])))

    def __call__(self, atoms: Atoms, energy: float) -> bool:
        ref = self.problem.reference_energy
        if ref is None or energy > ref + self.window:
            return False
        ended, self._descent = self._descent, atoms
        if ended is not None and _next_evaluation(ended, atoms) and small_move(ended, atoms):
            return False  # a step of the same descent: judged by its lowest point when the descent ends
        return (ended is not None and self._hit(ended)) or self._hit(atoms)


def _next_evaluation(a: Atoms, b: Atoms) -> bool:
    """`b` came at the evaluation after `a`'s (as `same_descent` asks offline), or their counts are not known (the
    Ledger puts them in `info`). A small move that is not the next evaluation is a new build one atom away from
    the best (agents/mutation.py), judged at once, not deferred as a descent's step."""
    n_a, n_b = a.info.get("evaluations"), b.info.get("evaluations")
    return n_a is None or n_b is None or int(n_b) == int(n_a) + 1


# ---- the offline judgement of a trace ---------------------------------------------------------------------

def _segments(trace: list[dict], rows: Iterable[int]) -> list[list[int]]:
    """Candidate rows grouped into uninterrupted descents (`same_descent`)."""
    segments: list[list[int]] = []
    for i in rows:
        if segments and i == segments[-1][-1] + 1 and same_descent(trace[i - 1], trace[i]):
            segments[-1].append(i)
        else:
            segments.append([i])
    return segments


def first_in_basin(problem: Problem, trace: list[dict], tol: float = TOL, window: float = 5.0,
                   known: dict[bytes, float] | None = None, strict: StrictCheck | None = None,
                   known_structures: dict[bytes, Atoms] | None = None) -> dict:
    """First improvement of a run's best energy (rows: evaluations, seconds, energy, atoms) whose structure relaxes
    into the global minimum's basin: `found` (None if none), and with `strict` whether that first hit's relaxed
    structure is the reference structure itself (`first_hit_is_reference`) and the first row that relaxes into it
    (`strict_found`, None if none; `strict_judged` False where it cannot be judged).

    Only the rows within `window` eV of the reference are relaxed, to bound the offline cost. An uninterrupted
    descent (rows at consecutive evaluations with small moves: the steps of one local relaxation that kept
    improving the best) is examined from its start only if its last, lowest row relaxes into the basin; otherwise
    the whole descent is taken to lie outside it. The strict hit can only be at or after the basin hit (the same
    structure has the same energy); the descents after the basin hit are examined alike until one is found.
    `known` relaxed energies (by `structure_key`, e.g. a FoundCheck's from the run itself) are reused, not
    recomputed; a strict verdict needs the relaxed structure (`known_structures`), else the row is relaxed again.
    """
    ref = problem.reference_energy
    t0 = time.perf_counter()
    relaxed: dict[int, float] = {}
    structures: dict[int, Atoms] = {}
    known, known_structures = known or {}, known_structures or {}
    reused = 0

    def relax_row(i: int, need_structure: bool = False) -> float:
        nonlocal reused
        key = structure_key(trace[i]["atoms"]) if (i not in relaxed or need_structure) else None
        if i not in relaxed:
            if key in known and (not need_structure or key in known_structures):
                reused += 1
                relaxed[i] = known[key]
            else:
                done = relax(problem, trace[i]["atoms"])
                relaxed[i], structures[i] = float(done.info["relaxed_energy"]), done
        if need_structure and i not in structures:
            if key in known_structures:
                structures[i] = known_structures[key]
            else:
                done = relax(problem, trace[i]["atoms"])
                relaxed[i], structures[i] = float(done.info["relaxed_energy"]), done
        return relaxed[i]

    def hit(i: int) -> bool:
        return in_basin(relax_row(i), ref, tol)

    def strict_hit(i: int) -> bool:
        return in_basin(relax_row(i, need_structure=True), ref, tol) and bool(strict(structures[i]))

    def row_info(i: int) -> dict:
        row = trace[i]
        return {"evaluations": row["evaluations"], "seconds": row["seconds"], "energy": row["energy"],
                "relaxed_energy": relaxed[i], "trace_index": i}

    judge_strict = strict is not None and strict.available
    result: dict[str, Any] = {"found": None, "strict_found": None, "strict_judged": judge_strict,
                              "first_hit_is_reference": None}
    if ref is not None and trace:
        segments = _segments(trace, [i for i, row in enumerate(trace) if row["energy"] <= ref + window])
        first_seg = next((n for n, seg in enumerate(segments) if hit(seg[-1])), None)
        if first_seg is not None:
            result["found"] = row_info(next(i for i in segments[first_seg] if hit(i)))
        if judge_strict and first_seg is not None:
            result["first_hit_is_reference"] = strict_hit(result["found"]["trace_index"])
            for seg in segments[first_seg:]:
                if hit(seg[-1]):
                    strict_first = next((i for i in seg if hit(i) and strict_hit(i)), None)
                    if strict_first is not None:
                        result["strict_found"] = row_info(strict_first)
                        break
        result["best_relaxed_energy"] = relax_row(len(trace) - 1)
    result["relaxations"] = len(relaxed)
    result["reused"] = reused  # of them taken from `known`
    result["relaxed"] = dict(relaxed)  # trace index -> relaxed energy (nan: the relaxation failed)
    result["seconds"] = time.perf_counter() - t0
    return result


def first_found(problem: Problem, history: list[dict], tol: float = TOL, window: float = math.inf,
                atoms_of: Callable[[dict], Atoms] | None = None) -> dict | None:
    """`first_in_basin` on a training run's history (rows with 'energy', 'evaluations' and 'actions'): the first
    row in the minimum's basin, without its actions, with its relaxed energy; None if none."""
    from asla.builder import atoms_from_actions
    build = atoms_of or (lambda row: atoms_from_actions(problem, row["actions"]))
    trace = [{"evaluations": row.get("evaluations", n), "seconds": row.get("seconds", 0.0),
              "energy": row["energy"], "atoms": build(row)} for n, row in enumerate(history)]
    found = first_in_basin(problem, trace, tol=tol, window=window)["found"]
    if found is None:
        return None
    row = history[found["trace_index"]]
    return {**{k: v for k, v in row.items() if k != "actions"}, "relaxed_energy": found["relaxed_energy"]}
