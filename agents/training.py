"""Training loop (CleanRL style: it reads top to bottom).

Each iteration: n_builders builds in lockstep (one batched forward pass per step, ε-greedy over
legal actions), the finished structures go to the calculator, their episodes into the replay
buffer, then a fixed number of gradient steps on Monte-Carlo targets (the episode's reward for
every step of it), each sample transformed by a random lattice symmetry.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn import functional as F

from asla.builder import encode_observation
from asla.errors import CheckpointError, ConfigError
from asla.executor import make_executor
from asla.problem import load_problem
from asla.render import render_atoms, render_heatmap
from asla.reward import EnergyEvaluator, RewardScale, rewards
from asla.storage import append_db, atomic_write_text, open_db, write_json, write_structures

from . import augmentation
from .agent import Agent
from .checkpoint import load_tensors, save_tensors
from .config import load_config
from .qnetwork import NetworkConfig
from .replay import Episode, ReplayBuffer


def epsilon_at(schedule: dict, episode: int) -> float:
    """Linear decay from start to end over decay_episodes, then constant (epsilon and temperature alike)."""
    frac = min(1.0, episode / max(1, schedule["decay_episodes"]))
    return float(schedule["start"] + frac * (schedule["end"] - schedule["start"]))


class TrainState:
    """Counters and bests that make up a run's progress (all JSON)."""

    def __init__(self) -> None:
        self.episodes = 0
        self.iterations = 0
        self.best_energy = math.inf
        self.best_actions: list[int] = []
        self.history: list[dict] = []  # one row per improvement of the best energy
        self.seconds = 0.0
        # seconds: rollout (forward passes + environment), of it rollout_forward; calculator (+ database
        # and cache); learn (sampling, encoding, forward + backward + Adam); logging; checkpoint
        self.timing = {"rollout": 0.0, "rollout_forward": 0.0, "calculator": 0.0, "learn": 0.0, "logging": 0.0,
                       "checkpoint": 0.0}
        self.dead_ends = 0
        self.grad_credit = 0.0  # gradient steps owed (grad_steps_per_episode may be fractional)
        self.found_reference_at: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def load(self, d: dict) -> None:
        self.__dict__.update(d)


def train(config: dict | str, run_dir: str | Path | None = None, resume: bool = False,
          init_from: str | Path | None = None, progress: bool = True, overrides: list[str] | None = None,
          on_checkpoint: Callable[[Path], None] | None = None) -> dict:
    """Train an agent; returns the run summary. Resumes from run_dir's last checkpoint if asked.

    `on_checkpoint(directory)` may add files to each checkpoint before it is published, so that a caller's own
    state (e.g. a benchmark's evaluation ledger) resumes together with the trainer's."""
    # ---- configuration and run directory --------------------------------------------------
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
        import sys
        cfg["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    if init_from is not None:
        cfg["init_from"] = str(init_from)
    problem = load_problem(cfg["problem"], **cfg["problem_overrides"])
    if not resume:
        public = {k: v for k, v in cfg.items() if not k.startswith("_")}  # private test hooks stay out
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(_plain(public), sort_keys=False))
        atomic_write_text(run_dir / "problem.yaml", yaml.safe_dump(_plain(problem.to_dict()), sort_keys=False))

    torch.set_num_threads(int(cfg["torch_threads"]))
    rng = np.random.default_rng(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    learn_cfg, aug_cfg = cfg["learning"], cfg["augment"]

    # ---- agent, optimiser, replay, evaluator ---------------------------------------------
    agent = Agent.for_problem(problem, NetworkConfig(**cfg["network"], periodic=bool(problem.pbc[0])),
                              device=cfg["device"])
    eps_schedule = cfg["epsilon"]
    if cfg.get("init_from"):
        source = Agent.load(cfg["init_from"])
        source.check_compatible(problem)
        if source.network_config.to_dict() != agent.network_config.to_dict():
            agent = Agent.for_problem(problem, source.network_config, device=cfg["device"])
            cfg["network"] = {k: v for k, v in source.network_config.to_dict().items() if k != "periodic"}
        agent.net.load_state_dict(source.net.state_dict())
        agent.card["init_from"] = {"path": cfg["init_from"], "problem": source.card.get("problem"),
                                   "episodes": source.card.get("episodes")}
        eps_schedule = cfg["fine_tune_epsilon"]
    optimizer = torch.optim.Adam(agent.net.parameters(), lr=learn_cfg["lr"], weight_decay=learn_cfg["weight_decay"])
    replay = ReplayBuffer(learn_cfg["replay_capacity"], learn_cfg["n_best"])
    evaluator = EnergyEvaluator(problem, failure_dir=run_dir / "failures")
    scale = RewardScale(quantile=learn_cfg["reward_quantile"], kind=learn_cfg["reward"],
                        resolution=learn_cfg["reward_resolution"])
    executor = make_executor(problem, cfg["executor"], cfg["workers"], cfg["ray_address"])
    state = TrainState()
    database = cfg["database"] or str(run_dir / "evaluations.db")
    if resume:
        _load_checkpoint(run_dir, agent, optimizer, replay, evaluator, scale, state, rng)
        _drop_db_rows_after(database, state.episodes, run_dir.name)
    elif cfg["seed_from_db"]:
        demos = demonstrations_from_db(problem, cfg["seed_from_db"])
        for ep in demos:
            replay.add(ep)
        scale.update([ep.energy for ep in demos])

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(run_dir), purge_step=state.iterations if resume else None)
    if not resume:
        writer.add_text("hyperparameters", _hparam_table(cfg))
        writer.add_text("problem", f"`{problem.name}`: {problem.description}")

    pbar = _progress(cfg["episodes"], state.episodes, progress)
    next_checkpoint = (state.episodes // cfg["checkpoint_every"] + 1) * cfg["checkpoint_every"]
    next_images = state.episodes
    ref, ref_tol = problem.reference_energy, 1e-6
    on_grid_reference = ref is not None and not problem.reference.get("relaxed", False)
    recent_energies: list[float] = []
    t_start = time.perf_counter() - state.seconds

    # ---- main loop -------------------------------------------------------------------------
    try:
        budget = cfg["max_evaluations"]
        while state.episodes < cfg["episodes"] and (budget is None or evaluator.n_calls < budget):
            t_iter = time.perf_counter()
            epsilon = epsilon_at(eps_schedule, state.episodes)
            temperature = epsilon_at(cfg["temperature"], state.episodes)
            n = min(cfg["n_builders"], cfg["episodes"] - state.episodes)

            t0, f0 = time.perf_counter(), agent.forward_seconds
            builds = agent.rollout(problem, n, epsilon, rng, temperature)
            state.timing["rollout"] += time.perf_counter() - t0
            state.timing["rollout_forward"] = state.timing.get("rollout_forward", 0.0) + agent.forward_seconds - f0

            t0 = time.perf_counter()
            evaluated = []
            keys = [build.canonical_key() for build in builds]
            finished = [i for i, build in enumerate(builds) if build.done]
            evals = dict(zip(finished, executor.evaluate_many(evaluator, [builds[i].atoms() for i in finished],
                                                              [keys[i] for i in finished])))
            spent = evaluator.n_calls - sum(ev.n_calls for ev in evals.values())  # before this batch
            for builder, build in enumerate(builds):
                episode = state.episodes
                key = keys[builder]
                if build.done:
                    ev = evals[builder]
                    spent += ev.n_calls  # evaluations up to and including this build, as it happened
                    energy = ev.energy if ev.ok else float("nan")
                    if ev.atoms is not None and not ev.cached:
                        ev.atoms.info.update({"episode": episode, "builder": builder, "ok": ev.ok,
                                              "seconds": ev.seconds, "n_calls": ev.n_calls})
                        evaluated.append(ev.atoms)
                else:
                    energy = float("nan")
                    state.dead_ends += 1
                replay.add(Episode(list(build.actions), energy, key, episode))
                state.episodes += 1
                if math.isfinite(energy):
                    recent_energies.append(energy)
                    writer.add_scalar("charts/episode_energy", energy, state.episodes)
                    if energy < state.best_energy - 1e-9:
                        state.best_energy = energy
                        state.best_actions = list(build.actions)
                        state.history.append({"episode": state.episodes, "evaluations": spent,
                                              "energy": energy, "actions": list(build.actions),
                                              "seconds": time.perf_counter() - t_start})
                        _write_best(run_dir, problem, replay)
                    if on_grid_reference and state.found_reference_at is None and energy <= ref + ref_tol:
                        state.found_reference_at = {"episode": state.episodes, "evaluations": spent}
            scale.update([e.energy for e in replay.recent[-n:]])
            if evaluated and cfg["record_evaluations"]:
                append_db(database, evaluated, run=run_dir.name)
            state.timing["calculator"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            losses, qs = [], []
            if state.episodes >= learn_cfg["warmup_episodes"]:
                state.grad_credit += learn_cfg["grad_steps_per_episode"] * n  # fractional rates carry over
                n_steps = int(state.grad_credit + 1e-9)
                state.grad_credit -= n_steps
                for _ in range(n_steps):
                    loss, qmean = _learn_step(agent, optimizer, problem, replay, scale, rng, learn_cfg, aug_cfg)
                    losses.append(loss)
                    qs.append(qmean)
            state.timing["learn"] += time.perf_counter() - t0

            # ---- logging ------------------------------------------------------------------------
            t0 = time.perf_counter()
            state.iterations += 1
            dt = time.perf_counter() - t_iter
            step = state.episodes
            writer.add_scalar("charts/epsilon", epsilon, step)
            if temperature > 0:
                writer.add_scalar("charts/temperature", temperature, step)
            writer.add_scalar("charts/episodes_per_second", n / max(dt, 1e-9), step)
            writer.add_scalar("charts/energy_evaluations", evaluator.n_calls, step)
            if math.isfinite(state.best_energy):
                writer.add_scalar("charts/best_energy", state.best_energy, step)
                if ref is not None:
                    writer.add_scalar("charts/best_energy_relative", state.best_energy - ref, step)
            writer.add_scalar("charts/dead_ends", state.dead_ends, step)
            writer.add_scalar("charts/failed_evaluations", len(evaluator.failures), step)
            if losses:
                writer.add_scalar("losses/q_loss", float(np.mean(losses)), step)
                writer.add_scalar("losses/q_mean", float(np.mean(qs)), step)
            if step >= next_images:
                next_images = step + cfg["log_images_every"]
                _log_images(writer, agent, problem, state, recent_energies, step)
                recent_energies = []
            pbar.update(n)
            pbar.set_postfix(best=f"{state.best_energy:.3f}", eps=f"{epsilon:.2f}", evals=evaluator.n_calls)
            state.timing["logging"] += time.perf_counter() - t0

            state.seconds = time.perf_counter() - t_start
            out_of_budget = budget is not None and evaluator.n_calls >= budget
            if state.episodes >= next_checkpoint or state.episodes >= cfg["episodes"] or out_of_budget:
                t0 = time.perf_counter()
                next_checkpoint += cfg["checkpoint_every"]
                _save_checkpoint(run_dir, cfg, problem, agent, optimizer, replay, evaluator, scale, state, rng,
                                 on_checkpoint)
                writer.flush()
                state.timing["checkpoint"] += time.perf_counter() - t0
            if cfg["stop_at_reference"] and state.found_reference_at is not None:
                _save_checkpoint(run_dir, cfg, problem, agent, optimizer, replay, evaluator, scale, state, rng,
                                 on_checkpoint)
                break
            if cfg.get("_stop_after_episodes") and state.episodes >= cfg["_stop_after_episodes"]:
                break  # for tests of kill-and-resume
    finally:
        pbar.close()
        writer.close()
        executor.close()
    summary = _summary(cfg, problem, state, evaluator)
    write_json(run_dir / "summary.json", summary)
    return summary


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
    obs = np.stack([encode_observation(problem, a // (L * N), (a // N) % L, p) for a, p in zip(states, points)])
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
    from asla.builder import atoms_from_actions
    frames = []
    for ep in replay.best:
        a = atoms_from_actions(problem, ep.actions)
        from ase.calculators.singlepoint import SinglePointCalculator
        a.calc = SinglePointCalculator(a, energy=ep.energy)
        a.info["episode"] = ep.episode
        frames.append(a)
    write_structures(run_dir / "best.extxyz", frames)


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
        for layer in range(problem.grid.n_layers):
            writer.add_image(f"q_values/{sym}_layer{layer}_step0", render_heatmap(q[s, layer]), step, dataformats="HWC")


def _save_checkpoint(run_dir: Path, cfg: dict, problem, agent: Agent, optimizer, replay: ReplayBuffer,
                     evaluator: EnergyEvaluator, scale: RewardScale, state: TrainState, rng: np.random.Generator,
                     on_checkpoint: Callable[[Path], None] | None = None) -> None:
    """Write everything into a fresh directory, then move the 'latest' pointer atomically."""
    ckdir = run_dir / "checkpoints"
    name = f"ckpt-{state.episodes:08d}"
    target = ckdir / name
    if target.exists():
        shutil.rmtree(target)
    card = {"problem": cfg["problem"] if isinstance(cfg["problem"], str) else cfg["name"],
            "episodes": state.episodes, "best_energy": state.best_energy if math.isfinite(state.best_energy) else None,
            "evaluations": evaluator.n_calls, "trained_with": cfg.get("command")}
    agent.save(target / "agent", **card)
    opt = optimizer.state_dict()
    tensors = {"torch_rng": torch.get_rng_state()}
    opt_state = {}
    for idx, st in opt["state"].items():
        opt_state[str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                opt_state[str(idx)][k] = v
    meta = {"format": "asla-trainer", "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_state},
            "replay": replay.state_dict(), "evaluator": evaluator.state_dict(),
            "scale": {"energies": scale.energies, "low": scale.low if math.isfinite(scale.low) else None},
            "state": state.to_dict(), "rng": rng.bit_generator.state}
    save_tensors(target / "trainer", tensors, meta)
    if on_checkpoint is not None:
        on_checkpoint(target)
    atomic_write_text(ckdir / "latest", name + "\n")
    for f in ("agent.safetensors", "agent.json"):
        shutil.copyfile(target / f, run_dir / f".{f}.tmp")
        (run_dir / f".{f}.tmp").replace(run_dir / f)
    for old in sorted(ckdir.glob("ckpt-*"))[:-2]:  # keep the newest two
        shutil.rmtree(old, ignore_errors=True)
    write_json(run_dir / "summary.json", _summary(cfg, problem, state, evaluator))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The directory the 'latest' pointer publishes (None before the first checkpoint)."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def _load_checkpoint(run_dir: Path, agent: Agent, optimizer, replay: ReplayBuffer, evaluator: EnergyEvaluator,
                     scale: RewardScale, state: TrainState, rng: np.random.Generator) -> None:
    target = latest_checkpoint(run_dir)
    if target is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet (checkpoints/latest missing); start it afresh")
    saved = Agent.load(target / "agent")
    agent.net.load_state_dict(saved.net.state_dict())
    agent.card.update(saved.card)
    tensors, meta = load_tensors(target / "trainer", expect_format="asla-trainer")
    opt_state: dict[int, dict[str, Any]] = {}
    for idx, scalars in meta["optimizer"]["scalars"].items():
        opt_state[int(idx)] = dict(scalars)
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
    torch.set_rng_state(tensors["torch_rng"])
    replay.load_state_dict(meta["replay"])
    evaluator.load_state_dict(meta["evaluator"])
    scale.energies = list(meta["scale"]["energies"])
    scale.low = math.inf if meta["scale"]["low"] is None else float(meta["scale"]["low"])
    state.load(meta["state"])
    rng.bit_generator.state = meta["rng"]


def _drop_db_rows_after(database: str, episodes: int, run: str) -> None:
    """Rows written after the checkpoint will be evaluated again on resume: drop them, no duplicates."""
    if "://" not in database and not Path(database).exists():
        return
    with open_db(database) as db:
        ids = [row.id for row in db.select(f"episode>={episodes}", run=run)]
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
            "timing_seconds": state.timing}


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
