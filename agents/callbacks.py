"""Callbacks for the training loop, after Stable-Baselines3's ``BaseCallback``.

A callback sees the run at fixed points of each iteration and may stop it, add files to a checkpoint or
measure it, without the loop knowing what it does. The stop rules of a recipe are callbacks too
(``max_evaluations`` builds `MaxEvaluations`, ``stop_at_reference`` builds `StopAtReference`), so that a
benchmark's budget, a found-check or a test's simulated kill are all the same kind of thing.

Hooks, in the order a run calls them::

    on_training_start()
    per iteration:
        on_iteration_start() -> bool       False: stop before this iteration's builds (nothing checkpointed)
        on_rollout_end(builds)             every build of the iteration, dead ends included
        on_evaluated(builds, atoms, evaluations)   the finished builds, the structures sent to the calculator
                                           and what came back (energy nan when failed)
        on_iteration_end() -> bool         False: stop after this iteration (see `checkpoint_on_stop`)
        on_checkpoint(directory)           add files before the checkpoint is published
    on_training_end()

Every hook can read the trainer (``self.trainer``: its ``state``, ``evaluator``, ``replay``, ``problem``,
``cfg``, ``run_dir``) but should not change what the loop learns from: a run with a callback that stops
nothing must be the run without it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ase import Atoms

    from asla.builder import BuildState
    from asla.reward import Evaluation

    from .training import Trainer


class BaseCallback:
    """No-op hooks; override the ones you need. Return False from the two iteration hooks to stop the run.

    `checkpoint_on_stop`: whether the trainer publishes a last checkpoint when this callback stops it at an
    iteration's end (True for a budget or a found structure, whose end state should be kept; False to stop as a
    kill would, for kill-and-resume tests).
    """

    checkpoint_on_stop: bool = True

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def init_callback(self, trainer: Trainer) -> None:
        """Called once the trainer's parts exist (after a resume has loaded them), before training starts."""
        self.trainer = trainer

    def on_training_start(self) -> None:
        pass

    def on_iteration_start(self) -> bool:
        return True

    def on_rollout_end(self, builds: list[BuildState]) -> None:
        pass

    def on_evaluated(self, builds: list[BuildState], atoms: list[Atoms], evaluations: list[Evaluation]) -> None:
        pass

    def on_iteration_end(self) -> bool:
        return True

    def on_checkpoint(self, directory: Path) -> None:
        pass

    def on_training_end(self) -> None:
        pass


class CallbackList(BaseCallback):
    """Several callbacks as one. Every callback is asked at every hook (a stop by one does not silence the others);
    the run stops when any of them says so, and `stopped_by` names the first that did."""

    def __init__(self, callbacks: Iterable[BaseCallback]) -> None:
        super().__init__()
        self.callbacks = list(callbacks)
        self.stopped_by: BaseCallback | None = None

    @property
    def checkpoint_on_stop(self) -> bool:  # type: ignore[override] - a property here, a class attribute elsewhere
        return self.stopped_by is None or self.stopped_by.checkpoint_on_stop

    def init_callback(self, trainer: Trainer) -> None:
        super().init_callback(trainer)
        for cb in self.callbacks:
            cb.init_callback(trainer)

    def on_training_start(self) -> None:
        for cb in self.callbacks:
            cb.on_training_start()

    def on_iteration_start(self) -> bool:
        return self._all("on_iteration_start")

    def on_rollout_end(self, builds: list[BuildState]) -> None:
        for cb in self.callbacks:
            cb.on_rollout_end(builds)

    def on_evaluated(self, builds: list[BuildState], atoms: list[Atoms], evaluations: list[Evaluation]) -> None:
        for cb in self.callbacks:
            cb.on_evaluated(builds, atoms, evaluations)

    def on_iteration_end(self) -> bool:
        return self._all("on_iteration_end")

    def on_checkpoint(self, directory: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(directory)

    def on_training_end(self) -> None:
        for cb in self.callbacks:
            cb.on_training_end()

    def _all(self, hook: str) -> bool:
        keep_going = True
        for cb in self.callbacks:
            if not getattr(cb, hook)():
                keep_going = False
                if self.stopped_by is None:
                    self.stopped_by = cb
        return keep_going


# ---- stop rules ------------------------------------------------------------------------------------

class MaxEvaluations(BaseCallback):
    """Stop at the end of the iteration that spends `budget` calculator evaluations (the recipe's
    ``max_evaluations``). The whole batch is evaluated, so a run may end up to n_builders - 1 structures past it;
    a run resumed with its budget spent does no further iteration."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = int(budget)

    def _left(self) -> bool:
        assert self.trainer is not None
        return self.trainer.evaluator.n_calls < self.budget

    def on_iteration_start(self) -> bool:
        return self._left()

    def on_iteration_end(self) -> bool:
        return self._left()


class StopAtReference(BaseCallback):
    """Stop at the end of the iteration in which a build reaches the problem's reference energy (exactly when it is
    on the grid, within 0.05 eV when it is relaxed; the recipe's ``stop_at_reference``; the trainer records when in
    ``state.found_reference_at``)."""

    def on_iteration_end(self) -> bool:
        assert self.trainer is not None
        return self.trainer.state.found_reference_at is None


class StopAfterEpisodes(BaseCallback):
    """Stop once `episodes` episodes are done, without a last checkpoint: the run ends as a kill at that point
    would, and a resume redoes the episodes since the last regular checkpoint (kill-and-resume tests)."""

    checkpoint_on_stop = False

    def __init__(self, episodes: int) -> None:
        super().__init__()
        self.episodes = int(episodes)

    def on_iteration_end(self) -> bool:
        assert self.trainer is not None
        return self.trainer.state.episodes < self.episodes


# ---- checkpoint files and measurements ----------------------------------------------------------------

class CheckpointHook(BaseCallback):
    """Call `fn(directory)` on each checkpoint before it is published, so that a caller's own state (a benchmark's
    evaluation ledger) resumes together with the trainer's. ``train(on_checkpoint=fn)`` is this callback."""

    def __init__(self, fn: Callable[[Path], None]) -> None:
        super().__init__()
        self.fn = fn

    def on_checkpoint(self, directory: Path) -> None:
        self.fn(directory)


class ThroughputProbe(BaseCallback):
    """What the calculator did and how long the iterations took, for throughput reports.

    `evaluated` holds (structure, seconds, calculator calls) for each structure the calculator evaluated (cache
    hits left out), the structures themselves only if `keep_structures` (a report times the calculator alone on
    them afterwards). `iterations` holds (episodes done, seconds of the iteration) per iteration. The buckets of
    the loop itself (rollout, calculator, learn, logging, checkpoint) are the trainer's ``state.timing``.
    """

    def __init__(self, keep_structures: bool = True) -> None:
        super().__init__()
        self.keep_structures = keep_structures
        self.evaluated: list[tuple[Any, float, int]] = []
        self.iterations: list[tuple[int, float]] = []
        self._t0 = 0.0

    def on_iteration_start(self) -> bool:
        self._t0 = time.perf_counter()
        return True

    def on_evaluated(self, builds: list[BuildState], atoms: list[Atoms], evaluations: list[Evaluation]) -> None:
        for a, ev in zip(atoms, evaluations, strict=True):
            if not ev.cached:
                self.evaluated.append((a if self.keep_structures else None, float(ev.seconds), int(ev.n_calls)))

    def on_iteration_end(self) -> bool:
        assert self.trainer is not None
        self.iterations.append((self.trainer.state.episodes, time.perf_counter() - self._t0))
        return True

    @property
    def calculator_seconds(self) -> float:
        """Seconds the calculator itself spent on the evaluated structures (no cache, database or replay)."""
        return float(sum(s for _, s, _ in self.evaluated))


def from_config(cfg: dict) -> list[BaseCallback]:
    """The stop rules a recipe asks for, as callbacks (``max_evaluations``, ``stop_at_reference``)."""
    callbacks: list[BaseCallback] = []
    if cfg.get("max_evaluations") is not None:
        callbacks.append(MaxEvaluations(cfg["max_evaluations"]))
    if cfg.get("stop_at_reference"):
        callbacks.append(StopAtReference())
    return callbacks
