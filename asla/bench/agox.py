"""AGOX's searches as benchmark methods: adapters (problem -> AGOX configuration, confinement box, a serial GOFEE)
and the patches AGOX 3.11 needs on ASE 3.29 and numpy 2.4.

rss, bh and gofee are built from AGOX's own algorithm configurations for a template + confinement box and run
with the problem's calculator wrapped in asla.counting.CountingCalculator, so they are counted as every method is.
A run keeps AGOX's database and the ledger's state in its work dir and continues from them after a kill
(`run_agox`): a DFT GOFEE run (hours) outlasts one working session.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asla.problem import Problem
from asla.storage import atomic_write_text

if TYPE_CHECKING:
    from asla.bench.methods import RunContext

AGOX_METHODS = ("rss", "bh", "gofee")


def prepare_agox(method: str) -> None:
    """Import AGOX (patched), and for GOFEE start Ray and its pool, before a run's clock starts."""
    patch_agox()
    import agox.algorithms.basin_hopping  # imported off the clock
    import agox.algorithms.gofee  # imported off the clock
    import agox.algorithms.rss  # noqa: F401 - imported off the clock
    if method == "gofee":
        start_ray_for_agox()
        warm_agox_pool()


def patch_ase_for_agox() -> None:
    """AGOX 3.11 imports IndexedConstraint and slice2enlist from ase.constraints, which ASE 3.29 keeps only in
    ase.constraints.constraint: re-export them (the same objects). Also run in AGOX's Ray workers (setup hook)."""
    import ase.constraints as constraints
    if not hasattr(constraints, "IndexedConstraint"):
        from ase.constraints.constraint import IndexedConstraint, slice2enlist
        constraints.IndexedConstraint = IndexedConstraint
        constraints.slice2enlist = slice2enlist


def patch_agox() -> None:
    """Make AGOX 3.11.1 run on ASE 3.29 and numpy 2.4 (its requirements are unpinned): the ASE re-export above,
    and GPR._log_marginal_likelihood_gradient returning its log likelihood as the scalar the hyperparameter
    optimiser takes (it returns a length-1 array, which numpy 2.4 no longer converts with float(); the
    gradient-free variant already sums it to a scalar). Also run in AGOX's Ray workers (setup hook)."""
    patch_ase_for_agox()
    from agox.models.GPR.GPR import GPR
    original = GPR._log_marginal_likelihood_gradient
    if getattr(original, "asla_patched", False):
        return

    def log_marginal_likelihood_gradient(self: Any, theta: np.ndarray) -> tuple[Any, np.ndarray]:
        log_p, grad = original(self, theta)
        return np.sum(log_p), grad

    log_marginal_likelihood_gradient.asla_patched = True
    GPR._log_marginal_likelihood_gradient = log_marginal_likelihood_gradient


def start_ray_for_agox(tmp_dir: Path | None = None) -> None:
    """Start Ray with one CPU before AGOX does, so its GPR (which always joins a Ray pool) gets one worker.

    AGOX's GPR model is a Ray pool user whatever its settings: it starts Ray on first use, with a pool of one
    actor per CPU. One CPU keeps the search to one computing process at a time (the actor optimises the GPR
    hyperparameters while the driver waits) on this machine of about one core. The workers get the ASE
    patches of `patch_agox` through a setup hook, imported from the installed package (no PYTHONPATH). Its files
    go to `tmp_dir`, by default $ASLA_BENCH_RAY_TMP or /tmp/asla-bench-ray (Ray's socket paths must stay short).
    """
    import ray
    if ray.is_initialized():
        return
    tmp_dir = tmp_dir or Path(os.environ.get("ASLA_BENCH_RAY_TMP", "/tmp/asla-bench-ray"))
    tmp_dir.mkdir(parents=True, exist_ok=True)
    context = ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2, _temp_dir=str(tmp_dir.resolve()),
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                                       "MKL_NUM_THREADS": "1"},
                          "worker_process_setup_hook": "asla.bench.agox.patch_agox"})
    atexit.register(_stop_ray, context.address_info.get("session_dir"))


def warm_agox_pool() -> None:
    """Start AGOX's Ray pool and wait until its actor answers, before a run's clock starts.

    The pool lives as long as the process, and its actor's start (a fresh Python worker importing AGOX: about a
    minute here) was charged to the first GOFEE run of each process only; off the clock, every seed pays alike.
    """
    import ray
    from agox.utils.ray.pool_startup import get_ray_pool

    pool, _ = get_ray_pool()
    ray.get([actor.execute_function.remote(int, []) for actor in pool.idle_actors])


def _stop_ray(session_dir: str | None) -> None:
    import shutil

    import ray
    ray.shutdown()
    if session_dir:
        shutil.rmtree(session_dir, ignore_errors=True)
        latest = Path(session_dir).parent / "session_latest"
        if latest.is_symlink() and not latest.exists():
            latest.unlink()
        with contextlib.suppress(OSError):
            Path(session_dir).parent.rmdir()  # only if nothing else is left there


def confinement(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """AGOX confinement box over the build region: the cell in-plane, the build layers' heights with a margin.

    Below the lowest layer 0.5 A; above the highest 1.0 A on a template (room for an adatom on top),
    0.5 A for a free sheet (a thin slab around its plane).
    """
    zs = problem.grid.layer_z
    below, above = 0.5, (1.0 if len(problem.template) else 0.5)
    zlo, zhi = min(zs) - below, max(zs) + above
    cell = np.array(problem.cell, dtype=float)
    box = np.array([cell[0], cell[1], [0.0, 0.0, zhi - zlo]])
    box[:2, 2] = 0.0
    return box, np.array([0.0, 0.0, zlo])


def agox_algorithm(method: str, problem: Problem, calculator: Any, seed: int, path: Path,
                   quick: bool = False) -> Any:  # an AGOX Algorithm (agox is imported lazily)
    """An AGOX Algorithm (AGOX's own configuration classes and defaults) for this problem.

    rss: RandomStructureSearch (random generator, BFGS local optimisation to fmax 0.05 or 100 steps).
    bh: BasinHopping (rattle generator: 25% of the atoms within 3 A; Metropolis at 0.25 eV; same relaxation).
    gofee: GOFEE (global GPR on the fingerprint descriptor with a repulsive prior; KMeans sampler; 10 candidates
    per iteration from random then 20% random / 80% rattle generators; surrogate relaxation of the candidates
    in the lower-confidence-bound (kappa 2) acquisition potential; the chosen one is evaluated with the real
    calculator as a single point plus one BFGS step, both stored: 2 evaluations per iteration). AGOX runs
    GOFEE's candidate generation and surrogate relaxations on Ray workers; here they run serially in this
    process (same modules, same settings), because this machine has about one core and benchmarks run one process.
    """
    patch_agox()
    from agox.algorithms.basin_hopping import BasinHopping, BasinHoppingConfig
    from agox.algorithms.config import ProblemConfig, RunConfig
    from agox.algorithms.config.module.generator_config import RandomGeneratorConfig
    from agox.algorithms.config.module.postprocess_config import SerialRelaxerConfig
    from agox.algorithms.rss import RandomSearchConfig, RandomStructureSearch

    box, corner = confinement(problem)
    template = problem.empty_atoms()
    symbols = "".join(f"{s}{n}" for s, n in problem.bag.items())
    prob = ProblemConfig(template=template, symbols=symbols, confinement_cell=box, confinement_corner=corner,
                         calculator=calculator, fix_template=True)
    run = RunConfig(seed=seed, path=str(path), id_str=f"{method}-{seed}")
    # AGOX's surface examples place random atoms anywhere in the box (contiguous=False); a free sheet grows as one
    # piece.
    random_gen = RandomGeneratorConfig(contiguous=not len(problem.template))
    if method == "rss":
        return RandomStructureSearch.create(algorithm=RandomSearchConfig(generator=random_gen), problem=prob, run=run)
    if method == "bh":
        return BasinHopping.create(algorithm=BasinHoppingConfig(), problem=prob, run=run)
    if method == "gofee":
        start_ray_for_agox()  # if not yet
        cls = _serial_gofee_class()
        cfg = cls.CONFIG()
        # --quick: a smoke run of the same modules, lighter (4 candidates, 20 surrogate relaxation steps)
        relaxer = SerialRelaxerConfig(max_steps=20 if quick else cfg.relaxer.max_steps, fmax=cfg.relaxer.fmax,
                                      start_relax=cfg.relaxer.start_relax)
        collector = cfg.collector.with_updates(generators=[random_gen, cfg.collector.generators[1]],
                                               candidates=4 if quick else cfg.collector.candidates)
        cfg = cfg.with_updates(relaxer=relaxer, collector=collector)
        return cls.create(algorithm=cfg, problem=prob, run=run)
    raise ValueError(f"not an AGOX method: {method}")


_SERIAL_GOFEE = None


def _serial_gofee_class() -> type:
    """AGOX's GOFEE with its collector and surrogate relaxer run serially instead of on Ray."""
    global _SERIAL_GOFEE
    if _SERIAL_GOFEE is not None:
        return _SERIAL_GOFEE
    from agox.algorithms.algorithm import Algorithm
    from agox.algorithms.factory.generator_factory import GeneratorContext, generator_factory
    from agox.algorithms.gofee import GOFEE
    from agox.collectors import StandardCollector

    class SerialGOFEE(GOFEE):
        KIND = "gofee_serial_asla_benchmark"

        def __init__(self, algorithm_config: Any, problem_cfg: Any, run_config: Any) -> None:
            Algorithm.__init__(self, algorithm=algorithm_config, problem=problem_cfg, run=run_config)
            self._cpu_count = 1

        def _make_collector(self, cfg: Any, order: Any, sampler: Any = None, model: Any = None) -> Any:
            ctx = GeneratorContext(environment=self.get_environment(), model=model, database=self.get_database())
            generators = [generator_factory(g, ctx) for g in cfg.generators]
            n = cfg.candidates  # as AGOX's ParallelCollector factory with strict candidate counts
            num = {step: [int(n * f // sum(fr)) for f in fr] for step, fr in cfg.generator_fractions.items()}
            for counts in num.values():
                counts[-1] += n - sum(counts)
            return StandardCollector(generators=generators, sampler=sampler, environment=self.get_environment(),
                                     num_candidates=num, order=order)

    _SERIAL_GOFEE = SerialGOFEE
    return SerialGOFEE


STATE_FILE = "agox-state.json"  # beside AGOX's database in the work dir: what a resumed run continues from
# At most one state write per this many seconds of search: a write (the trace's structures as JSON) took 2.6 s of a
# 29 s EMT basin-hopping run of 3000 evaluations when made after each of its 40 iterations; a DFT iteration takes
# minutes, so each one is saved. A kill loses the search since the last write (redone, counted once).
SAVE_EVERY_S = 10.0


def run_agox(ctx: RunContext) -> None:
    """`_run_agox` holding the work dir's lock (asla.lock, as a training run holds its run dir's): two processes
    resuming one saved state would both spend the rest of its budget and write one database."""
    from asla.lock import RunLock
    # Absolute: AGOX runs inside its own directory (run_directory), so a work dir given relative to the caller's
    # (`--results docs/...`, as the docs' commands do) would put the saved state below itself, where no resume looks.
    ctx = dataclasses.replace(ctx, work_dir=ctx.work_dir.resolve())
    with RunLock(ctx.work_dir):
        _run_agox(ctx)


def _run_agox(ctx: RunContext) -> None:
    """Run AGOX's `ctx.method` on the problem until the ledger's budget (or its stop rule) ends it; resumable.

    The work dir keeps AGOX's own database (sqlite, every stored candidate) and, written after a database update
    (at most every SAVE_EVERY_S), the ledger's state with the iteration and the database's row count (STATE_FILE).
    A run started on a work dir that has both (same method, seed, budget, --quick) continues: rows written after
    the last state are dropped (their evaluations are not in its count), the database is loaded back into memory
    (AGOX's restore_to_memory), its observers (model training, sampler) are run on it once as after a database
    update, the ledger goes on from the saved count, trace and clock, AGOX's iteration counter from the next
    iteration, and numpy's random stream is reseeded from (seed, iteration). The evaluations made after the last
    write (the iteration in flight at the kill; on a fast calculator up to SAVE_EVERY_S of search) are redone, and
    each evaluation the record counts is counted once (a DFT GOFEE kill loses at most one iteration, 2
    evaluations). A resumed run is not bit-identical to an uncut one (the model is refit, the random stream
    differs); the record's notes say it was resumed. A run killed after its budget was spent (e.g. while judging)
    searches nothing again.

    Why: AGOX keeps every evaluated structure in its database and refits its model and sampler from the whole
    database after each update, so the database is the search's state; AGOX has no resume of its own (its run
    loop starts a fresh State at iteration 1), hence the saved iteration and the restored observers here.
    """
    from agox.algorithms.algorithm import run_directory

    from asla.calculators import make_calculator
    from asla.counting import CountingCalculator, EvaluationBudgetExhausted
    problem = ctx.problem.load()  # AGOX relaxes with its own evaluator: no ASLA recipe overrides
    outcome = ctx.outcome
    ledger = outcome.ledger
    run_key = {"method": ctx.method, "seed": ctx.seed, "budget": ledger.budget, "quick": bool(ctx.quick)}
    saved = _saved_state(ctx.work_dir, run_key)
    if saved is None:  # a fresh start: an unusable earlier start's database goes (AGOX would append to it)
        for stale in [ctx.work_dir / STATE_FILE, *ctx.work_dir.glob("db-*.db")]:
            stale.unlink(missing_ok=True)
    else:
        _resume_ledger(outcome, saved)
        if not saved.get("finished") and not ledger.stopped and ledger.ask_stop_rule_again():
            outcome.notes.append(f"found before the kill (improvement at {ledger.limit} evaluations, asked again "
                                 "on resume): not searched further")
            return
    if saved is not None and saved.get("finished"):  # killed after the budget was spent: nothing left to search
        outcome.settings.update(saved["settings"])
        return
    calculator = CountingCalculator(make_calculator(problem.calculator), ledger=outcome.ledger)
    alg = agox_algorithm(ctx.method, problem, calculator, ctx.seed, ctx.work_dir, ctx.quick)
    box, corner = confinement(problem)
    outcome.settings.update({"agox_config": _plain(alg.algorithm_cfg.model_dump()),
                             "confinement_cell": box.tolist(), "confinement_corner": corner.tolist()})
    state_path = ctx.work_dir / STATE_FILE
    resumes = saved["resumes"] if saved else []
    database = None  # AGOX's, opened in the work dir (its file name is relative) by _make_agox

    last_save = [time.perf_counter()]

    def save(iteration: int | None, finished: bool = False) -> None:  # atomic: a kill leaves the old state or the new
        if not finished and time.perf_counter() - last_save[0] < SAVE_EVERY_S:
            return
        last_save[0] = time.perf_counter()
        settings = {**outcome.settings, "iterations": iteration}
        state = {"run": run_key, "iteration": iteration, "rows": _rows(database), "finished": finished,
                 "stopped": ledger.stopped, "resumes": resumes, "settings": settings, "ledger": ledger.state_dict()}
        atomic_write_text(state_path, json.dumps(state, separators=(",", ":")))  # compact: the trace's structures

    agox_run = None
    first = saved["iteration"] + 1 if saved else 1
    try:
        # appended on a resume: the log of the earlier sessions stays
        with open(ctx.work_dir / "agox.log", "a" if saved else "w") as log, contextlib.redirect_stdout(log), \
                run_directory(alg.get_path()):
            agox_run = alg._make_agox()  # what Algorithm.run does, minus its configuration printout
            database = alg.get_database()
            _ledger_saver(save).attach(database)
            if saved is not None:
                _restore_database(database, saved)
                np.random.seed([ctx.seed, first])  # not the first session's stream again (AGOX seeded it)
            with _iterations_from(first):
                agox_run.run(N_iterations=10**9)
    except EvaluationBudgetExhausted:
        if database is not None:  # a kill while judging (hours of DFT relaxations) then redoes no search
            save(database.get_iteration_counter(), finished=True)  # None if it stored nothing (as settings say)
        raise
    finally:
        if agox_run is not None:
            atexit.unregister(agox_run.on_failure)  # a budget stop is not a failed AGOX run
        if database is not None:
            outcome.settings["iterations"] = database.get_iteration_counter()


def _saved_state(work_dir: Path, run_key: dict) -> dict | None:
    """The work dir's saved state if it is this run's (same method, seed, budget, --quick) and readable, else None."""
    try:
        saved = json.loads((work_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("run") == run_key else None


def _resume_ledger(outcome: Any, saved: dict) -> None:
    """The ledger (count, best energy, trace, clock) and the stop flag as saved; a note for the record."""
    ledger = outcome.ledger
    ledger.load_state_dict(saved["ledger"])
    ledger.stopped = bool(saved["stopped"])
    outcome.resumed_seconds = float(saved["ledger"]["seconds"])  # run_method's clock goes on from here, as the ledger's
    saved["resumes"].append({"evaluations": ledger.count, "seconds": round(outcome.resumed_seconds, 1),
                             "iteration": saved["iteration"]})
    outcome.notes.append(f"resumed from its work dir at {ledger.count} evaluations, {outcome.resumed_seconds:.0f} s, "
                         f"after AGOX iteration {saved['iteration']} (resume {len(saved['resumes'])}): its model and "
                         "sampler (where it has them) refit from its database, the random stream reseeded, so not "
                         "bit-identical to an uncut run")


def _rows(database: Any) -> int:
    """The id of the database's last stored row (0 when empty): the rows a saved state covers."""
    row = database.con.execute("SELECT max(id) FROM structures").fetchone()
    return int(row[0] or 0)


def _restore_database(database: Any, saved: dict) -> None:
    """Load the saved rows back (AGOX's restore_to_memory) and run the database's observers once on them.

    Rows past the saved state's are deleted first: they were written in the instant between AGOX's commit and the
    state's write, so their evaluations are not in the saved count; their iteration is run again. The observers
    (the model's training, the sampler's setup) then see the database as after the last saved iteration.
    """
    from agox.main.state import State
    con = database.con
    for table in ("structures", "text_key_values", "float_key_values", "int_key_values", "boolean_key_values",
                  "other_key_values"):
        con.execute(f"DELETE FROM {table} WHERE id > ?", (int(saved["rows"]),))  # fixed table names (AGOX's schema)
    con.commit()
    database.restore_to_memory()
    if len(database):
        state = State()
        state.set_iteration_counter(int(saved["iteration"]))
        database.dispatch_to_observers(database=database, state=state)


@contextlib.contextmanager
def _iterations_from(first: int) -> Iterator[None]:
    """AGOX's run loop counting iterations from `first` (it starts a State at 1, with no option for another)."""
    import importlib
    main = importlib.import_module("agox.main.agox")  # the module (agox.main also exports a name agox)
    original = main.State

    def state() -> Any:
        s = original()
        s.set_iteration_counter(first)
        return s

    main.State = state
    try:
        yield
    finally:
        main.State = original


def _ledger_saver(save: Callable[[int], None]) -> Any:
    """An AGOX observer of the database that calls save(iteration) after each update, before the model trains.

    First among the database's observers (order -1e9), so the state is written right after AGOX's commit, not
    after the model's training (seconds, during which a kill would leave rows the state does not cover).
    """
    from agox.observer import Observer

    class LedgerSaver(Observer):
        name = "AslaLedgerSaver"

        def __init__(self) -> None:
            super().__init__(order=-1e9)
            self.add_observer_method(self.save, sets={}, gets={}, order=-1e9, handler_identifier="database")

        @Observer.observer_method
        def save(self, database: Any, state: Any) -> None:
            save(state.get_iteration_counter())

    return LedgerSaver()


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, np.generic):
        return x.item()
    return type(x).__name__
