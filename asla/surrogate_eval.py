"""Surrogate relaxation as the training loop's evaluate step (issue 22, PRB 102, 075427, 2020).

`SurrogateEvaluation` sits between the finished builds and the real calculator. Once its model has `min_points`
real evaluations, each finished build is relaxed in the model (`asla.surrogate.surrogate_relax`: template fixed,
placed atoms kept in the build region, divergence checks) and one real single point of the relaxed structure is
its reward; before that, builds get plain real single points. The problem's own real relaxation steps are off
while the surrogate is on (the trainer hands the evaluator the problem with ``relax.steps: 0``): the point of the
surrogate is one real evaluation per episode instead of eleven, and a model-relaxed structure relaxed again with
the real calculator would pay both.

What it keeps out of the cache: the evaluator's cache is keyed by the grid build's canonical key, and a
model-relaxed structure depends on the model's state, so relaxed structures are evaluated without a key (never
served from, nor stored in, the cache). Unrelaxed builds (model not ready, or a diverged relaxation that falls back
to the build) are the grid build itself and keep their key.

The model is updated once per batch with every real evaluation of it (the builds of one iteration are relaxed in
the same model, so that a parallel executor evaluates them together). Its data, hyperparameters and the statistics
(model error, fallbacks, time) are one JSON ``state_dict``, saved in the trainer's checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from .problem import Problem
from .reward import EnergyEvaluator, Evaluation, _with_energy
from .surrogate import Prediction, SurrogateConfig, make_surrogate, rank_by_acquisition, surrogate_relax

log = logging.getLogger(__name__)


@dataclass
class SurrogateRecord:
    """What the model did to one finished build before its real evaluation (stored with the evaluation)."""

    relaxed: bool  # the real single point is of a model-relaxed structure (not the grid build)
    predicted: float  # model energy of the structure that was evaluated (nan: the model had no data yet)
    sigma: float  # model uncertainty of it (nan: no data)
    steps: int = 0  # optimiser steps in the model
    reason: str | None = None  # why it was not relaxed, or why the relaxation stopped early
    diverged: bool = False  # the relaxation diverged and fell back (surrogate.fallback)
    screened_out: bool = False  # screening kept it from a real evaluation (only its model energy is known)
    atoms: Atoms | None = field(default=None, repr=False)  # the structure that was (or would have been) evaluated


def _stats() -> dict:
    return {"relaxed": 0, "plain": 0, "screened_out": 0, "fallbacks": 0, "fallback_reasons": {},
            "relax_seconds": 0.0, "fit_seconds": 0.0, "fit_failures": 0, "ready_at_evaluations": None, "errors": []}


class SurrogateEvaluation:
    """The evaluate step with a surrogate: relax builds in the model, evaluate them for real, update the model."""

    def __init__(self, config: SurrogateConfig, problem: Problem) -> None:
        config.validate()
        self.config = config
        self.problem = problem
        self.model = make_surrogate(config, problem)
        self.stats = _stats()
        self.last: dict[str, float] = {}  # this iteration's figures, for TensorBoard

    @property
    def ready(self) -> bool:
        return self.model.is_ready(self.config.min_points)

    def evaluate(self, executor, evaluator: EnergyEvaluator, atoms: Sequence[Atoms],
                 keys: Sequence[tuple[int, ...] | None]) -> tuple[list[Evaluation | None], list[SurrogateRecord]]:
        """Real evaluations of the finished builds `atoms` (each relaxed in the model when it is ready) and what
        the model did to each; then the model learns from the new real evaluations.

        Screening (``screen_candidates`` > 1, model ready): only the ``screen_k`` builds with the lowest
        E - kappa*sigma of their relaxed structures are evaluated; the others get None and a record marked
        ``screened_out`` (GOFEE's "many candidates at model level, one at DFT level")."""
        t0 = time.perf_counter()
        ready = self.ready
        targets, target_keys, records = [], [], []
        # A build made twice in one batch (a settled policy repeats itself) is relaxed and evaluated once; its twin
        # gets a copy, as a cache hit. Evaluated twice, the model-relaxed copies are one structure, which the real
        # calculator does not compute again (ASE keeps its last result): a slot of the batch, and with screening
        # one of its k real evaluations, would go to nothing, and the run's count of evaluations would include it.
        first_of: dict[tuple[int, ...], int] = {}
        twin_of: dict[int, int] = {}
        for i, (a, key) in enumerate(zip(atoms, keys, strict=True)):
            if key is not None and key in first_of:
                twin_of[i] = first_of[key]
                record = dataclasses.replace(records[first_of[key]])
                records.append(record)
                targets.append(record.atoms)
                target_keys.append(target_keys[first_of[key]])
                continue
            if key is not None:
                first_of[key] = i
            if ready:
                record, structure = self._relax(a)
            else:
                record, structure = self._plain(a), a
            record.atoms = structure
            records.append(record)
            targets.append(structure)
            target_keys.append(None if record.relaxed else key)  # a relaxed structure is not the grid build
        chosen = [i for i in range(len(atoms)) if i not in twin_of]
        k = self.config.screen_k
        if ready and self.config.screen_candidates > 1 and len(chosen) > k:
            preds = [Prediction(records[i].predicted, records[i].sigma) for i in chosen]
            chosen = sorted(chosen[j] for j in rank_by_acquisition(preds, self.config.kappa, k))
        relax_seconds = time.perf_counter() - t0
        real = executor.evaluate_many(evaluator, [targets[i] for i in chosen], [target_keys[i] for i in chosen])
        evaluations: list[Evaluation | None] = [None] * len(atoms)
        for i, ev in zip(chosen, real, strict=True):
            evaluations[i] = ev
        for i, j in twin_of.items():
            ev = evaluations[j]
            if ev is not None:
                copy = None if ev.atoms is None else _with_energy(
                    ev.atoms, ev.energy, ev.atoms.calc.results.get("forces") if ev.atoms.calc is not None else None)
                evaluations[i] = dataclasses.replace(ev, n_calls=0, seconds=0.0, cached=True, atoms=copy)
                evaluator.n_cache_hits += 1
        for i, ev in enumerate(evaluations):
            if ev is None:  # screened out, or the twin of a build that was
                records[i].screened_out = True
                self.stats["screened_out"] += 1
        errors = self._record_errors(real, [records[i] for i in chosen], evaluator.n_calls)
        t1 = time.perf_counter()
        fresh = [ev.atoms for ev in real if ev.ok and not ev.cached and ev.atoms is not None]
        try:
            self.model.update(fresh)
        except Exception as exc:  # noqa: BLE001 - a model that cannot fit falls back to plain points, not a crash
            self.stats["fit_failures"] += 1
            log.warning("surrogate update failed (the model keeps its previous fit): %s: %s",
                        type(exc).__name__, str(exc)[:200])
        fit_seconds = time.perf_counter() - t1
        s = self.stats
        s["relax_seconds"] += relax_seconds
        s["fit_seconds"] += fit_seconds
        if s["ready_at_evaluations"] is None and self.ready:
            s["ready_at_evaluations"] = evaluator.n_calls
        self.last = {"seconds": relax_seconds + fit_seconds, "relax_seconds": relax_seconds,
                     "fit_seconds": fit_seconds, "ready": float(self.ready), "points": float(self.model.n_points),
                     "relaxed": float(s["relaxed"]), "fallbacks": float(s["fallbacks"])}
        if errors:
            self.last["model_error"] = float(np.mean(np.abs(errors)))
            self.last["model_error_offset"] = float(np.mean(np.abs(np.array(errors) - self._offset())))
        return evaluations, records

    # -- one build ---------------------------------------------------------------------------------------
    def _relax(self, atoms: Atoms) -> tuple[SurrogateRecord, Atoms]:
        r = surrogate_relax(self.problem, atoms, self.model, **self.config.relax_kwargs())
        if r.diverged:
            self.stats["fallbacks"] += 1
            kind = _reason_kind(r.reason)
            self.stats["fallback_reasons"][kind] = self.stats["fallback_reasons"].get(kind, 0) + 1
            log.info("surrogate relaxation fell back (%s): %s", self.config.fallback, r.reason)
        if r.relaxed:
            self.stats["relaxed"] += 1
        else:
            self.stats["plain"] += 1
        record = SurrogateRecord(r.relaxed, r.energy, r.sigma, r.steps, r.reason, r.diverged)
        return record, (r.atoms if r.relaxed else atoms)

    def _plain(self, atoms: Atoms) -> SurrogateRecord:
        """A build evaluated as it is (model not ready); predicted where the model has data, for the model error."""
        self.stats["plain"] += 1
        energy, sigma = math.nan, math.nan
        if self.model.is_ready(0):
            try:
                pred = self.model.predict(atoms)
                energy, sigma = pred.energy, pred.sigma
            except Exception:  # noqa: BLE001 - a diagnostic only; the build is evaluated anyway
                pass
        return SurrogateRecord(False, energy, sigma, reason=f"model not ready ({self.model.n_points} of "
                               f"min_points={self.config.min_points} real evaluations)")

    def _record_errors(self, evaluations: Sequence[Evaluation], records: Sequence[SurrogateRecord],
                       n_calls: int) -> list[float]:
        """Predicted minus real energy of each structure evaluated for real now (cache hits and failures not)."""
        out = []
        for ev, rec in zip(evaluations, records, strict=True):
            if ev.ok and not ev.cached and math.isfinite(rec.predicted):
                err = rec.predicted - ev.energy
                out.append(err)
                self.stats["errors"].append([n_calls, round(float(rec.predicted), 6), round(float(ev.energy), 6),
                                             bool(rec.relaxed)])
        return out

    def _offset(self) -> float:
        """Median of predicted minus real energy over all predictions so far: the constant between two energy scales.

        A fixed model (`model: calculator`, e.g. CHGNet before GPAW) has its own energy zero, 44 eV off GPAW's on the
        DFT oxide; what matters for relaxing and ranking builds is the error beyond that constant."""
        return float(np.median([p - r for _, p, r, _ in self.stats["errors"]])) if self.stats["errors"] else 0.0

    # -- reports and persistence -------------------------------------------------------------------------
    def summary(self) -> dict:
        """The block of summary.json: readiness, what was relaxed, fallbacks, time, model error."""
        s = self.stats
        err = np.array([p - r for _, p, r, _ in s["errors"]], dtype=float)
        relaxed_err = np.array([p - r for _, p, r, rel in s["errors"] if rel], dtype=float)

        def mae(x: np.ndarray) -> float | None:
            return None if len(x) == 0 else float(np.mean(np.abs(x)))

        return {"model": self.model.name, "min_points": self.config.min_points, "points": self.model.n_points,
                "ready": self.ready, "ready_at_evaluations": s["ready_at_evaluations"], "relaxed": s["relaxed"],
                "plain": s["plain"], "screened_out": s["screened_out"], "fallbacks": s["fallbacks"],
                "fallback_reasons": dict(s["fallback_reasons"]),
                "fit_failures": s["fit_failures"],
                "relax_seconds": s["relax_seconds"], "fit_seconds": s["fit_seconds"],
                "model_error_mae": mae(err), "model_error_mae_last50": mae(err[-50:]),
                "model_error_mae_relaxed": mae(relaxed_err),
                "model_error_offset": float(np.median(err)) if len(err) else None,
                "model_error_mae_offset_corrected": mae(err - np.median(err)) if len(err) else None,
                "predictions": len(err)}

    def log(self, writer, step: int) -> None:
        """This iteration's figures as TensorBoard scalars surrogate/<name>."""
        for name, value in self.last.items():
            writer.add_scalar(f"surrogate/{name}", value, step)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "stats": self.stats}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.stats = {**_stats(), **state["stats"]}


def _reason_kind(reason: str | None) -> str:
    """The check that stopped a relaxation, without its numbers: 'diverged after 3 steps: atoms 4 and 9 at ...'
    counts as 'atoms closer than covalent radii'."""
    text = (reason or "unknown").split(": ", 1)[-1]
    if text.startswith("atoms "):
        return "atoms too close"
    if text.startswith("model energy"):
        return "energy floor"
    if text.startswith("model or optimiser failed"):
        return "model failed"
    return text[:60]
