"""The search methods of the benchmark, each one small function behind one interface, counted alike.

Every method gets the problem's calculator wrapped in asla.counting.CountingCalculator, charged to one ledger
with the run's budget: the ledger counts evaluations (geometries at which energy/forces were computed,
relaxation steps included), stops the search when the budget is spent, and keeps the trace of improvements of
the lowest energy computed (evaluations, wall seconds, energy, structure). Whether and when a run found the
global minimum is decided afterwards from that trace by asla.bench.judge, the same for every method.

A method is a `Method`: a label for the report, whether it trains (and so checkpoints beside its record; AGOX's
searches keep their database and ledger there too, asla.bench.agox.run_agox), what it
imports off the clock, and `run(ctx)`, which searches until the ledger stops it. Methods: asla (from scratch,
the problem's recipe), asla-transfer (fine-tuned from a pretrained agent of another problem), asla-zeroshot (a
pretrained agent builds, no training), asla-surrogate and asla-transfer-surrogate (those two trainings with the
problem's surrogate recipe: each build relaxed in a model, one real single point per episode), random (uniformly
random legal builds on the same grid with the same rules and evaluation: the floor), and AGOX's rss, bh and gofee
(asla.bench.agox).
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from asla.bench.agox import prepare_agox, run_agox
from asla.bench.problems import SURROGATE_METHODS, TRANSFER_SOURCE, ZERO_SHOT_AGENT, BenchProblem
from asla.counting import EvaluationBudgetExhausted, Ledger, close_ledger, counting_spec, open_ledger
from asla.lock import RunLock
from asla.problem import Problem
from asla.storage import write_json

ZERO_SHOT_EPSILON = 0.1
CHECKPOINT_EVERY = 200  # episodes between a training run's checkpoints: a killed benchmark resumes from the last
LEDGER_FILE = "ledger.json"
BUILD_BATCH = 8          # builds per batch for the random floor and zero-shot (as ASLA's n_builders)
STALL_BATCHES = 200      # batches without a new evaluation: every build is a cache hit; stop


class Skipped(Exception):
    """The method cannot run on this problem (e.g. no pretrained agent given); recorded, not failed."""


@dataclass
class Outcome:
    ledger: Ledger
    wall_seconds: float
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    resumed_seconds: float = 0.0  # wall seconds the run had spent before it was resumed from a checkpoint


@dataclass
class RunContext:
    """What a method's `run` gets: the problem, the seed, the ledger (in `outcome`) and a working directory."""

    method: str
    problem: BenchProblem
    seed: int
    ledger_name: str
    work_dir: Path
    outcome: Outcome
    quick: bool = False
    checkpoint_every: int = CHECKPOINT_EVERY


@dataclass(frozen=True)
class Method:
    label: str  # the report's row name
    run: Callable[[RunContext], None]
    training: bool = False  # trains an agent: works beside its record and checkpoints there (a kill resumes it)
    agox: bool = False  # an AGOX search: works beside its record, its database and ledger there (a kill resumes it)

    @property
    def resumable(self) -> bool:
        """Whether its work dir is kept beside the record (a killed run continues from it) or is a temporary one."""
        return self.training or self.agox


def _prepare_asla() -> None:
    import asla.agents.agent  # imported off the clock
    import asla.agents.training  # noqa: F401 - imported off the clock


def run_method(method: str, problem: BenchProblem, seed: int, budget: int, work_dir: Path, quick: bool = False,
               checkpoint_every: int = CHECKPOINT_EVERY,
               stop_when: Callable[[Any, float], bool] | None = None) -> Outcome:
    """Run one (method, problem, seed) with `budget` evaluations; the ledger holds what it did.

    `stop_when(atoms, energy)`, asked on each improvement of the best energy, ends the run early when True
    (e.g. once it has found the minimum: asla.bench.judge.FoundCheck); its own time is kept off the run's clock."""
    if method not in METHODS:
        raise ValueError(f"--methods: unknown method {method!r}; allowed: {', '.join(METHODS)}")
    spec = METHODS[method]
    prepare(method)  # one-off costs of the process (imports, Ray) stay out of the run's wall time
    # Named by the run, not at random: a training run's config (and so its checkpoint) names its ledger.
    ledger_name = f"bench-{problem.slug}-{method}-s{seed}"
    # A training run stops itself at the end of the batch that spends the budget (max_evaluations), so that it
    # ends cleanly and its agent is saved; the few evaluations past the budget are counted but never judged.
    ledger = open_ledger(ledger_name, limit=None if spec.training else budget)
    ledger.budget = budget
    ledger.stop_when = stop_when
    work_dir.mkdir(parents=True, exist_ok=True)
    outcome = Outcome(ledger=ledger, wall_seconds=0.0)
    t0 = time.perf_counter()
    try:
        try:
            spec.run(RunContext(method=method, problem=problem, seed=seed, ledger_name=ledger_name,
                                work_dir=work_dir, outcome=outcome, quick=quick, checkpoint_every=checkpoint_every))
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
    if METHODS[method].agox:
        prepare_agox(method)
    else:
        _prepare_asla()


# ---- ASLA ---------------------------------------------------------------------------------------------------

def _counting_problem(problem: BenchProblem, ledger_name: str) -> Problem:
    overrides = problem.recipe_overrides()
    base = problem.load(**overrides)
    return problem.load(**{**overrides, "calculator": counting_spec(base.calculator, ledger_name)})


def applicable(method: str, problem: BenchProblem) -> None:
    """Skipped (with the reason the report shows) where `method` has nothing to start from on `problem`: no
    pretrained agent of another problem, no surrogate recipe."""
    if method in SURROGATE_METHODS:
        _check_surrogate_recipe(problem)
    if method in ("asla-transfer", "asla-zeroshot", "asla-transfer-surrogate"):
        pretrained_source(method, problem)


def _check_surrogate_recipe(problem: BenchProblem) -> None:
    if problem.surrogate_recipe is None:
        raise Skipped(f"skipped: no surrogate recipe for {problem.slug} (give one with --surrogate-recipe RECIPE; "
                      "the shipped problems' are configs/<name>-surrogate.yaml)")


def _asla_config(ctx: RunContext) -> dict:
    """The recipe of a training method, counted by the run's ledger (the pretrained agent is run_asla_transfer's)."""
    budget = ctx.outcome.ledger.budget
    surrogate = ctx.method in SURROGATE_METHODS
    if surrogate:
        _check_surrogate_recipe(ctx.problem)
    cfg = ctx.problem.config([
        f"seed={ctx.seed}", "episodes=100000000", "log_images_every=100000000", "record_evaluations=false",
        f"checkpoint_every={ctx.checkpoint_every}", "executor=serial",
        *([f"max_evaluations={budget}"] if budget else [])], surrogate=surrogate)
    base = ctx.problem.load(**cfg["problem_overrides"])
    cfg["problem_overrides"] = {**cfg["problem_overrides"],
                                "calculator": counting_spec(base.calculator, ctx.ledger_name)}
    return cfg


def _train(ctx: RunContext, cfg: dict, init_from: str | None = None) -> None:
    """Train until the budget; a run killed midway resumes from its last checkpoint, ledger and clock included."""
    from asla.agents.training import train
    outcome = ctx.outcome
    outcome.settings.update({"recipe": ctx.problem.recipe_label(ctx.method in SURROGATE_METHODS),
                             "surrogate": cfg.get("surrogate"), "problem_overrides":
                             {k: v for k, v in cfg["problem_overrides"].items() if k != "calculator"},
                             "n_builders": cfg["n_builders"], "init_from": init_from, "executor": "serial",
                             "stop": "max_evaluations: at the end of the batch that spends the budget; "
                                     "evaluations past it are not judged"})
    run_dir, ledger = ctx.work_dir / "asla", outcome.ledger

    def save_ledger(checkpoint: Path) -> None:
        write_json(checkpoint / LEDGER_FILE, ledger.state_dict())

    saved = _checkpointed_ledger(run_dir)
    if saved is not None and saved["budget"] == ledger.budget:
        ledger.load_state_dict(saved)  # its clock goes on from the seconds already run; run_method's too:
        outcome.resumed_seconds = float(saved["seconds"])
        outcome.notes.append(f"resumed from its checkpoint at {ledger.count} evaluations, "
                             f"{outcome.resumed_seconds:.0f} s")
        if ledger.ask_stop_rule_again():
            outcome.notes.append(f"found before its checkpoint (improvement at {ledger.limit} evaluations, asked "
                                 "again on resume): not trained further")
            return
        train(None, run_dir=run_dir, resume=True, progress=False, on_checkpoint=save_ledger)
        return
    if run_dir.exists():  # a start without a usable checkpoint (or for another budget): start afresh
        with RunLock(run_dir):  # unless another benchmark command trains there (not yet checkpointed): refused
            pass
        shutil.rmtree(run_dir)
    train(cfg, run_dir=run_dir, init_from=init_from, progress=False, on_checkpoint=save_ledger)


def _checkpointed_ledger(run_dir: Path) -> dict | None:
    from asla.agents.training import latest_checkpoint
    checkpoint = latest_checkpoint(run_dir)
    try:
        return json.loads((checkpoint / LEDGER_FILE).read_text()) if checkpoint else None
    except (OSError, ValueError):
        return None


def pretrained_source(method: str, problem: BenchProblem) -> str:
    """The path of the agent from another problem that `method` (asla-transfer[-surrogate] or asla-zeroshot) starts
    from; Skipped (with the reason the report shows) when there is none."""
    transfer = method.startswith("asla-transfer")
    agent = problem.transfer_from if transfer else problem.zero_shot
    if agent is None:
        option = "--transfer-from" if transfer else "--zero-shot"
        what = "transfer source" if transfer else "pretrained agent from another problem"
        table = TRANSFER_SOURCE if transfer else ZERO_SHOT_AGENT
        raise Skipped(f"skipped: no {what} for {problem.slug} (give one with {option} AGENT; the shipped "
                      f"problems' defaults: {', '.join(f'{v} -> {k}' for k, v in table.items())})")
    return _pretrained(agent)


def _pretrained(agent: str) -> str:
    from asla.agents.agent import resolve_agent_path
    from asla.errors import CheckpointError
    try:
        return str(resolve_agent_path(agent))
    except CheckpointError:
        raise Skipped(f"skipped: no pretrained agent {agent}") from None


def run_asla(ctx: RunContext) -> None:
    """ASLA trained from scratch with the problem's recipe (asla-surrogate: its surrogate recipe) until the budget."""
    _train(ctx, _asla_config(ctx))


def run_asla_transfer(ctx: RunContext) -> None:
    """ASLA fine-tuned from a pretrained agent of another problem (`--transfer-from`); with asla-transfer-surrogate,
    by the surrogate recipe."""
    path = pretrained_source(ctx.method, ctx.problem)
    _train(ctx, _asla_config(ctx), init_from=path)


def run_zero_shot(ctx: RunContext) -> None:
    """A pretrained agent of another problem (`--zero-shot`) builds with epsilon 0.1, no training."""
    from asla.agents.agent import Agent
    from asla.reward import EnergyEvaluator
    agent = Agent.load(pretrained_source("asla-zeroshot", ctx.problem))
    problem = _counting_problem(ctx.problem, ctx.ledger_name)
    evaluator = EnergyEvaluator(problem)
    ctx.outcome.settings.update({"agent": ctx.problem.zero_shot, "epsilon": ZERO_SHOT_EPSILON, "batch": BUILD_BATCH,
                                 "problem_overrides": ctx.problem.recipe_overrides()})
    seed = ctx.seed
    _until_stalled(ctx.outcome, lambda batch: agent.build(problem, n=BUILD_BATCH, greedy=False,
                                                          epsilon=ZERO_SHOT_EPSILON, seed=seed * 1_000_003 + batch,
                                                          evaluator=evaluator))


def run_random(ctx: RunContext) -> None:
    """The floor: uniformly random legal builds on the same grid, same rules, same evaluation as ASLA's recipe."""
    from asla.builder import random_build
    from asla.reward import EnergyEvaluator
    problem = _counting_problem(ctx.problem, ctx.ledger_name)
    evaluator = EnergyEvaluator(problem)
    rng = np.random.default_rng(10_000 + ctx.seed)
    ctx.outcome.settings.update({"builder": "uniformly random legal actions (asla.builder.random_build)",
                                 "problem_overrides": ctx.problem.recipe_overrides(),
                                 "cache": "symmetry-equivalent builds cost 0"})

    def batch(_: int) -> None:
        for _ in range(BUILD_BATCH):
            state = random_build(problem, rng)
            if state.done:
                evaluator.evaluate(state.atoms(), key=state.canonical_key())
    _until_stalled(ctx.outcome, batch)


def _until_stalled(outcome: Outcome, step: Callable[[int], Any]) -> None:
    """Call step(batch) until the budget stops it, or until builds stop costing anything (all cached)."""
    ledger, idle, batch = outcome.ledger, 0, 0
    while idle < STALL_BATCHES:
        before = ledger.count
        step(batch)
        batch += 1
        idle = idle + 1 if ledger.count == before else 0
    outcome.notes.append(f"stopped after {batch} batches: {STALL_BATCHES} batches in a row were all cache hits")


METHODS: dict[str, Method] = {
    "asla": Method("ASLA (scratch)", run_asla, training=True),
    "asla-transfer": Method("ASLA (transfer)", run_asla_transfer, training=True),
    "asla-zeroshot": Method("ASLA (pretrained, zero-shot)", run_zero_shot),
    "asla-surrogate": Method("ASLA + surrogate (scratch)", run_asla, training=True),
    "asla-transfer-surrogate": Method("ASLA + surrogate (transfer)", run_asla_transfer, training=True),
    "random": Method("random builder (floor)", run_random),
    "rss": Method("AGOX RSS + relaxation", run_agox, agox=True),
    "bh": Method("AGOX basin hopping", run_agox, agox=True),
    "gofee": Method("AGOX GOFEE", run_agox, agox=True),
}
LABELS = {name: m.label for name, m in METHODS.items()}
ASLA_METHODS = tuple(m for m in METHODS if not METHODS[m].agox)
TRAINING_METHODS = tuple(m for m in METHODS if METHODS[m].training)
