"""Training loop (CleanRL style: it reads top to bottom, `Trainer.run`, in named steps).

Each iteration: n_builders builds in lockstep (one batched forward pass per step, ε-greedy over
legal actions) (rollout), the finished structures go to the calculator (evaluate; with the recipe's
``surrogate:`` block each is first relaxed in a model of the run's real evaluations, asla.surrogate_eval),
their episodes into the replay buffer and the run's bests (record), then a fixed number of gradient steps on
Monte-Carlo targets (the episode's reward for every step of it), each sample transformed by a random
lattice symmetry (learn); TensorBoard (log); a checkpoint when due. Callbacks
(`asla.agents.callbacks`) see every iteration and hold the stop rules.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from torch.nn import functional as F

from asla.builder import check_fits, encode_observation
from asla.errors import CheckpointError, ConfigError
from asla.executor import make_executor
from asla.lock import RunLock
from asla.problem import load_problem
from asla.render import render_atoms, render_heatmap, render_relevance
from asla.reward import EnergyEvaluator, Evaluation, RewardScale, rewards
from asla.storage import (
    EPISODE_NUMBERING,
    append_db,
    atomic_write_text,
    episode_base,
    open_db,
    write_json,
    write_structures,
)
from asla.surrogate import SurrogateConfig
from asla.surrogate_eval import SurrogateEvaluation, SurrogateRecord

from . import augmentation
from .agent import Agent
from .callbacks import BaseCallback, CallbackList, CheckpointHook
from .callbacks import from_config as callbacks_from_config
from .checkpoint import (
    load_optimizer_state_dict,
    load_rng_state_dict,
    load_tensors,
    optimizer_state_dict,
    rng_state_dict,
    save_tensors,
)
from .config import DEFAULTS, Recipe, load_config
from .mutation import mutant
from .qnetwork import NetworkConfig
from .replay import Episode, ReplayBuffer

if TYPE_CHECKING:
    from ase import Atoms

    from asla.builder import BuildState
    from asla.problem import Problem


TRAINER_FORMAT = "asla-trainer"  # the checkpoint's trainer.json card
REFERENCE_TOLERANCE = 1e-6  # eV: a build this close to the on-grid reference energy has found it
BASIN_TOLERANCE = 0.05  # eV: a reward energy this close to a relaxed reference has found it (asla.basin's tolerance)


def epsilon_at(schedule: dict, episode: int) -> float:
    """Linear decay from start to end over decay_episodes, then constant (epsilon and temperature alike)."""
    frac = min(1.0, episode / max(1, schedule["decay_episodes"]))
    return float(schedule["start"] + frac * (schedule["end"] - schedule["start"]))


def _timing_buckets() -> dict[str, float]:
    # seconds: rollout (forward passes + environment), of it rollout_forward; calculator (+ database
    # and cache); learn (sampling, encoding, forward + backward + Adam); logging; checkpoint
    return {"rollout": 0.0, "rollout_forward": 0.0, "calculator": 0.0, "learn": 0.0, "logging": 0.0,
            "checkpoint": 0.0}


@dataclass
class TrainState:
    """Counters and bests that make up a run's progress (all JSON)."""

    episodes: int = 0
    iterations: int = 0
    best_energy: float = math.inf
    best_actions: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # one row per improvement of the best energy
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=_timing_buckets)
    dead_ends: int = 0
    grad_credit: float = 0.0  # gradient steps owed (grad_steps_per_episode may be fractional)
    found_reference_at: dict | None = None
    mutants: int = 0  # builds made as mutants of the best builds (recipe mutation.fraction > 0)
    mutant_improvements: int = 0  # improvements of the best energy that were mutants

    def state_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.timing = {**_timing_buckets(), **self.timing}  # a bucket newer than the checkpoint starts at 0


@dataclass
class Batch:
    """One iteration's builds and what the calculator said of them."""

    builds: list[BuildState]
    epsilon: float
    temperature: float
    keys: list[tuple[int, ...]] = field(default_factory=list)  # canonical (symmetry-reduced) keys, one per build
    evaluations: dict[int, Evaluation] = field(default_factory=dict)  # by index into builds; finished builds only
    surrogate: dict[int, SurrogateRecord] = field(default_factory=dict)  # what the model did, when it is enabled
    mutants: set[int] = field(default_factory=set)  # indices of the builds that are mutants of a best build


def train(config: dict | str | None, run_dir: str | Path | None = None, resume: bool = False,
          init_from: str | Path | None = None, progress: bool | float = True, overrides: list[str] | None = None,
          on_checkpoint: Callable[[Path], None] | None = None,
          callbacks: BaseCallback | Sequence[BaseCallback] | None = None, problem: Problem | None = None) -> dict:
    """Train an agent; returns the run summary. Resumes from run_dir's last checkpoint if asked.

    `callbacks` (`asla.agents.callbacks`) see each iteration and may stop the run or add files to its checkpoints;
    the recipe's stop rules (``max_evaluations``, ``stop_at_reference``) come first. `on_checkpoint(directory)` is
    `CheckpointHook(on_checkpoint)`, kept for callers from before callbacks. `progress`: True a progress bar, False
    nothing, a number of seconds a one-line status that often (0: every iteration), for logs. `problem`: the
    recipe's problem already loaded (it must be what ``config["problem"]`` names), to skip loading it again.
    """
    extra = [callbacks] if isinstance(callbacks, BaseCallback) else list(callbacks or [])
    if on_checkpoint is not None:
        extra.append(CheckpointHook(on_checkpoint))
    trainer = Trainer(config, run_dir=run_dir, resume=resume, init_from=init_from, progress=progress,
                      overrides=overrides, callbacks=extra, problem=problem)
    return trainer.run()


class Trainer:
    """One training run: its parts and, as methods, the steps of an iteration (CleanRL's loop, cut into steps).

    Setting up: the run directory and its recipe, the problem, the seeds, the learner's parts (agent, optimizer,
    replay, evaluator, reward scale, executor, state), then the last checkpoint (resume) or demonstrations (seed),
    the callbacks, TensorBoard. `run()`: per iteration rollout, evaluate, record, learn, log, checkpoint; then
    close and summarise. Each stateful part has ``state_dict``/``load_state_dict``, and so has the trainer.
    """

    def __init__(self, config: dict | str | None, run_dir: str | Path | None = None, resume: bool = False,
                 init_from: str | Path | None = None, progress: bool | float = True,
                 overrides: list[str] | None = None,
                 callbacks: Sequence[BaseCallback] = (), problem: Problem | None = None) -> None:
        self.cfg, self.run_dir = prepare_run(config, run_dir, resume, init_from, overrides)
        self.lock = RunLock(self.run_dir).acquire()  # one trainer per run directory; released by close()
        try:
            clean_run_dir(self.run_dir, self.cfg, resume)
            self.problem = problem if problem is not None else load_problem(self.cfg["problem"],
                                                                           **self.cfg["problem_overrides"])
            if not resume:
                check_fits(self.problem)  # a bag that cannot be completed fails now, not as dead ends; own RNG
                write_run_files(self.run_dir, self.cfg, self.problem)
            self.rng = seed_everything(self.cfg)
            self.build_learner()
            if resume:
                self.load_checkpoint()
            else:
                self.seed_replay()
            self.callbacks = CallbackList([*callbacks_from_config(self.cfg), *callbacks])
            self.callbacks.init_callback(self)
            self.open_logs(resume, progress)
        except BaseException:
            self.lock.release()
            raise

    # ---- setting up ------------------------------------------------------------------------------------

    def build_learner(self) -> None:
        """Agent (from --init-from if given), optimizer, replay buffer, evaluator, reward scale, executor, state."""
        cfg, problem, learn_cfg = self.cfg, self.problem, self.cfg["learning"]
        self.agent = Agent.for_problem(problem, NetworkConfig(**cfg["network"], periodic=bool(problem.pbc[0])),
                                       device=cfg["device"])
        self.eps_schedule = cfg["epsilon"]
        if cfg.get("init_from"):
            source = Agent.load(cfg["init_from"])
            source.check_compatible(problem)
            if source.network_config.to_dict() != self.agent.network_config.to_dict():
                self.agent = Agent.for_problem(problem, source.network_config, device=cfg["device"])
                cfg["network"] = {k: v for k, v in source.network_config.to_dict().items() if k != "periodic"}
            self.agent.net.load_state_dict(source.net.state_dict())
            self.agent.card["init_from"] = {"path": cfg["init_from"], "problem": source.card.get("problem"),
                                            "episodes": source.card.get("episodes")}
            self.eps_schedule = cfg["fine_tune_epsilon"]
        self.optimizer = torch.optim.Adam(self.agent.net.parameters(), lr=learn_cfg["lr"],
                                          weight_decay=learn_cfg["weight_decay"])
        self.replay = ReplayBuffer(learn_cfg["replay_capacity"], learn_cfg["n_best"])
        self.surrogate, real = self.build_surrogate()
        self.evaluator = EnergyEvaluator(real, failure_dir=self.run_dir / "failures",
                                         keep_forces=self.surrogate is not None and self.surrogate.config.forces)
        self.scale = RewardScale(quantile=learn_cfg["reward_quantile"], kind=learn_cfg["reward"],
                                 resolution=learn_cfg["reward_resolution"])
        self.executor = make_executor(real, cfg["executor"], cfg["workers"], cfg["ray_address"])
        self.state = TrainState()
        self.database = cfg["database"] or str(self.run_dir / "evaluations.db")
        self.episode_base = episode_base(self.database)  # labels only: 1, or 0 in a database from before

    def build_surrogate(self) -> tuple[SurrogateEvaluation | None, Problem]:
        """The recipe's surrogate (None when off) and the problem the real calculator evaluates: with a surrogate,
        the problem with its real relaxation steps off (one real single point per episode; asla.surrogate_eval)."""
        sur_cfg = SurrogateConfig.from_dict(self.cfg["surrogate"])
        if not sur_cfg.enabled:
            return None, self.problem
        # the checks between the block and the rest of the recipe, again: a caller may change a loaded recipe
        Recipe.from_dict({k: v for k, v in self.cfg.items() if k != "name" and not k.startswith("_")})
        real = load_problem(self.problem.to_dict(), relax={**self.problem.to_dict().get("relax", {}), "steps": 0})
        return SurrogateEvaluation(sur_cfg, self.problem), real

    def seed_replay(self) -> None:
        """A fresh run starts from the recipe's demonstrations (seed_from_db), if any."""
        if self.cfg["seed_from_db"]:
            demos = demonstrations_from_db(self.problem, self.cfg["seed_from_db"])
            for ep in demos:
                self.replay.add(ep)
            self.scale.update([ep.energy for ep in demos])

    def open_logs(self, resume: bool, progress: bool) -> None:
        """TensorBoard (a resume purges the steps logged after its checkpoint), progress bar, schedules, clock."""
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(self.run_dir), purge_step=self.state.iterations if resume else None)
        if not resume:
            self.writer.add_text("hyperparameters", _hparam_table(self.cfg))
            self.writer.add_text("problem", f"`{self.problem.name}`: {self.problem.description}")
            _log_hparams(self.writer, self.cfg, self.problem)
        self.pbar = _progress(self.cfg["episodes"], self.state.episodes, progress is True)
        every = self.cfg["checkpoint_every"]
        self.next_checkpoint = (self.state.episodes // every + 1) * every
        self.next_images = self.state.episodes
        self.ref = self.problem.reference_energy
        self.on_grid_reference = self.ref is not None and not self.problem.reference.get("relaxed", False)
        # a relaxed reference is found by a reward energy in its basin's tolerance (asla.basin.in_basin's criterion
        # applied to the energy the reward saw), an on-grid one by the exact energy
        self.reference_tolerance = REFERENCE_TOLERANCE if self.on_grid_reference else BASIN_TOLERANCE
        self.status = _StatusLine(progress, self.cfg["episodes"])
        self.recent_energies: list[float] = []
        self.t_start = time.perf_counter() - self.state.seconds

    # ---- the loop --------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Iterate until the recipe's episodes are done or a callback stops the run; returns the summary."""
        self.callbacks.on_training_start()
        try:
            while self.state.episodes < self.cfg["episodes"] and self.callbacks.on_iteration_start():
                batch = self.rollout()
                self.evaluate(batch)
                self.record(batch)
                losses, qs = self.learn(len(batch.builds))
                self.log(batch, losses, qs)
                keep_going = self.callbacks.on_iteration_end()
                self.checkpoint_if_due(stopping=not keep_going and self.callbacks.checkpoint_on_stop)
                if not keep_going:
                    break
        finally:
            self.close()
        return self.summarise()

    def rollout(self) -> Batch:
        """n_builders builds in lockstep: one batched forward pass per step, ε-greedy over legal actions; with the
        recipe's mutation block, a share of them mutants of the best builds instead (agents/mutation.py)."""
        self._t_iteration = time.perf_counter()
        s = self.state
        epsilon = epsilon_at(self.eps_schedule, s.episodes)
        temperature = epsilon_at(self.cfg["temperature"], s.episodes)
        n = min(self.cfg["n_builders"], self.cfg["episodes"] - s.episodes)
        f0 = self.agent.forward_seconds
        with self._timed("rollout"):
            mutants = self.mutants(n)
            builds = self.agent.rollout(self.problem, n - len(mutants), epsilon, self.rng, temperature) + mutants
        s.timing["rollout_forward"] += self.agent.forward_seconds - f0
        s.mutants += len(mutants)
        self.callbacks.on_rollout_end(builds)
        return Batch(builds, epsilon, temperature, mutants=set(range(n - len(mutants), n)))

    def mutants(self, n: int) -> list[BuildState]:
        """Up to round(fraction * n) mutants of the lowest-energy real builds (none before the first real energy);
        the fraction's remainder rounds up at random, so that any fraction is met on average."""
        cfg = {**DEFAULTS["mutation"], **self.cfg.get("mutation", {})}  # a resolved recipe from before has none
        fraction = cfg["fraction"]
        parents = [ep for ep in self.replay.best[: cfg["parents"]] if ep.actions]
        if fraction <= 0 or not parents:
            return []
        due = int(fraction * n)
        due += int(self.rng.random() < fraction * n - due)
        out = []
        for _ in range(due):
            parent = parents[int(self.rng.integers(len(parents)))]
            state = mutant(self.problem, parent.actions, self.rng, cfg["swap_probability"], cfg["shift_radius"],
                           is_new=lambda b: b.canonical_key() not in self.evaluator.cache)
            if state is not None:
                out.append(state)
        return out

    def evaluate(self, batch: Batch) -> None:
        """The finished structures to the calculator (through the executor; cache hits are answered here). With a
        surrogate, each is relaxed in the model first (once it is ready) and screening may keep some from it."""
        with self._timed("calculator"):
            builds = batch.builds
            batch.keys = [build.canonical_key() for build in builds]
            finished = [i for i, build in enumerate(builds) if build.done]
            atoms = [builds[i].atoms() for i in finished]
            keys = [batch.keys[i] for i in finished]
            if self.surrogate is None:
                evaluations = self.executor.evaluate_many(self.evaluator, atoms, keys)
            else:  # relaxed in the model first (once it has min_points), then one real single point each
                screened, records = self.surrogate.evaluate(self.executor, self.evaluator, atoms, keys)
                batch.surrogate = dict(zip(finished, records, strict=True))
                self.surrogate.log(self.writer, self.state.episodes + len(builds))
                kept = [j for j, ev in enumerate(screened) if ev is not None]  # screening: the best k only
                finished, atoms = [finished[j] for j in kept], [records[j].atoms for j in kept]
                evaluations = [screened[j] for j in kept]
            batch.evaluations = dict(zip(finished, evaluations, strict=True))
            self.callbacks.on_evaluated([builds[i] for i in finished], atoms, evaluations)

    def record(self, batch: Batch) -> None:
        """Every build into the replay buffer and the counters, each new best into the history and best.extxyz,
        the new energies into the reward scale, the evaluated structures into the database."""
        with self._timed("calculator"):
            s, evaluations = self.state, batch.evaluations
            evaluated, screened, real_energies = [], [], []
            spent = self.evaluator.n_calls - sum(ev.n_calls for ev in evaluations.values())  # before this batch
            for builder, build in enumerate(batch.builds):
                episode = s.episodes
                if build.done and builder not in evaluations:  # screened out at model level, no real energy
                    screened.append(self._record_screened(batch, builder, episode))
                    s.episodes += 1
                    continue
                if build.done:
                    ev = evaluations[builder]
                    spent += ev.n_calls  # evaluations up to and including this build, as it happened
                    energy = ev.energy if ev.ok else float("nan")
                    if ev.atoms is not None and not ev.cached:
                        ev.atoms.info.update({"episode": episode + self.episode_base, "builder": builder, "ok": ev.ok,
                                              "seconds": ev.seconds, "n_calls": ev.n_calls})
                        if builder in batch.surrogate:
                            ev.atoms.info.update(_surrogate_row(batch.surrogate[builder]))
                        if builder in batch.mutants:
                            ev.atoms.info["mutant"] = True
                        evaluated.append(ev.atoms)
                else:
                    energy = float("nan")
                    s.dead_ends += 1
                self.replay.add(Episode(list(build.actions), energy, batch.keys[builder], episode))
                real_energies.append(energy)
                s.episodes += 1
                if math.isfinite(energy):
                    self._record_energy(energy, list(build.actions), spent, mutant=builder in batch.mutants)
            if screened:  # screening: only the real energies move the reward scale
                self.scale.update(real_energies)
            else:
                self.scale.update([e.energy for e in self.replay.recent[-len(batch.builds):]])
            evaluated += [a for a in screened if a is not None]
            if evaluated and self.cfg["record_evaluations"]:
                append_db(self.database, evaluated, n_template=len(self.problem.template),
                          calculator=self.problem.calculator["name"], run=self.run_dir.name)

    def _record_screened(self, batch: Batch, builder: int, episode: int) -> Atoms | None:
        """A build screened out at model level: dropped, or (surrogate.train_on_screened) an episode with its model
        energy, marked surrogate in the replay buffer, and its relaxed structure for the database, marked too."""
        record = batch.surrogate[builder]
        if not self.surrogate.config.train_on_screened or not math.isfinite(record.predicted):
            return None
        build = batch.builds[builder]
        self.replay.add(Episode(list(build.actions), float(record.predicted), batch.keys[builder], episode,
                                surrogate=True))
        from ase.calculators.singlepoint import SinglePointCalculator
        atoms = record.atoms.copy()
        atoms.calc = SinglePointCalculator(atoms, energy=float(record.predicted))
        atoms.info.update({"episode": episode + self.episode_base, "builder": builder, "ok": True, "n_calls": 0,
                           "surrogate_only": True,
                           **_surrogate_row(record)})
        return atoms

    def _record_energy(self, energy: float, actions: list[int], spent: int, mutant: bool = False) -> None:
        s = self.state
        self.recent_energies.append(energy)
        self.writer.add_scalar("charts/episode_energy", energy, s.episodes)
        if energy < s.best_energy - 1e-9:
            s.best_energy = energy
            s.best_actions = actions
            s.history.append({"episode": s.episodes, "evaluations": spent, "energy": energy, "actions": list(actions),
                              "seconds": time.perf_counter() - self.t_start, **({"mutant": True} if mutant else {})})
            s.mutant_improvements += int(mutant)
            _write_best(self.run_dir, self.problem, self.replay)
        if self.ref is not None and s.found_reference_at is None and energy <= self.ref + self.reference_tolerance:
            s.found_reference_at = {"episode": s.episodes, "evaluations": spent}

    def learn(self, n: int) -> tuple[list[float], list[float]]:
        """After the warm-up, grad_steps_per_episode gradient steps per new episode (fractional rates carry over);
        returns the losses and mean Q-values of the steps."""
        learn_cfg, s = self.cfg["learning"], self.state
        losses, qs = [], []
        with self._timed("learn"):
            if s.episodes >= learn_cfg["warmup_episodes"]:
                s.grad_credit += learn_cfg["grad_steps_per_episode"] * n
                n_steps = int(s.grad_credit + 1e-9)
                s.grad_credit -= n_steps
                for _ in range(n_steps):
                    loss, qmean = _learn_step(self.agent, self.optimizer, self.problem, self.replay, self.scale,
                                              self.rng, learn_cfg, self.cfg["augment"])
                    losses.append(loss)
                    qs.append(qmean)
        return losses, qs

    def log(self, batch: Batch, losses: list[float], qs: list[float]) -> None:
        """TensorBoard scalars (charts/..., losses/...), images every log_images_every episodes, progress bar."""
        s, writer = self.state, self.writer
        n = len(batch.builds)
        with self._timed("logging"):
            s.iterations += 1
            dt = time.perf_counter() - self._t_iteration
            step = s.episodes
            writer.add_scalar("charts/epsilon", batch.epsilon, step)
            if batch.temperature > 0:
                writer.add_scalar("charts/temperature", batch.temperature, step)
            writer.add_scalar("charts/episodes_per_second", n / max(dt, 1e-9), step)
            writer.add_scalar("charts/energy_evaluations", self.evaluator.n_calls, step)
            if math.isfinite(s.best_energy):
                writer.add_scalar("charts/best_energy", s.best_energy, step)
                if self.ref is not None:
                    writer.add_scalar("charts/best_energy_relative", s.best_energy - self.ref, step)
            writer.add_scalar("charts/dead_ends", s.dead_ends, step)
            if s.mutants:
                writer.add_scalar("charts/mutants", s.mutants, step)
                writer.add_scalar("charts/mutant_improvements", s.mutant_improvements, step)
            writer.add_scalar("charts/failed_evaluations", len(self.evaluator.failures), step)
            if losses:
                writer.add_scalar("losses/q_loss", float(np.mean(losses)), step)
                writer.add_scalar("losses/q_mean", float(np.mean(qs)), step)
            if step >= self.next_images:
                self.next_images = step + self.cfg["log_images_every"]
                self.log_images(step)
                self.recent_energies = []
            self.pbar.update(n)
            self.pbar.set_postfix(best=f"{s.best_energy:.3f}", eps=f"{batch.epsilon:.2f}",
                                  evals=self.evaluator.n_calls)
            self.status.update(s, self.evaluator.n_calls, batch.epsilon, self.ref)
        s.seconds = time.perf_counter() - self.t_start

    def log_images(self, step: int) -> None:
        """The best structure, the energies since the last images, and the first build step's Q-value maps."""
        _log_images(self.writer, self.agent, self.problem, self.state, self.recent_energies, step)
        if self.cfg.get("log_relevance", False):  # a resolved recipe from before the option has none
            _log_relevance(self.writer, self.agent, self.problem, self.state, step)

    def checkpoint_if_due(self, stopping: bool = False) -> None:
        """Every checkpoint_every episodes, after the last episode, and when a callback stops the run (`stopping`)."""
        s = self.state
        if s.episodes >= self.next_checkpoint or s.episodes >= self.cfg["episodes"] or stopping:
            with self._timed("checkpoint"):
                self.next_checkpoint += self.cfg["checkpoint_every"]
                self.save_checkpoint()
                self.writer.flush()

    def close(self) -> None:
        """Progress bar, TensorBoard, workers; then leftovers of a failed write (temporary files, a checkpoint
        directory that was never published) are removed and the run directory's lock released. Each step runs even
        if one before it raises (a full disk); the error is raised once all have run."""
        with contextlib.ExitStack() as steps:  # run in reverse order of registration
            steps.callback(self.lock.release)
            steps.callback(remove_leftovers, self.run_dir)
            steps.callback(self.executor.close)
            steps.callback(self.writer.close)
            steps.callback(self.pbar.close)

    def summarise(self) -> dict:
        """run_dir/summary.json, returned; then the callbacks' on_training_end."""
        summary = self.summary()
        write_json(self.run_dir / "summary.json", summary)
        self.callbacks.on_training_end()
        return summary

    def summary(self) -> dict:
        """The run summary (summary.json); with a surrogate, its block ``surrogate`` (readiness, fallbacks, time,
        model error)."""
        summary = _summary(self.cfg, self.problem, self.state, self.evaluator)
        if self.surrogate is not None:
            summary["surrogate"] = self.surrogate.summary()
        return summary

    @contextlib.contextmanager
    def _timed(self, bucket: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.state.timing[bucket] += time.perf_counter() - t0

    # ---- state and checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resume needs besides the agent's weights, as (tensors, JSON) for one safetensors + JSON
        pair: the optimizer, the random generators, and each part's own state_dict."""
        opt_tensors, opt_meta = optimizer_state_dict(self.optimizer)
        rng_tensors, rng_meta = rng_state_dict(self.rng)
        meta = {"format": TRAINER_FORMAT, "optimizer": opt_meta, "replay": self.replay.state_dict(),
                "evaluator": self.evaluator.state_dict(), "scale": self.scale.state_dict(),
                "state": self.state.state_dict(), "rng": rng_meta}
        if self.surrogate is not None:
            meta["surrogate"] = self.surrogate.state_dict()
        return {**rng_tensors, **opt_tensors}, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        load_optimizer_state_dict(self.optimizer, tensors, meta["optimizer"])
        self.replay.load_state_dict(meta["replay"])
        self.evaluator.load_state_dict(meta["evaluator"])
        self.scale.load_state_dict(meta["scale"])
        self.state.load_state_dict(meta["state"])
        load_rng_state_dict(self.rng, tensors, meta["rng"])
        if self.surrogate is not None:
            if "surrogate" not in meta:
                raise CheckpointError("the checkpoint holds no surrogate state, but the recipe enables the surrogate")
            self.surrogate.load_state_dict(meta["surrogate"])

    def save_checkpoint(self) -> None:
        """Write everything into a fresh directory, let the callbacks add theirs, then move the 'latest' pointer
        atomically; the agent is copied to the run directory, the newest two checkpoints are kept."""
        cfg, s = self.cfg, self.state
        ckdir = self.run_dir / "checkpoints"
        name = f"ckpt-{s.episodes:08d}"
        target = ckdir / name
        if target.exists():
            shutil.rmtree(target)
        card = {"problem": cfg["problem"] if isinstance(cfg["problem"], str) else cfg["name"],
                "episodes": s.episodes, "best_energy": s.best_energy if math.isfinite(s.best_energy) else None,
                "evaluations": self.evaluator.n_calls, "trained_with": cfg.get("command")}
        self.agent.save(target / "agent", **card)
        save_tensors(target / "trainer", *self.state_dict())
        self.callbacks.on_checkpoint(target)
        atomic_write_text(ckdir / "latest", name + "\n")
        for f in ("agent.safetensors", "agent.json"):
            shutil.copyfile(target / f, self.run_dir / f".{f}.tmp")
            (self.run_dir / f".{f}.tmp").replace(self.run_dir / f)
        for old in sorted(ckdir.glob("ckpt-*"))[:-2]:  # keep the newest two
            shutil.rmtree(old, ignore_errors=True)
        write_json(self.run_dir / "summary.json", self.summary())

    def load_checkpoint(self) -> None:
        """The last published checkpoint; database rows written after it are dropped (they will be made again)."""
        target = latest_checkpoint(self.run_dir)
        if target is None:
            raise CheckpointError(f"{self.run_dir} has no checkpoint yet (checkpoints/latest missing); start it afresh")
        saved = Agent.load(target / "agent")
        self.agent.net.load_state_dict(saved.net.state_dict())
        self.agent.card.update(saved.card)
        self.load_state_dict(*load_tensors(target / "trainer", expect_format=TRAINER_FORMAT))
        _drop_db_rows_after(self.database, self.state.episodes, self.run_dir.name, self.episode_base)


def prepare_run(config: dict | str | None, run_dir: str | Path | None, resume: bool, init_from: str | Path | None,
                overrides: list[str] | None) -> tuple[dict, Path]:
    """The recipe (run_dir/config.yaml on a resume) and the run directory, created; a finished or running run is
    never overwritten."""
    if resume:
        if run_dir is None:
            raise ConfigError("--resume", "needs the run directory")
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise ConfigError("--resume", f"{run_dir} holds no config.yaml: not an asla run directory")
        cfg = load_config(yaml.safe_load((run_dir / "config.yaml").read_text()), overrides)
    else:
        cfg = config if isinstance(config, dict) and "learning" in config else load_config(config, overrides)
        run_dir = Path(run_dir or cfg["run_dir"] or f"runs/{cfg['name']}-s{cfg['seed']}")
        if (run_dir / "checkpoints" / "latest").exists():
            raise ConfigError("run_dir", f"{run_dir} already holds a run; use --resume {run_dir} or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg["run_dir"] = str(run_dir)
    if not cfg.get("command"):
        cfg["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if init_from is not None:
        cfg["init_from"] = str(init_from)
    return cfg, run_dir


def clean_run_dir(run_dir: Path, cfg: dict, resume: bool) -> None:
    """What a killed or failed trainer left behind, removed once this one holds the lock.

    Always: temporary files of interrupted writes and checkpoint directories newer than the published one
    (`remove_leftovers`). Starting afresh where an earlier attempt left a config.yaml but no checkpoint (it was
    killed before its first one; `prepare_run` refuses a directory with a checkpoint): that attempt's rows in the
    evaluations database (its ``run`` name is this directory's), its failures/, TensorBoard event files, best.extxyz
    and summary.json, so that the new run's files hold only the new run; resuming from zero would give the same
    run, since a fresh start repeats the killed attempt's episodes exactly."""
    remove_leftovers(run_dir)
    if resume or not (run_dir / "config.yaml").exists():
        return
    database = cfg["database"] or str(run_dir / "evaluations.db")
    _drop_db_rows_after(database, -1, run_dir.name, 1)  # every row of this run: episodes count from 0 or 1
    shutil.rmtree(run_dir / "failures", ignore_errors=True)
    for f in [*run_dir.glob("events.out.tfevents.*"), run_dir / "best.extxyz", run_dir / "summary.json"]:
        f.unlink(missing_ok=True)


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files of interrupted atomic writes (``.NAME.*.tmp``) and checkpoint directories that the
    'latest' pointer does not publish and that are newer than it (a checkpoint whose writing failed or was
    killed): a resume reads only what 'latest' names, but such leftovers would confuse a user or fill a disk."""
    ckdir = run_dir / "checkpoints"
    for tmp in [*run_dir.glob(".*.tmp"), *ckdir.glob(".*.tmp"), *ckdir.glob("*/.*.tmp")]:
        with contextlib.suppress(OSError):
            tmp.unlink()
    latest = latest_checkpoint(run_dir)
    for ck in ckdir.glob("ckpt-*"):
        if ck.is_dir() and (latest is None or ck.name > latest.name):
            shutil.rmtree(ck, ignore_errors=True)


def write_run_files(run_dir: Path, cfg: dict, problem: Problem) -> None:
    """config.yaml (what --resume reads) and problem.yaml (the problem as it was set up)."""
    public = {k: v for k, v in cfg.items() if not k.startswith("_")}  # private keys of a caller stay out
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(_plain(public), sort_keys=False))
    atomic_write_text(run_dir / "problem.yaml", yaml.safe_dump(_plain(problem.to_dict()), sort_keys=False))


def seed_everything(cfg: dict) -> np.random.Generator:
    """Torch's threads and global seed; the NumPy generator that drives builds, sampling and augmentation."""
    torch.set_num_threads(int(cfg["torch_threads"]))
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    return rng


# ---- learning ---------------------------------------------------------------------------------

def _learn_step(agent: Agent, optimizer: torch.optim.Optimizer, problem, replay: ReplayBuffer,
                scale: RewardScale, rng: np.random.Generator, learn_cfg: dict, aug_cfg: dict) -> tuple[float, float]:
    """One gradient step on a batch of (state, actions, target) samples.

    As built (``order_free: false``): the state is the episode's first t atoms in build order and the one action is
    the atom placed next. Order-free (``order_free: true``): a finished structure can be built in any order, so the
    state is a random subset of its atoms and every atom still missing is an action that leads to the same finished
    structure; all of them are trained towards its reward, which gives n - t targets per forward pass instead of one.
    """
    samples = replay.sample(rng, learn_cfg["batch_size"], learn_cfg["best_fraction"])
    low, high = scale.bounds()
    order_free = learn_cfg["order_free"]
    L, N = problem.grid.n_layers, problem.grid.n_points
    states, remaining, energies = [], [], []
    for ep, t in samples:
        actions = np.asarray(ep.actions, dtype=int)
        if order_free and math.isfinite(ep.energy):
            actions = actions[rng.permutation(len(actions))]
            rest = actions[t:]
        else:
            rest = actions[t:t + 1]
        states.append(actions[:t])
        remaining.append(rest)
        energies.append([replay.target_energy(ep, learn_cfg["target"], np.append(actions[:t], a)) for a in rest])
    # symmetry augmentation acts on grid points of the state and its actions alike
    points = [a % N for a in states]
    a_points = np.concatenate([a % N for a in remaining])
    owner = np.repeat(np.arange(len(samples)), [len(r) for r in remaining])
    if aug_cfg["arbitrary_rotation"]:  # includes an exact operation first
        points, a_points = augmentation.arbitrary_rotation(problem.symmetry, rng, points, a_points, owner)
    elif aug_cfg["exact"]:
        points, a_points = augmentation.exact(problem.symmetry, rng, points, a_points, owner)
    obs = np.stack([encode_observation(problem, a // (L * N), (a // N) % L, p)
                    for a, p in zip(states, points, strict=True)])
    flat_remaining = np.concatenate(remaining)
    actions = (flat_remaining // N) * N + a_points  # species and layer unchanged, point transformed
    weights = np.repeat([1.0 / len(r) for r in remaining], [len(r) for r in remaining])
    targets = rewards(np.concatenate([np.asarray(e, dtype=float) for e in energies]), low, high, scale.kind,
                      scale.resolution)
    device = agent.device
    q_all = agent.net(torch.as_tensor(obs, device=device))
    q = q_all[torch.as_tensor(owner, device=device), torch.as_tensor(actions, device=device)]
    target = torch.as_tensor(targets, dtype=torch.float32, device=device)
    per = F.huber_loss(q, target, reduction="none") if learn_cfg["loss"] == "huber" else (q - target) ** 2
    w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    loss = (per * w).sum() / len(samples)  # every sampled state weighs the same, however many actions it has
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), float(q.detach().mean())


# ---- run directory: images, bests, checkpoints, summary ------------------------------------

def _write_best(run_dir: Path, problem, replay: ReplayBuffer) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator

    from asla.builder import atoms_from_actions
    frames = []
    for ep in replay.best:
        a = atoms_from_actions(problem, ep.actions)
        a.calc = SinglePointCalculator(a, energy=ep.energy)
        a.info["episode"] = ep.episode + 1  # the replay counts from 0; files count episodes from 1
        frames.append(a)
    write_structures(run_dir / "best.extxyz", frames, n_template=len(problem.template),
                     calculator=problem.calculator["name"])


def _log_images(writer, agent: Agent, problem, state: TrainState, energies: list[float], step: int) -> None:
    from asla.builder import BuildState, atoms_from_actions
    if state.best_actions:
        atoms = atoms_from_actions(problem, state.best_actions)
        writer.add_image("structures/best", render_atoms(atoms, n_template=len(problem.template)), step,
                         dataformats="HWC")
    if energies:
        writer.add_histogram("charts/episode_energies", np.asarray(energies), step)
    # Q-value maps of the first build step, one per (species, layer)
    s0 = BuildState(problem)
    q = agent.q_values(s0.observation()[None])[0]
    mask = s0.action_mask()
    q = np.where(mask, q, np.nan).reshape(problem.n_species, problem.grid.n_layers, problem.grid.na, problem.grid.nb)
    for s, sym in enumerate(problem.species):
        if problem.volume:  # a Q volume: its highest legal value over z at each (a, b), not one picture a level
            with np.errstate(all="ignore"):
                top = np.where(np.isnan(q[s]).all(0), np.nan, np.nanmax(np.where(np.isnan(q[s]), -np.inf, q[s]), 0))
            writer.add_image(f"q_values/{sym}_max_over_z_step0", render_heatmap(top), step, dataformats="HWC")
            continue
        for layer in range(problem.grid.n_layers):
            writer.add_image(f"q_values/{sym}_layer{layer}_step0", render_heatmap(q[s, layer]), step, dataformats="HWC")


def _log_relevance(writer, agent: Agent, problem, state: TrainState, step: int) -> None:
    """LRP relevance (asla.agents.explain, rule epsilon) of the atoms (placed and template channels) for the greedy
    action at the first build step, beside its Q maps, and for the best build's last action. Draws no random
    numbers and leaves the network as it is, so a run logs the same energies with and without these images."""
    from asla.builder import BuildState

    from .explain import explain
    s0 = BuildState(problem)
    cases = []
    mask = s0.action_mask()
    if mask.any():  # the greedy first action, as the Q maps show it
        cases.append(("step0", s0, int(np.argmax(np.where(mask, agent.q_values(s0.observation()[None])[0], -np.inf)))))
    if state.best_actions:
        last = BuildState(problem)
        for a in state.best_actions[:-1]:
            last.place(a)
        cases.append(("best_last_step", last, state.best_actions[-1]))
    for name, build, action in cases:
        e = explain(agent, build.observation(), action)
        writer.add_image(f"relevance/{name}", render_relevance(e.atoms_map(problem.n_species)), step,
                         dataformats="HWC")


def _surrogate_row(record: SurrogateRecord) -> dict:
    """evaluations.db columns of a structure evaluated with the surrogate on: relaxed in the model or not, and the
    model's energy and sigma of it (absent while the model has no data)."""
    row: dict = {"surrogate_relaxed": bool(record.relaxed), "surrogate_steps": int(record.steps)}
    if math.isfinite(record.predicted):
        row["surrogate_energy"] = float(record.predicted)
    if math.isfinite(record.sigma):
        row["surrogate_sigma"] = float(record.sigma)
    return row


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The directory the 'latest' pointer publishes (None before the first checkpoint)."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def _drop_db_rows_after(database: str, episodes: int, run: str, base: int = 1) -> None:
    """Rows written after the checkpoint will be evaluated again on resume: drop them, no duplicates (`base`: the
    database's first episode number, `asla.storage.episode_base`)."""
    if "://" not in database and not Path(database).exists():
        return
    with open_db(database) as db:
        ids = [row.id for row in db.select(f"episode>={episodes + base}", run=run)]
        if ids:
            db.delete(ids)


def demonstrations_from_db(problem, database: str) -> list[Episode]:
    """Structures from an ase.db as replay episodes: non-template atoms snapped to the grid.

    The order of placement is bottom-up; each demonstration keeps the energy stored in the
    database (rows without one are skipped). Atoms of species the problem does not place are
    an error, since they have no channel.
    """
    from asla.builder import encode_action
    grid, n_template = problem.grid, len(problem.template)
    out = []
    for row in open_db(database).select():
        energy = row.get("energy")
        if energy is None:
            continue
        atoms = row.toatoms()[n_template:]
        order = np.argsort(atoms.positions[:, 2], kind="stable")
        actions = []
        for i in order:
            sym = atoms[i].symbol
            if sym not in problem.species:
                raise ConfigError("seed_from_db", f"row {row.id} has {sym}, which is not in the bag {problem.bag}")
            layer, _ = grid.nearest_layer(atoms.positions[i, 2])
            k = int(grid.nearest_point(atoms.positions[i][None])[0])
            actions.append(encode_action(problem, problem.species.index(sym), layer, k))
        if actions:
            out.append(Episode(actions, float(energy), (), -1))
    return out


def _summary(cfg: dict, problem, state: TrainState, evaluator: EnergyEvaluator) -> dict:
    ref = problem.reference_energy
    best = state.best_energy if math.isfinite(state.best_energy) else None
    return {"problem": problem.name, "run_dir": cfg["run_dir"], "seed": cfg["seed"], "episodes": state.episodes,
            "energy_evaluations": evaluator.n_calls, "structures_evaluated": evaluator.n_structures,
            "cache_hits": evaluator.n_cache_hits, "best_energy": best,
            "best_energy_relative": None if best is None or ref is None else best - ref,
            "reference_energy": ref, "found_reference_at": state.found_reference_at,
            "best_actions": state.best_actions, "history": state.history, "dead_ends": state.dead_ends,
            "failures": len(evaluator.failures), "failure_summary": _failure_summary(evaluator),
            "seconds": state.seconds, "episodes_per_second": state.episodes / max(state.seconds, 1e-9),
            "timing_seconds": state.timing, "best_energy_kind": energy_kind(problem),
            "episode_numbering": EPISODE_NUMBERING,
            **({"mutants": state.mutants, "mutant_improvements": state.mutant_improvements} if state.mutants else {})}


def energy_kind(problem) -> str:  # a Problem
    """What the reward's energy is: a single point on the grid, or after the problem's few relaxation steps."""
    r = problem.relax
    return f"after {r.steps} {r.optimizer} relaxation steps" if r.steps > 0 else "single point"


def _log_hparams(writer, cfg: dict, problem) -> None:  # a SummaryWriter and a Problem
    """The recipe's scalar hyperparameters into TensorBoard's HParams tab, with the run's charts as its metrics.

    Written into the run's own event file (SummaryWriter.add_hparams would open a second run beside it); the
    metrics are the tags charts/best_energy, charts/best_energy_relative and charts/energy_evaluations, so the tab
    shows their latest values, the final ones once the run ends."""
    from torch.utils.tensorboard.summary import hparams
    flat: dict[str, Any] = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k != "problem":
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                flat[f"{prefix}{k}"] = v
    walk({k: v for k, v in cfg.items() if not k.startswith("_")})
    flat["problem"] = problem.name
    metrics = {"charts/best_energy": math.nan, "charts/energy_evaluations": math.nan}
    if problem.reference_energy is not None:
        metrics["charts/best_energy_relative"] = math.nan
    file_writer = writer._get_file_writer()
    for summary in hparams(flat, metrics):
        file_writer.add_summary(summary)


class _StatusLine:
    """With ``progress`` a number of seconds: a one-line status that often on stdout (for a log, where a progress
    bar shows nothing until the run ends)."""

    def __init__(self, progress: bool | float, total: int) -> None:
        numeric = isinstance(progress, (int, float)) and not isinstance(progress, bool)
        self.every = float(progress) if numeric else None
        self.total = total
        self.last = time.perf_counter()

    def update(self, state: TrainState, evaluations: int, epsilon: float, ref: float | None) -> None:
        now = time.perf_counter()
        if self.every is None or (now - self.last < self.every and state.episodes < self.total):
            return
        self.last = now
        best = state.best_energy
        rel = "" if ref is None or not math.isfinite(best) else f" ({best - ref:+.4f} vs reference)"
        print(f"episode {state.episodes}/{self.total}: best {best:.4f} eV{rel}, {evaluations} evaluations, "
              f"epsilon {epsilon:.2f}, {state.seconds:.0f} s", flush=True)


def _failure_summary(evaluator: EnergyEvaluator) -> dict:
    if hasattr(evaluator, "failure_summary"):
        return evaluator.failure_summary()
    counts: dict[str, int] = {}
    for f in evaluator.failures:
        kind = f["error"].split(":")[1].strip() if ":" in f["error"] else f["error"]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _hparam_table(cfg: dict) -> str:
    rows = []

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            if isinstance(v, dict) and k != "problem":
                walk(v, f"{prefix}{k}.")
            else:
                rows.append(f"|{prefix}{k}|{json.dumps(v) if not isinstance(v, str) else v}|")
    walk(cfg)
    return "|param|value|\n|-|-|\n" + "\n".join(rows)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, unit="ep", dynamic_ncols=True)
