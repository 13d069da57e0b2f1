"""The ASLA agent: a Q-network plus what it was trained on; builds structures, saves and loads.

``Agent.save(path)`` writes ``path.safetensors`` (weights) and ``path.json`` (the model card:
species, grid spacing, layers, network, training problem, episodes, best energy, version).
``Agent.load(path)`` accepts such a pair or the short name of a shipped pretrained agent.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import asla
from asla.builder import BuildState, observation_shape
from asla.errors import CheckpointError
from asla.problem import Problem, load_problem
from asla.reward import EnergyEvaluator

from .checkpoint import load_tensors, save_tensors
from .qnetwork import NetworkConfig, QNetwork

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class BuildResult:
    atoms: Any  # ase.Atoms with the energy attached
    energy: float
    energy_relative: float | None
    ok: bool
    actions: list[int]
    seconds: float


class Agent:
    def __init__(self, species: list[str], grid_spacing: tuple[float, float], n_layers: int, in_channels: int,
                 network: NetworkConfig | None = None, card: dict | None = None, device: str | None = None) -> None:
        self.species = list(species)
        self.grid_spacing = (float(grid_spacing[0]), float(grid_spacing[1]))
        self.n_layers = int(n_layers)
        self.in_channels = int(in_channels)
        self.network_config = network or NetworkConfig()
        self.device = pick_device(device)
        self.net = QNetwork(in_channels, len(self.species) * self.n_layers, self.network_config).to(self.device)
        self.card: dict = dict(card or {})
        self.forward_seconds = 0.0  # time in network forward passes while acting (for timing reports)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def for_problem(cls, problem: Problem, network: NetworkConfig | None = None, device: str | None = None) -> Agent:
        network = network or NetworkConfig(periodic=bool(problem.pbc[0]))
        agent = cls(problem.species, problem.grid.spacing, problem.grid.n_layers, observation_shape(problem)[0],
                    network, device=device)
        agent.card.update({"problem": problem.name, "smear": problem.smear})
        return agent

    def check_compatible(self, problem: Problem) -> None:
        """Refuse a problem whose channels or pixels mean something else to this network."""
        if list(problem.species) != self.species:
            raise CheckpointError(f"species mismatch: agent was trained on {self.species}, problem "
                                  f"{problem.name!r} has {problem.species}")
        if not np.allclose(problem.grid.spacing, self.grid_spacing, atol=1e-3):
            raise CheckpointError(f"grid spacing mismatch: agent {tuple(round(s, 4) for s in self.grid_spacing)} A, "
                                  f"problem {problem.name!r} {tuple(round(s, 4) for s in problem.grid.spacing)} A")
        if problem.grid.n_layers != self.n_layers:
            raise CheckpointError(f"layer mismatch: agent has {self.n_layers} build layers, problem {problem.name!r} "
                                  f"has {problem.grid.n_layers}")
        if abs(problem.smear - float(self.card.get("smear", 0.0))) > 1e-9:
            raise CheckpointError(f"observation mismatch: agent sees atoms smeared by {self.card.get('smear', 0.0)} A, "
                                  f"problem {problem.name!r} by {problem.smear} A (observation.smear)")
        c = observation_shape(problem)[0]
        if c != self.in_channels:
            raise CheckpointError(f"observation mismatch: agent expects {self.in_channels} channels, problem "
                                  f"{problem.name!r} gives {c} (different template planes?)")

    # -- acting ---------------------------------------------------------------------------
    @torch.inference_mode()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        x = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=self.device)
        q = self.net(x).float().cpu().numpy()
        self.forward_seconds += time.perf_counter() - t0
        return q

    def act(self, states: list[BuildState], epsilon: float, rng: np.random.Generator,
            temperature: float = 0.0) -> list[int | None]:
        """ε-greedy over legal actions for a batch of builds, one forward pass for all.

        With a temperature > 0 the non-random steps sample softmax(Q / temperature) over the legal actions
        (Boltzmann exploration) instead of taking the argmax: alternatives the network rates almost as high as
        its favourite are tried often, hopeless ones almost never, unlike the uniform draw of ε.
        """
        masks = [s.action_mask() for s in states]
        actions: list[int | None] = [None] * len(states)
        need_q = []
        for n, m in enumerate(masks):
            legal = np.flatnonzero(m)
            if len(legal) == 0:
                continue
            if epsilon > 0 and rng.random() < epsilon:
                actions[n] = int(rng.choice(legal))
            else:
                need_q.append(n)
        if need_q:
            q = self.q_values(np.stack([states[n].observation() for n in need_q]))
            for row, n in enumerate(need_q):
                if temperature > 0:
                    legal = np.flatnonzero(masks[n])
                    z = (q[row, legal] - q[row, legal].max()) / temperature
                    p = np.exp(z)
                    actions[n] = int(rng.choice(legal, p=p / p.sum()))
                else:
                    actions[n] = int(np.argmax(np.where(masks[n], q[row], -np.inf)))
        return actions

    def rollout(self, problem: Problem, n: int, epsilon: float, rng: np.random.Generator,
                temperature: float = 0.0) -> list[BuildState]:
        """n builds in lockstep with batched forward passes; dead-ended builds stop early."""
        states = [BuildState(problem) for _ in range(n)]
        active = list(range(n))
        while active:
            acts = self.act([states[i] for i in active], epsilon, rng, temperature)
            still = []
            for i, a in zip(active, acts):
                if a is None:
                    continue
                states[i].place(a)
                if not states[i].done:
                    still.append(i)
            active = still
        return states

    def build(self, problem: str | Problem, n: int = 1, greedy: bool = True, epsilon: float = 0.0,
              seed: int = 0, evaluator: EnergyEvaluator | None = None) -> list[BuildResult]:
        """Build n structures with this agent and evaluate them with the problem's calculator."""
        problem = load_problem(problem)
        self.check_compatible(problem)
        evaluator = evaluator or EnergyEvaluator(problem)
        rng = np.random.default_rng(seed)
        results = []
        for state in self.rollout(problem, n, 0.0 if greedy else epsilon, rng):
            t0 = time.perf_counter()
            if state.done:
                ev = evaluator.evaluate(state.atoms(), key=state.canonical_key())
                energy, ok, atoms = ev.energy, ev.ok, ev.atoms
            else:
                energy, ok, atoms = float("nan"), False, state.atoms()
            rel = evaluator.relative(energy) if ok else None
            results.append(BuildResult(atoms, energy, rel, ok, list(state.actions), time.perf_counter() - t0))
        return results

    # -- persistence ----------------------------------------------------------------------
    def make_card(self, **extra: Any) -> dict:
        card = {"format": "asla-agent", "asla_version": asla.__version__, "species": self.species,
                "grid_spacing": list(self.grid_spacing), "n_layers": self.n_layers, "in_channels": self.in_channels,
                "network": self.network_config.to_dict(),
                "n_parameters": sum(p.numel() for p in self.net.parameters()),
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        card = {**self.card, **card, **extra}
        return card

    def save(self, path: str | Path, **card_extra: Any) -> None:
        self.card = self.make_card(**card_extra)
        save_tensors(path, self.net.state_dict(), self.card)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Agent:
        path = resolve_agent_path(path)
        tensors, card = load_tensors(path)
        try:
            net_cfg = NetworkConfig(**card["network"])
            agent = cls(card["species"], tuple(card["grid_spacing"]), card["n_layers"], card["in_channels"],
                        net_cfg, card=card, device=device)
            agent.net.load_state_dict(tensors)
        except (KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: card and weights do not describe an asla agent "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
        return agent


def list_pretrained() -> list[str]:
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.json"))


def resolve_agent_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        if (p / "agent.json").exists():
            return p / "agent"
    elif p.suffix in (".json", ".safetensors") or p.with_suffix(".json").exists():
        return p
    elif (PRETRAINED_DIR / f"{p.name}.json").exists():
        return PRETRAINED_DIR / p.name
    raise CheckpointError(f"no agent at {str(path)!r}; give a .safetensors/.json pair, a run directory, or a "
                          f"pretrained name: {', '.join(list_pretrained()) or '(none shipped)'}")
