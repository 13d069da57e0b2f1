"""Where energy evaluations run: in-process, in a local process pool, or on a Ray cluster.

The learner stays in the driver; only finished structures travel to workers, each of which
keeps a warm calculator for its problem. The cache, the evaluation count and the failure log
stay in the driver's EnergyEvaluator, so every executor gives the same results in the same
order as a serial run. A worker that dies has its tasks retried on a fresh one; a structure that kills its
worker on every try becomes a failed evaluation, as a calculator error does.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import multiprocessing as mp
import signal
import time
from collections.abc import Sequence
from typing import Any

from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .errors import CalculatorError, ConfigError
from .problem import Problem, load_problem
from .reward import EnergyEvaluator, Evaluation

log = logging.getLogger(__name__)
EXECUTORS = ("serial", "process", "ray")

# -- worker side ---------------------------------------------------------------------------------
_WORKER: EnergyEvaluator | None = None


def _init_worker(problem_source: dict) -> None:
    global _WORKER
    import os
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a forked worker inherits the driver's signal handlers (Ray's print a stack trace on the SIGTERM with which the
    # pool stops its survivors): a worker simply dies
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _WORKER = EnergyEvaluator(load_problem(problem_source), use_cache=False)


def _evaluate_in_worker(atoms: Atoms) -> Evaluation:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.evaluate(atoms)


# -- driver side ---------------------------------------------------------------------------------

class Executor:
    """Serial evaluation; the base class the parallel executors share."""

    name = "serial"

    def __init__(self, problem: Problem) -> None:
        self.problem = problem

    def run(self, evaluator: EnergyEvaluator, atoms: Sequence[Atoms]) -> list[Evaluation]:
        return [evaluator.evaluate(a) for a in atoms]

    def close(self) -> None:
        pass

    def evaluate_many(self, evaluator: EnergyEvaluator, atoms: Sequence[Atoms],
                      keys: Sequence[tuple[int, ...] | None]) -> list[Evaluation]:
        """Evaluate a batch: cache hits and duplicates within the batch are answered without a worker."""
        results: list[Evaluation | None] = [None] * len(atoms)
        first_of: dict[Any, int] = {}
        todo: list[int] = []
        for i, (a, key) in enumerate(zip(atoms, keys)):
            if key is not None and evaluator.use_cache and key in evaluator.cache:
                results[i] = evaluator.evaluate(a, key)
            elif key is not None and key in first_of:
                continue  # a duplicate within this batch: answered from the cache below
            else:
                if key is not None:
                    first_of[key] = i
                todo.append(i)
        if self.name == "serial":
            fresh = [evaluator.evaluate(atoms[i], keys[i]) for i in todo]
        else:
            fresh = self.run(evaluator, [atoms[i] for i in todo])
            for i, ev in zip(todo, fresh):
                _merge_into(evaluator, atoms[i], keys[i], ev)
        for i, ev in zip(todo, fresh):
            results[i] = ev
        for i, key in enumerate(keys):
            if results[i] is None:
                results[i] = evaluator.evaluate(atoms[i], key)
        return results  # type: ignore[return-value]


def _merge_into(evaluator: EnergyEvaluator, atoms: Atoms, key, ev: Evaluation) -> None:
    """Account a worker's evaluation in the driver: count, cache, failure log (failures/), and the problem's fault
    policy for a structure whose worker died (a calculator error under ``faults.on_error: raise`` is raised in the
    worker already)."""
    evaluator.n_calls += ev.n_calls
    evaluator.n_structures += 1
    if evaluator.use_cache and key is not None:
        evaluator.cache[key] = ev.energy if ev.ok else math.nan
    if not ev.ok:
        evaluator._record_failure(atoms, ev.error or "unknown failure")  # same package
        if ev.error and ev.error.startswith(WORKER_DIED) and evaluator.problem.faults.on_error == "raise":
            raise CalculatorError(ev.error)


WORKER_DIED = "the evaluation worker died"


def _lost(atoms: Atoms, error: str, seconds: float) -> Evaluation:
    """A structure that killed its worker, as a failed evaluation: energy nan (the worst reward), one evaluation
    spent (the calculator ran, as for a calculator that raised)."""
    a = atoms.copy()
    a.calc = SinglePointCalculator(a, energy=math.nan)
    return Evaluation(energy=math.nan, ok=False, n_calls=1, seconds=seconds, error=error, atoms=a)


def _context() -> mp.context.BaseContext:
    """fork where the platform has it: workers start fast and scripts need no __main__ guard.

    Workers only run calculators, never torch, so forking a process that used torch is safe here.
    """
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


class ProcessExecutor(Executor):
    """A local process pool; each worker holds a warm calculator. Dead workers are replaced."""

    name = "process"

    def __init__(self, problem: Problem, workers: int = 2, max_retries: int = 2) -> None:
        super().__init__(problem)
        self.workers = int(workers)
        self.max_retries = max_retries
        self.pool: cf.ProcessPoolExecutor | None = None

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self.pool is None:
            self.pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=_context(),
                                               initializer=_init_worker, initargs=(self.problem.to_dict(),))
        return self.pool

    def run(self, evaluator: EnergyEvaluator, atoms: Sequence[Atoms]) -> list[Evaluation]:
        """All structures on the pool at once. If a worker dies (a segfault or SIGKILL inside the calculator), every
        unfinished task of the pool is lost with it and which structure killed it is unknown: those left are then
        evaluated one at a time on a fresh pool, each tried up to 1 + max_retries times, and a structure that
        kills its worker every time becomes a failed evaluation (`_lost`) like a calculator error."""
        results: dict[int, Evaluation] = {}
        pool = self._pool()
        futures = {pool.submit(_evaluate_in_worker, atoms[i]): i for i in range(len(atoms))}
        for fut in cf.as_completed(futures):
            try:
                results[futures[fut]] = fut.result()
            except cf.process.BrokenProcessPool:
                pass
        pending = [i for i in range(len(atoms)) if i not in results]
        if pending:
            log.warning("a worker died (%s); evaluating %d structure(s) one at a time on a fresh pool",
                        self._discard_pool(), len(pending))
            for i in pending:
                results[i] = self._alone(atoms[i])
        return [results[i] for i in range(len(atoms))]

    def _alone(self, atoms: Atoms) -> Evaluation:
        """One structure on its own on the pool (so that a death is its own), retried on fresh pools."""
        t0 = time.perf_counter()
        how = "unknown cause"
        for _ in range(self.max_retries + 1):
            try:
                return self._pool().submit(_evaluate_in_worker, atoms).result()
            except cf.process.BrokenProcessPool:
                how = self._discard_pool()
        return _lost(atoms, f"the evaluation worker died ({how}) on this structure, {self.max_retries + 1} times",
                     time.perf_counter() - t0)

    def _discard_pool(self) -> str:
        """Shut a broken pool down; how its worker died ('SIGSEGV', 'exit status 1'), as far as can be told.

        The pool's own manager thread reaps its workers, so an exit code read before that thread is done can still
        be unset: the workers are taken first (shutdown drops them), and read once shutdown has waited for it."""
        pool, self.pool = self.pool, None
        if pool is None:
            return "unknown cause"
        workers = list((getattr(pool, "_processes", None) or {}).values())  # the pool exposes no exit codes
        pool.shutdown(wait=True, cancel_futures=True)
        codes = []
        for proc in workers:
            proc.join(5.0)
            codes.append(proc.exitcode)
        # the pool terminates the survivors itself (SIGTERM, seen as -15 or, under load, exit status 15): the
        # culprit is a death by another signal, else another non-zero status
        deaths = [c for c in codes if c is not None and c not in (0, -signal.SIGTERM, signal.SIGTERM)]
        code = next((c for c in deaths if c < 0), deaths[0] if deaths else None)
        if code is None:
            return "unknown cause"
        try:
            return signal.Signals(-code).name if code < 0 else f"exit status {code}"
        except ValueError:
            return f"signal {-code}"

    def pids(self) -> list[int]:
        return list(self._pool()._processes) if self.pool else []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


class RayExecutor(Executor):
    """Ray actors holding warm calculators; the same config runs on a laptop or a cluster."""

    name = "ray"

    def __init__(self, problem: Problem, workers: int = 2, address: str | None = None, max_retries: int = 2) -> None:
        super().__init__(problem)
        try:
            import ray
        except ImportError:
            raise ConfigError("executor", "'ray' needs Ray: pip install 'asla[distributed]'") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = max(1, int(workers))
            ray.init(**kwargs)

        @ray.remote(max_restarts=max_retries, max_task_retries=max_retries)
        class _Worker:
            def __init__(self, source: dict) -> None:
                _init_worker(source)

            def evaluate(self, atoms: Atoms) -> Evaluation:
                return _evaluate_in_worker(atoms)

            def pid(self) -> int:
                import os
                return os.getpid()

        self.actors = [_Worker.remote(problem.to_dict()) for _ in range(int(workers))]

    def run(self, evaluator: EnergyEvaluator, atoms: Sequence[Atoms]) -> list[Evaluation]:
        refs = [self.actors[i % len(self.actors)].evaluate.remote(a) for i, a in enumerate(atoms)]
        return list(self.ray.get(refs))

    def pids(self) -> list[int]:
        return list(self.ray.get([a.pid.remote() for a in self.actors]))

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def make_executor(problem: Problem, executor: str = "serial", workers: int = 1,
                  ray_address: str | None = None) -> Executor:
    if executor not in EXECUTORS:
        raise ConfigError("executor", f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if executor == "process":
        return ProcessExecutor(problem, workers)
    if executor == "ray":
        return RayExecutor(problem, workers, None if ray_address in (None, "local") else ray_address)
    return Executor(problem)
