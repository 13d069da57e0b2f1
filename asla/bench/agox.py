"""AGOX's searches as benchmark methods: adapters (problem -> AGOX configuration, confinement box, a serial GOFEE)
and the patches AGOX 3.11 needs on ASE 3.29 and numpy 2.4.

rss, bh and gofee are built from AGOX's own algorithm configurations for a template + confinement box and run
with the problem's calculator wrapped in asla.counting.CountingCalculator, so they are counted as every method is.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from asla.problem import Problem

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


def run_agox(ctx: RunContext) -> None:
    """Run AGOX's `ctx.method` on the problem until the ledger's budget (or its stop rule) ends it."""
    from agox.algorithms.algorithm import run_directory

    from asla.calculators import make_calculator
    from asla.counting import CountingCalculator
    problem = ctx.problem.load()  # AGOX relaxes with its own evaluator: no ASLA recipe overrides
    outcome = ctx.outcome
    calculator = CountingCalculator(make_calculator(problem.calculator), ledger=outcome.ledger)
    alg = agox_algorithm(ctx.method, problem, calculator, ctx.seed, ctx.work_dir, ctx.quick)
    box, corner = confinement(problem)
    outcome.settings.update({"agox_config": _plain(alg.algorithm_cfg.model_dump()),
                             "confinement_cell": box.tolist(), "confinement_corner": corner.tolist()})
    log_path = ctx.work_dir / "agox.log"
    agox_run = None
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), run_directory(alg.get_path()):
            agox_run = alg._make_agox()  # what Algorithm.run does, minus its configuration printout
            agox_run.run(N_iterations=10**9)
    finally:
        if agox_run is not None:
            atexit.unregister(agox_run.on_failure)  # a budget stop is not a failed AGOX run
        outcome.settings["iterations"] = alg.get_database().get_iteration_counter()


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
