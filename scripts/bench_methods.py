"""The search methods of the benchmark (scripts/benchmark.py), each counted by the same calculator wrapper.

Every method gets the problem's calculator wrapped in asla.counting.CountingCalculator, charged to one
ledger with the run's budget: the ledger counts evaluations (geometries at which energy/forces were
computed, relaxation steps included), stops the search when the budget is spent, and keeps the trace of
improvements of the lowest energy computed (evaluations, wall seconds, energy, structure). Whether and
when a run found the global minimum is decided afterwards from that trace by the basin criterion
(`first_in_basin`), the same for every method.

Methods: asla (from scratch, the problem's recipe), asla-transfer (fine-tuned from a pretrained agent),
asla-zeroshot (a pretrained agent builds, no training), random (uniformly random legal builds on the same
grid with the same rules and evaluation: the floor), and AGOX's rss (random structure search with local
relaxation), bh (basin hopping) and gofee (GPR-surrogate Bayesian search), built with AGOX's own
algorithm configurations for a template + confinement box.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asla import load_problem
from asla.basin import in_basin, relaxed_energy
from asla.counting import EvaluationBudgetExhausted, Ledger, close_ledger, counting_spec, open_ledger
from asla.problem import Problem
from asla.storage import write_json

ASLA_METHODS = ("asla", "asla-transfer", "asla-zeroshot", "random")
AGOX_METHODS = ("rss", "bh", "gofee")
METHODS = ASLA_METHODS + AGOX_METHODS
TRAINING_METHODS = ("asla", "asla-transfer")
LABELS = {"asla": "ASLA (scratch)", "asla-transfer": "ASLA (transfer)", "asla-zeroshot": "ASLA (pretrained, zero-shot)",
          "random": "random builder (floor)", "rss": "AGOX RSS + relaxation", "bh": "AGOX basin hopping",
          "gofee": "AGOX GOFEE"}
# Transfer and zero-shot agents come from another problem (an agent on its own training problem proves nothing):
# the 5x5 cell from the 3x3 agent, the 3x3 cell from the 5x5 agent, the 2x2 cell from the 3x3 agent. The graphene
# agents cannot cross calculators: the xTB and Tersoff cells differ in lattice constant, so their pixels differ.
TRANSFER_SOURCE = {"pd100-oxide-5x5": "pd100-oxide-3x3"}
ZERO_SHOT_AGENT = {"pd100-oxide-5x5": "pd100-oxide-3x3", "pd100-oxide-3x3": "pd100-oxide-5x5",
                   "pd100-oxide-2x2": "pd100-oxide-3x3"}
ZERO_SHOT_EPSILON = 0.1
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHECKPOINT_EVERY = 200  # episodes between a training run's checkpoints: a killed benchmark resumes from the last
LEDGER_FILE = "ledger.json"
BUILD_BATCH = 8          # builds per batch for the random floor and zero-shot (as ASLA's n_builders)
STALL_BATCHES = 200      # batches without a new evaluation: every build is a cache hit; stop


class Skipped(Exception):
    """The method cannot run on this problem (e.g. no pretrained agent shipped yet); recorded, not failed."""


@dataclass
class Outcome:
    ledger: Ledger
    wall_seconds: float
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed_seconds: float = 0.0  # wall seconds the run had spent before it was resumed from a checkpoint


def recipe_overrides(name: str) -> dict:
    """The problem overrides of ASLA's recipe (e.g. ten relaxation steps before the reward on Pd)."""
    from asla.agents.config import load_config
    return dict(load_config(str(CONFIGS / f"{name}.yaml"), [])["problem_overrides"])


def run_method(method: str, name: str, seed: int, budget: int, work_dir: Path, quick: bool = False,
               checkpoint_every: int = CHECKPOINT_EVERY,
               stop_when: Callable[[Any, float], bool] | None = None) -> Outcome:
    """Run one (method, problem, seed) with `budget` evaluations; the ledger holds what it did.

    `stop_when(atoms, energy)`, asked on each improvement of the best energy, ends the run early when True
    (e.g. once it has found the minimum: `FoundCheck`); its own time is kept off the run's clock."""
    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    prepare(method)  # one-off costs of the process (imports, Ray) stay out of the run's wall time
    # Named by the run, not at random: a training run's config (and so its checkpoint) names its ledger.
    ledger_name = f"bench-{name}-{method}-s{seed}"
    # A training run stops itself at the end of the batch that spends the budget (max_evaluations), so that it
    # ends cleanly and its agent is saved; the few evaluations past the budget are counted but never judged.
    ledger = open_ledger(ledger_name, limit=None if method in TRAINING_METHODS else budget)
    ledger.budget = budget
    ledger.stop_when = stop_when
    work_dir.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(ledger=ledger, wall_seconds=0.0)
    t0 = time.perf_counter()
    try:
        runner: Callable[..., None] = {"asla": _asla, "asla-transfer": _asla_transfer, "asla-zeroshot": _zero_shot,
                                       "random": _random_floor, "rss": _agox, "bh": _agox, "gofee": _agox}[method]
        try:
            runner(method=method, name=name, seed=seed, ledger_name=ledger_name, work_dir=work_dir,
                   outcome=outcome, quick=quick, checkpoint_every=checkpoint_every)
        except EvaluationBudgetExhausted:
            pass
    finally:
        outcome.wall_seconds = time.perf_counter() - t0 - ledger.paused_seconds + outcome.resumed_seconds
        close_ledger(ledger_name)
    if ledger.stopped:
        outcome.notes.append(f"stopped at {ledger.count} evaluations: its best structure relaxed into the minimum's "
                             f"basin (checked on each improvement, {ledger.paused_seconds:.1f} s off the clock)")
    return outcome


def prepare(method: str) -> None:
    """Import what `method` needs (and start Ray for GOFEE) before its clock starts."""
    if method in AGOX_METHODS:
        patch_agox()
        import agox.algorithms.basin_hopping  # noqa: F401
        import agox.algorithms.gofee  # noqa: F401
        import agox.algorithms.rss  # noqa: F401
        if method == "gofee":
            start_ray_for_agox()
            warm_agox_pool()
    else:
        import asla.agents.agent  # noqa: F401
        import asla.agents.training  # noqa: F401


# ---- ASLA and the random floor ----------------------------------------------------------------------

def _counting_problem(name: str, ledger_name: str) -> Problem:
    overrides = recipe_overrides(name)
    base = load_problem(name, **overrides)
    return load_problem(name, **{**overrides, "calculator": counting_spec(base.calculator, ledger_name)})


def _asla_config(name: str, seed: int, budget: int | None, ledger_name: str,
                 checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    from asla.agents.config import load_config
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), [
        f"seed={seed}", "episodes=100000000", "log_images_every=100000000", "record_evaluations=false",
        f"checkpoint_every={checkpoint_every}", "executor=serial", *([f"max_evaluations={budget}"] if budget else [])])
    base = load_problem(name, **cfg["problem_overrides"])
    cfg["problem_overrides"] = {**cfg["problem_overrides"], "calculator": counting_spec(base.calculator, ledger_name)}
    return cfg


def _train(cfg: dict, work_dir: Path, outcome: Outcome, init_from: str | None = None) -> None:
    """Train until the budget; a run killed midway resumes from its last checkpoint, ledger and clock included."""
    from asla.agents.training import train
    outcome.settings.update({"recipe": f"configs/{cfg['problem']}.yaml", "problem_overrides":
                             {k: v for k, v in cfg["problem_overrides"].items() if k != "calculator"},
                             "n_builders": cfg["n_builders"], "init_from": init_from, "executor": "serial",
                             "stop": "max_evaluations: at the end of the batch that spends the budget; evaluations past it are not judged"})
    run_dir, ledger = work_dir / "asla", outcome.ledger

    def save_ledger(checkpoint: Path) -> None:
        write_json(checkpoint / LEDGER_FILE, ledger.state_dict())

    saved = _checkpointed_ledger(run_dir)
    if saved is not None and saved["budget"] == ledger.budget:
        ledger.load_state_dict(saved)  # its clock goes on from the seconds already run; run_method's too:
        outcome.resumed_seconds = float(saved["seconds"])
        outcome.notes.append(f"resumed from its checkpoint at {ledger.count} evaluations, "
                             f"{outcome.resumed_seconds:.0f} s")
        train(None, run_dir=run_dir, resume=True, progress=False, on_checkpoint=save_ledger)
        return
    if run_dir.exists():  # a start without a usable checkpoint (or for another budget): start afresh
        shutil.rmtree(run_dir)
    train(cfg, run_dir=run_dir, init_from=init_from, progress=False, on_checkpoint=save_ledger)


def _checkpointed_ledger(run_dir: Path) -> dict | None:
    from asla.agents.training import latest_checkpoint
    checkpoint = latest_checkpoint(run_dir)
    try:
        return json.loads((checkpoint / LEDGER_FILE).read_text()) if checkpoint else None
    except (OSError, ValueError):
        return None


def _asla(*, name: str, seed: int, ledger_name: str, work_dir: Path, outcome: Outcome,
          checkpoint_every: int = CHECKPOINT_EVERY, **_: Any) -> None:
    _train(_asla_config(name, seed, outcome.ledger.budget, ledger_name, checkpoint_every), work_dir, outcome)


def pretrained_source(method: str, name: str) -> str:
    """The path of the agent from another problem that `method` (asla-transfer or asla-zeroshot) starts from on
    problem `name`; Skipped (with the reason the report shows) when there is none."""
    sources = TRANSFER_SOURCE if method == "asla-transfer" else ZERO_SHOT_AGENT
    if name not in sources:
        what = "transfer source" if method == "asla-transfer" else "pretrained agent from another problem"
        raise Skipped(f"skipped: no {what} for {name} ({method} is "
                      f"{', '.join(f'{v} -> {k}' for k, v in sources.items())})")
    return _pretrained(sources[name])


def _pretrained(agent_name: str) -> str:
    from asla.agents.agent import resolve_agent_path

    from asla.errors import CheckpointError
    try:
        return str(resolve_agent_path(agent_name))
    except CheckpointError:
        raise Skipped(f"skipped: no pretrained agent {agent_name}") from None


def _asla_transfer(*, name: str, seed: int, ledger_name: str, work_dir: Path, outcome: Outcome,
                   checkpoint_every: int = CHECKPOINT_EVERY, **_: Any) -> None:
    path = pretrained_source("asla-transfer", name)
    _train(_asla_config(name, seed, outcome.ledger.budget, ledger_name, checkpoint_every), work_dir, outcome,
           init_from=path)


def _zero_shot(*, name: str, seed: int, ledger_name: str, outcome: Outcome, **_: Any) -> None:
    from asla.agents.agent import Agent

    from asla.reward import EnergyEvaluator
    agent_name = ZERO_SHOT_AGENT.get(name)
    agent = Agent.load(pretrained_source("asla-zeroshot", name))
    problem = _counting_problem(name, ledger_name)
    evaluator = EnergyEvaluator(problem)
    outcome.settings.update({"agent": agent_name, "epsilon": ZERO_SHOT_EPSILON, "batch": BUILD_BATCH,
                             "problem_overrides": recipe_overrides(name)})
    _until_stalled(outcome, lambda batch: agent.build(problem, n=BUILD_BATCH, greedy=False, epsilon=ZERO_SHOT_EPSILON,
                                                      seed=seed * 1_000_003 + batch, evaluator=evaluator))


def _random_floor(*, name: str, seed: int, ledger_name: str, outcome: Outcome, **_: Any) -> None:
    from asla.builder import random_build
    from asla.reward import EnergyEvaluator
    problem = _counting_problem(name, ledger_name)
    evaluator = EnergyEvaluator(problem)
    rng = np.random.default_rng(10_000 + seed)
    outcome.settings.update({"builder": "uniformly random legal actions (asla.builder.random_build)",
                             "problem_overrides": recipe_overrides(name), "cache": "symmetry-equivalent builds cost 0"})

    def batch(_: int) -> None:
        for _ in range(BUILD_BATCH):
            state = random_build(problem, rng)
            if state.done:
                evaluator.evaluate(state.atoms(), key=state.canonical_key())
    _until_stalled(outcome, batch)


def _until_stalled(outcome: Outcome, step: Callable[[int], Any]) -> None:
    """Call step(batch) until the budget stops it, or until builds stop costing anything (all cached)."""
    ledger, idle, batch = outcome.ledger, 0, 0
    while idle < STALL_BATCHES:
        before = ledger.count
        step(batch)
        batch += 1
        idle = idle + 1 if ledger.count == before else 0
    outcome.notes.append(f"stopped after {batch} batches: {STALL_BATCHES} batches in a row were all cache hits")


# ---- AGOX -------------------------------------------------------------------------------------------

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

    def log_marginal_likelihood_gradient(self, theta):  # noqa: ANN001, ANN202
        log_p, grad = original(self, theta)
        return np.sum(log_p), grad

    log_marginal_likelihood_gradient.asla_patched = True
    GPR._log_marginal_likelihood_gradient = log_marginal_likelihood_gradient


def _import_agox() -> None:
    patch_agox()


def start_ray_for_agox(tmp_dir: Path | None = None) -> None:
    """Start Ray with one CPU before AGOX does, so its GPR (which always joins a Ray pool) gets one worker.

    AGOX's GPR model is a Ray pool user whatever its settings: it starts Ray on first use, with a pool of one
    actor per CPU. One CPU keeps the search to one computing process at a time (the actor optimises the GPR
    hyperparameters while the driver waits) on this machine of about one core. The workers get the ASE
    patches of `patch_agox` through a setup hook. Its files go to `tmp_dir`, by default $ASLA_BENCH_RAY_TMP or
    /tmp/asla-bench-ray (Ray's socket paths must stay short).
    """
    import ray
    if ray.is_initialized():
        return
    tmp_dir = tmp_dir or Path(os.environ.get("ASLA_BENCH_RAY_TMP", "/tmp/asla-bench-ray"))
    here = str(Path(__file__).resolve().parent)
    pythonpath = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    context = ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2, _temp_dir=str(tmp_dir.resolve()),
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1",
                                       "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                          "worker_process_setup_hook": "bench_methods.patch_agox"})
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


def agox_algorithm(method: str, problem: Problem, calculator: Any, seed: int, path: Path, quick: bool = False):
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
    _import_agox()
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
    # AGOX's surface examples place random atoms anywhere in the box (contiguous=False); a free sheet grows as one piece.
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
        cfg = cfg.with_updates(relaxer=SerialRelaxerConfig(max_steps=20 if quick else cfg.relaxer.max_steps,
                                                           fmax=cfg.relaxer.fmax, start_relax=cfg.relaxer.start_relax),
                               collector=cfg.collector.with_updates(generators=[random_gen, cfg.collector.generators[1]],
                                                                    candidates=4 if quick else cfg.collector.candidates))
        return cls.create(algorithm=cfg, problem=prob, run=run)
    raise ValueError(f"not an AGOX method: {method}")


_SERIAL_GOFEE = None


def _serial_gofee_class():
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

        def __init__(self, algorithm_config, problem_cfg, run_config) -> None:  # noqa: ANN001
            Algorithm.__init__(self, algorithm=algorithm_config, problem=problem_cfg, run=run_config)
            self._cpu_count = 1

        def _make_collector(self, cfg, order, sampler=None, model=None):  # noqa: ANN001, ANN202
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


def _agox(*, method: str, name: str, seed: int, ledger_name: str, work_dir: Path, outcome: Outcome, quick: bool,
          **_: Any) -> None:
    from asla.calculators import make_calculator
    from asla.counting import CountingCalculator
    problem = load_problem(name)  # AGOX relaxes with its own evaluator: no ASLA recipe overrides
    calculator = CountingCalculator(make_calculator(problem.calculator), ledger=outcome.ledger)
    alg = agox_algorithm(method, problem, calculator, seed, work_dir, quick)
    box, corner = confinement(problem)
    outcome.settings.update({"agox_config": _plain(alg.algorithm_cfg.model_dump()),
                             "confinement_cell": box.tolist(), "confinement_corner": corner.tolist()})
    log_path = work_dir / "agox.log"
    agox_run = None
    from agox.algorithms.algorithm import run_directory
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


# ---- the basin criterion on a run's trace ---------------------------------------------------------------

def structure_key(atoms: Any) -> bytes:
    """Identity of a structure for reusing its relaxation: species, positions and cell, exactly."""
    return b"".join(np.ascontiguousarray(a).tobytes() for a in (atoms.numbers, atoms.positions, atoms.cell[:]))


class FoundCheck:
    """A `stop_when` for run_method: True once an improvement relaxes into the minimum's basin (the criterion
    of `first_in_basin`, asked of the improvements within `window` eV). A run stopped by it contributes the same
    first hit to the success curves as the run to the end of its budget would: the curves need only that.
    Its relaxed energies (`relaxed`, by `structure_key`) are handed to `first_in_basin`, which would otherwise
    relax the same structures again offline.

    As offline, a descent (improvements moving no atom more than 0.5 A: the steps of one local relaxation) is
    judged by its start, at once, and by its lowest point, once the descent has ended, i.e. at the next improvement
    that starts elsewhere; its steps in between are not relaxed. RSS and basin hopping improve the best at every
    step of a relaxation (60-140 per run on the xTB graphene): relaxing each took 15-20 min per run there, against
    16-230 s for the descents' ends. A hit that only a descent's later steps reach stops the run late (or not at
    all); the record's first hit is still the offline judgement's."""

    def __init__(self, problem: Problem, tol: float = 0.05, window: float = 5.0) -> None:
        self.problem, self.tol, self.window = problem, tol, window
        self.relaxed: dict[bytes, float] = {}
        self._descent: Any = None  # the lowest point so far of the current descent

    def _hit(self, atoms: Any) -> bool:
        key = structure_key(atoms)
        if key not in self.relaxed:
            self.relaxed[key] = relaxed_energy(self.problem, atoms)
        return in_basin(self.relaxed[key], self.problem.reference_energy, self.tol)

    def __call__(self, atoms: Any, energy: float) -> bool:
        ref = self.problem.reference_energy
        if ref is None or energy > ref + self.window:
            return False
        ended, self._descent = self._descent, atoms
        if ended is not None and _small_move(ended, atoms):
            return False  # a step of the same descent: judged by its lowest point when the descent ends
        return (ended is not None and self._hit(ended)) or self._hit(atoms)


def _small_move(a: Any, b: Any, max_move: float = 0.5) -> bool:
    """No atom moved more than `max_move` A between two structures (optimisers step at most 0.2 A; a new
    structure moves atoms further)."""
    return len(a) == len(b) and float(np.abs(b.positions - a.positions).max()) <= max_move


def _same_descent(a: dict, b: dict, max_move: float = 0.5) -> bool:
    """Consecutive evaluations with small moves (`_small_move`): steps of one local relaxation."""
    return b["evaluations"] == a["evaluations"] + 1 and _small_move(a["atoms"], b["atoms"], max_move)


def first_in_basin(problem: Problem, trace: list[dict], tol: float = 0.05, window: float = 5.0,
                   known: dict[bytes, float] | None = None) -> dict:
    """First improvement of a run's best energy whose structure relaxes into the global minimum's basin.

    The criterion is asla.basin's (relax with the problem's calculator, template fixed; within `tol` eV of the
    reference), applied to the trace rows within `window` eV of the reference. To bound the offline cost, an
    uninterrupted descent (rows at consecutive evaluations with small moves: the steps of one local
    relaxation that kept improving the best) is examined from its start only if its last, lowest row relaxes
    into the basin; otherwise the whole descent is taken to lie outside it. `known` relaxed energies (by
    `structure_key`, e.g. a FoundCheck's from the run itself) are reused, not recomputed.
    """
    ref = problem.reference_energy
    t0 = time.perf_counter()
    relaxed: dict[int, float] = {}
    known = known or {}
    reused = 0

    def relax_row(i: int) -> float:
        nonlocal reused
        if i not in relaxed:
            key = structure_key(trace[i]["atoms"])
            reused += key in known
            relaxed[i] = known[key] if key in known else relaxed_energy(problem, trace[i]["atoms"])
        return relaxed[i]

    def hit(i: int) -> bool:
        return in_basin(relax_row(i), ref, tol)

    result: dict[str, Any] = {"found": None}
    if ref is not None and trace:
        candidates = [i for i, row in enumerate(trace) if row["energy"] <= ref + window]
        segments: list[list[int]] = []
        for i in candidates:
            if segments and i == segments[-1][-1] + 1 and _same_descent(trace[i - 1], trace[i]):
                segments[-1].append(i)
            else:
                segments.append([i])
        for seg in segments:
            if hit(seg[-1]):
                first = next(i for i in seg if hit(i))
                row = trace[first]
                result["found"] = {"evaluations": row["evaluations"], "seconds": row["seconds"],
                                   "energy": row["energy"], "relaxed_energy": relaxed[first], "trace_index": first}
                break
        last = len(trace) - 1
        result["best_relaxed_energy"] = relax_row(last)
    result["relaxations"] = len(relaxed)
    result["reused"] = reused  # of them taken from `known`
    result["relaxed"] = dict(relaxed)  # trace index -> relaxed energy (nan: the relaxation failed)
    result["seconds"] = time.perf_counter() - t0
    return result
