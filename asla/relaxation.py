"""A local relaxation that survives the machine: resumable step by step, from files meant to be committed.

One GPAW relaxation of the 20-atom DFT oxide takes 12-56 BFGS steps of about a minute each here, longer than what a
working session or a shared machine grants. ASE's optimisers can restart (BFGS's restart file holds its Hessian),
but neither ASE nor AGOX keeps a relaxation's state where it outlives the machine; this module writes, after every
step, a small checkpoint to a folder KEEP (the last evaluated frame with energy and forces, BFGS's restart state,
the counts) and resumes from it on the same path as a relaxation never cut (tests/test_dft_reference.py).
The per-machine WORK folder (an ASE trajectory, BFGS's live restart file, the calculator's text log) is preferred
when it is still there; without it, KEEP is enough.

Used by `scripts/dft_reference.py` (the DFT reference minimum) and by the benchmark judge on DFT problems
(`asla.bench.judge.resumable_relaxations`).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io import read
from ase.optimize import BFGS

from asla.calculators import make_calculator
from asla.problem import Problem
from asla.storage import atomic_write_text, write_json, write_structures


def last_frame(traj: Path) -> tuple[Atoms | None, int]:
    """The last readable frame of an ASE trajectory and the number of readable frames (a frame cut off by a kill
    is skipped)."""
    if not traj.exists() or traj.stat().st_size == 0:
        return None, 0
    from ase.io.trajectory import Trajectory
    frames = 0
    atoms = None
    try:
        with Trajectory(str(traj)) as t:
            for a in t:
                atoms, frames = a, frames + 1
    except Exception:  # noqa: BLE001 - a truncated last frame (ULM raises several kinds); keep what read
        pass
    return atoms, frames


def scf_errors() -> tuple[type[Exception], ...]:
    """The exceptions of an SCF that did not converge (GPAW's), retried with the problem's retry_settings."""
    try:
        from gpaw import ConvergenceError
    except ImportError:
        return ()
    return (ConvergenceError,)


class Checkpoint:
    """One relaxation's resume state in KEEP, written atomically after every step: `<name>.extxyz` (the last
    evaluated frame, energy and forces), `<name>.bfgs.json` (ASE's BFGS restart file: Hessian, previous positions
    and forces, maximum step), `<name>.progress.json` (evaluations, steps, seconds, resumes, retries)."""

    def __init__(self, keep: Path, name: str) -> None:
        self.frame, self.bfgs, self.progress = (keep / f"{name}{ext}" for ext in (".extxyz", ".bfgs.json",
                                                                                  ".progress.json"))

    def exists(self) -> bool:
        return self.frame.exists() and self.progress.exists()

    def save(self, atoms: Atoms, progress: dict, bfgs: Path) -> None:
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces())
        write_structures(self.frame, [frame])
        if bfgs.exists():
            atomic_write_text(self.bfgs, bfgs.read_text())
        write_json(self.progress, progress)

    def remove(self) -> None:
        for path in (self.frame, self.bfgs, self.progress):
            path.unlink(missing_ok=True)


@dataclass
class Relaxation:
    """What a resumable relaxation ended with: the structure (its calculator holds the last evaluation), whether
    BFGS converged, the SCF error that stopped it (None: none), and the counts (evaluations, steps, seconds over
    all sessions, resumes, retries)."""

    atoms: Atoms
    converged: bool
    error: str | None
    progress: dict = field(default_factory=dict)


def relax_resumable(problem: Problem, start: Atoms, name: str, work: Path, keep: Path, fmax: float = 0.05,
                    steps: int = 1000, log: Callable[[str], None] = print) -> Relaxation:
    """Relax `start` with the problem's calculator (BFGS, template fixed), resuming from WORK's trajectory, or
    else from the checkpoint in KEEP; an SCF that does not converge is retried per the problem's `faults`."""
    work.mkdir(parents=True, exist_ok=True)
    traj = work / f"{name}.traj"
    bfgs = work / f"{name}.bfgs.json"  # BFGS's own restart file, read by BFGS when it exists
    checkpoint = Checkpoint(keep, name)
    progress_path = work / f"{name}.progress.json"
    atoms = start.copy()
    resumed, n_frames = last_frame(traj)
    if resumed is None and checkpoint.exists():  # WORK is gone (another machine): the committed checkpoint
        progress = json.loads(checkpoint.progress.read_text())
        resumed = read(checkpoint.frame)
        if checkpoint.bfgs.exists():
            atomic_write_text(bfgs, checkpoint.bfgs.read_text())
        progress["resumes"] += 1
        log(f"{name}: resuming from the checkpoint {checkpoint.frame} (step {progress['steps']})")
    else:
        progress = json.loads(progress_path.read_text()) if progress_path.exists() else \
            {"evaluations": 0, "steps": 0, "seconds": 0.0, "resumes": 0, "retries": 0}
        if resumed is not None:
            progress["resumes"] += 1
            progress["steps"] = n_frames - 1  # one frame per step after the first (ASE writes no frame twice)
            log(f"{name}: resuming from frame {n_frames} of {traj}")
    if resumed is not None:
        atoms.positions = resumed.positions
    atoms.set_constraint(FixAtoms(indices=range(len(problem.template))))
    settings = dict(problem.calculator)
    t_start = time.time() - progress["seconds"]

    def count() -> None:
        progress["steps"] = steps_before + opt.nsteps
        progress["evaluations"] += 1
        progress["seconds"] = time.time() - t_start
        write_json(progress_path, progress)
        checkpoint.save(atoms, progress, bfgs)

    converged, error = False, None
    for attempt in range(problem.faults.retries + 1):
        if attempt:
            settings = {**settings, **problem.faults.retry_settings}
            progress["retries"] += 1
            log(f"{name}: {error}; retry {attempt} with {problem.faults.retry_settings}")
        calc = make_calculator({**settings, "txt": str(work / f"{name}.gpaw.txt")} if settings["name"] == "gpaw"
                               else settings)
        atoms.calc = calc
        steps_before = progress["steps"]
        opt = BFGS(atoms, trajectory=str(traj), append_trajectory=True, logfile=str(work / f"{name}.log"),
                   restart=str(bfgs))
        opt.attach(count, interval=1)
        try:
            if last_frame(traj)[1]:  # ASE neither writes nor observes the first frame of an appended trajectory
                atoms.get_forces()  # the resumed frame's evaluation, counted here; BFGS reuses it
                count()
            converged = bool(opt.run(fmax=fmax, steps=max(steps - steps_before, 0)))
            progress["steps"] = steps_before + opt.nsteps
            error = None
            break
        except scf_errors() as exc:  # an SCF that does not converge; anything else is a bug and stops the run
            progress["steps"] = steps_before + opt.nsteps
            error = f"{type(exc).__name__}: {exc}"
            write_json(progress_path, progress)
    progress["seconds"] = time.time() - t_start
    return Relaxation(atoms=atoms, converged=converged, error=error, progress=progress)
