"""Counting energy evaluations in the calculator itself, so every search method is counted alike.

Search codes count differently (ASLA counts structures plus relaxation steps, AGOX counts
database entries, basin hopping counts relaxations). Wrapping the one calculator they all call
makes the count a property of the calculator: one evaluation is one geometry at which energy
and/or forces were actually computed (energy and forces together count once; a repeated request
at an unchanged geometry is answered from the cache and costs nothing).

A :class:`Ledger` is the account those calls are charged to. Several calculator instances may
share one (a search that rebuilds its calculator after a failure keeps counting), it can carry a
budget (the call that spends it raises :class:`EvaluationBudgetExhausted` once its result is
recorded, and any later call before computing), and it keeps the trace of improvements of the lowest energy
computed so far — the raw material of a success curve.

In a problem YAML or dict the wrapper is an import-path calculator::

    calculator: {name: "asla.counting:CountingCalculator", inner: {name: emt}, ledger: my-run}

where ``my-run`` names a ledger opened in the same process with :func:`open_ledger`.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from .errors import ProblemError

SPEC_NAME = "asla.counting:CountingCalculator"


class EvaluationBudgetExhausted(BaseException):
    """The ledger's budget is spent: raised by the call that spends it (after recording it) and by any later call.

    A BaseException, not an Exception, because search codes catch Exception from the calculator
    as a failed structure and go on (ASLA's evaluator and AGOX's evaluators do): a budget stop
    must end the search, not be recorded as one more failure.
    """


@dataclass
class Ledger:
    """Evaluations charged so far, an optional budget, and the trace of improvements of the best energy."""

    limit: int | None = None  # evaluations after which the wrapped calculator stops the search
    budget: int | None = None  # the run's budget, for a search that stops itself (a training run) where limit is None
    keep_trace: bool = True
    count: int = 0
    best_energy: float = math.inf
    trace: list[dict] = field(default_factory=list)  # evaluations, seconds, energy, atoms
    t0: float = field(default_factory=time.perf_counter)
    # Asked on each improvement (plain atoms, energy): True ends the search after this evaluation, as a spent
    # budget does. A benchmark stops a run once it has found what it looks for; the time the predicate takes
    # (e.g. an offline relaxation) is kept off the clock, so it does not count as the search's time.
    stop_when: Callable[[Atoms, float], bool] | None = None
    stopped: bool = False
    paused_seconds: float = 0.0  # wall seconds spent in stop_when in this process, off the clock

    @property
    def seconds(self) -> float:
        """Wall seconds since the ledger was opened (or `restart_clock`)."""
        return time.perf_counter() - self.t0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.count >= self.limit

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def state_dict(self) -> dict:
        """What a resumed search needs to go on counting where it stopped (JSON-able; atoms as plain arrays)."""
        trace = [{"evaluations": r["evaluations"], "seconds": r["seconds"], "energy": r["energy"],
                  "numbers": r["atoms"].numbers.tolist(), "positions": r["atoms"].positions.tolist(),
                  "cell": r["atoms"].cell.array.tolist(), "pbc": r["atoms"].pbc.tolist()} for r in self.trace]
        return {"limit": self.limit, "budget": self.budget, "count": self.count, "seconds": self.seconds,
                "best_energy": self.best_energy if math.isfinite(self.best_energy) else None, "trace": trace}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`: the count, the best energy, the trace, and the clock (seconds run so far)."""
        self.limit, self.budget, self.count = state["limit"], state["budget"], int(state["count"])
        self.best_energy = math.inf if state["best_energy"] is None else float(state["best_energy"])
        self.trace = [{"evaluations": r["evaluations"], "seconds": r["seconds"], "energy": r["energy"],
                       "atoms": Atoms(numbers=r["numbers"], positions=r["positions"], cell=r["cell"], pbc=r["pbc"],
                                      info={"evaluations": r["evaluations"]})}
                      for r in state["trace"]]
        self.t0 = time.perf_counter() - float(state["seconds"])

    def ask_stop_rule_again(self) -> bool:
        """Ask `stop_when` of the improvements restored by `load_state_dict`, in order, as they were asked when they
        came; True (stopped, the limit at the hit) at the first hit.

        For a resumed search: the process that found them may have had no stop rule (a DFT run started without
        --stop-when-found and resumed with it) or may have been killed while judging one; otherwise they were no
        hits, and on DFT problems their judge relaxations are kept (asla.bench.judge.resumable_relaxations), so
        asking again costs nothing. The time it takes is off the clock, as in `observe`."""
        if self.stop_when is None:
            return False
        for row in self.trace:
            if self._ask_stop_rule(row["atoms"], float(row["energy"])):
                self.stopped, self.limit = True, int(row["evaluations"])
                return True
        return False

    def charge(self) -> None:
        if self.exhausted:
            raise EvaluationBudgetExhausted(f"budget of {self.limit} evaluations spent")
        self.count += 1

    def observe(self, atoms: Atoms, energy: float) -> None:
        """Record `atoms` if its energy improves the best so far (plain Atoms: no calculator, no constraints)."""
        if not (math.isfinite(energy) and energy < self.best_energy - 1e-9):
            return
        self.best_energy = float(energy)
        plain = Atoms(numbers=atoms.numbers.copy(), positions=atoms.positions.copy(), cell=atoms.cell.copy(),
                      pbc=atoms.pbc.copy(), info={"evaluations": self.count})  # stop rules tell descents by it
        if self.keep_trace:
            self.trace.append({"evaluations": self.count, "seconds": self.seconds, "energy": float(energy),
                               "atoms": plain})
        if self.stop_when is not None and self._ask_stop_rule(plain, float(energy)):
            self.stopped = True
            self.limit = self.count  # exhausted: the wrapping calculator raises after recording this one

    def _ask_stop_rule(self, atoms: Atoms, energy: float) -> bool:
        """`stop_when(atoms, energy)`, its time kept off the clock (`paused_seconds`)."""
        t = time.perf_counter()
        with _alarm_suspended():
            hit = bool(self.stop_when(atoms, energy))
        pause = time.perf_counter() - t
        self.t0 += pause
        self.paused_seconds += pause
        return hit


@contextlib.contextmanager
def _alarm_suspended() -> Iterator[None]:
    """The wall-clock limit of the evaluation this runs inside (reward.EnergyEvaluator's SIGALRM, faults.timeout)
    stopped meanwhile and re-armed with the time it had left. A stop rule runs inside the evaluation that made the
    improvement, and on a DFT problem it relaxes with GPAW for an hour: under the evaluation's 900 s limit every
    such judgement was killed (DFT seed 0's hit at evaluation 94, docs/dft.md)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # SIGALRM limits are armed in the main thread only
        return
    left, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if left > 0:
            signal.setitimer(signal.ITIMER_REAL, left, interval)


_LEDGERS: dict[str, Ledger] = {}


def open_ledger(name: str, limit: int | None = None, keep_trace: bool = True) -> Ledger:
    """A fresh ledger that calculators built from a spec with ``ledger: name`` charge in this process."""
    ledger = Ledger(limit=limit, keep_trace=keep_trace)
    _LEDGERS[name] = ledger
    return ledger


def close_ledger(name: str) -> Ledger | None:
    return _LEDGERS.pop(name, None)


def counting_spec(inner: dict, ledger: str) -> dict:
    """A problem ``calculator`` section that wraps `inner` and charges the ledger named `ledger`."""
    return {"name": SPEC_NAME, "inner": dict(inner), "ledger": ledger}


class CountingCalculator(Calculator):
    """An ASE calculator that forwards to `inner` and counts the geometries it actually computes.

    `inner` is a calculator or a calculator spec (as in a problem's ``calculator`` section);
    `ledger` a :class:`Ledger`, the name of one opened with :func:`open_ledger`, or None for a
    private one. ``.count`` is this instance's evaluations, ``.ledger.count`` the shared total.
    """

    def __init__(self, inner: Calculator | dict, ledger: Ledger | str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(inner, dict):
            from .calculators import make_calculator
            inner = make_calculator(inner)
        self.inner = inner
        if isinstance(ledger, str):
            if ledger not in _LEDGERS:
                raise ProblemError("calculator.ledger", f"no counting ledger named {ledger!r} is open in this process; "
                                   "open it with asla.counting.open_ledger (and evaluate serially)")
            ledger = _LEDGERS[ledger]
        self.ledger = ledger if ledger is not None else Ledger(keep_trace=False)
        self.count = 0
        self.implemented_properties = list(inner.implemented_properties)

    def calculate(self, atoms: Atoms | None = None, properties: Any = ("energy",),
                  system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        wanted = list(dict.fromkeys(["energy", "forces", *properties]))  # energy and forces: one evaluation
        wanted = [p for p in wanted if p in self.inner.implemented_properties]
        required = getattr(self.inner, "calculation_required", None)
        try:
            computes = required is None or bool(required(self.atoms, wanted))
        except AttributeError:  # GPAW 26 (gpaw.new) raises this before its first calculation: nothing to reuse
            computes = True
        if computes:
            self.ledger.charge()  # raises before computing once the budget is spent
            self.count += 1
        for name in wanted:
            self.inner.get_property(name, self.atoms)
        self.results = dict(self.inner.results)
        if computes and "energy" in self.results:
            self.ledger.observe(self.atoms, float(self.results["energy"]))
        if computes and self.ledger.exhausted:
            # The evaluation that spends the budget is counted and traced, then the search stops at once
            # rather than after more (uncounted but timed) work towards an evaluation it may not make.
            raise EvaluationBudgetExhausted(f"budget of {self.ledger.limit} evaluations spent")
