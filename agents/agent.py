"""The ASLA agent: a Q-network plus what it was trained on; builds structures, saves and loads.

``Agent.save(path)`` writes ``path.safetensors`` (weights, with format, version and architecture in the file's
metadata) and ``path.json`` (the model card: species, grid, network and its forward pass, action order,
observation channels, training problem, episodes, best energy, version; docs/model-card.md). The card describes the
network completely enough that another tool rebuilds it from the two files alone.
``Agent.load(path)`` accepts such a pair or the short name of a shipped pretrained agent; cards from before the
architecture fields (card_version 1) load as well.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import asla
from asla import schema
from asla.builder import BuildState, observation_shape
from asla.errors import CheckpointError
from asla.problem import Problem, load_problem
from asla.reward import EnergyEvaluator

from .checkpoint import base_path, check_weights, load_tensors, save_tensors
from .qnetwork import NetworkConfig, QNetwork

PRETRAINED_DIR = Path(__file__).parent / "pretrained"
CARD_VERSION = 2  # 2: architecture, action order, observation channels and grid on the card and in the weights file
ARCHITECTURE = "asla-qnetwork-v1"  # the forward pass `network_description` spells out
ARCHITECTURE_3D = "asla-qnetwork3d-v1"  # the same with 3D convolutions over a voxel volume (network.kind 3d)


def architecture_name(cfg: NetworkConfig) -> str:
    return ARCHITECTURE_3D if cfg.kind == "3d" else ARCHITECTURE


def network_kind_for(problem: Problem, kind: str = "auto") -> str:
    """The network kind a problem's observation needs; a recipe's explicit kind must agree (one-line error)."""
    from asla.errors import ConfigError
    need = "3d" if problem.volume else "2d"
    if kind not in ("auto", need):
        layout = "volume" if problem.volume else "planes"
        raise ConfigError("network.kind", f"{kind} does not fit problem {problem.name!r}, whose observation.layout "
                          f"is {layout} (needs {need}); set network.kind to {need} or auto, or the problem's "
                          f"observation.layout to {'planes' if kind == '2d' else 'volume'}")
    return need


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class BuildResult:
    atoms: Any  # ase.Atoms with the energy attached
    energy: float  # the reward's energy: a single point, or after the problem's relaxation steps (relax.steps)
    energy_relative: float | None
    ok: bool
    actions: list[int]
    seconds: float
    relaxed_energy: float | None = None  # with relax_steps: relaxed as the basin criterion relaxes (asla.basin)
    in_reference_basin: bool | None = None  # with relax_steps and a relaxed reference: within 0.05 eV of it


class Agent:
    def __init__(self, species: list[str], grid_spacing: tuple[float, float], n_layers: int, in_channels: int,
                 network: NetworkConfig | None = None, card: dict | None = None, device: str | None = None) -> None:
        self.species = list(species)
        self.grid_spacing = (float(grid_spacing[0]), float(grid_spacing[1]))
        self.n_layers = int(n_layers)
        self.in_channels = int(in_channels)
        network = network or NetworkConfig()
        self.network_config = replace(network, kind="2d") if network.kind == "auto" else network
        self.device = pick_device(device)
        self.net = QNetwork(in_channels, out_channels(self.species, self.n_layers, self.network_config),
                            self.network_config).to(self.device)
        self.card: dict = dict(card or {})
        self.forward_seconds = 0.0  # time in network forward passes while acting (for timing reports)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def for_problem(cls, problem: Problem, network: NetworkConfig | None = None, device: str | None = None) -> Agent:
        network = network or NetworkConfig(periodic=bool(problem.pbc[0]))
        network = replace(network, kind=network_kind_for(problem, network.kind))
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
        need = "3d" if problem.volume else "2d"
        if need != self.network_config.kind:
            raise CheckpointError(f"network mismatch: agent is a {self.network_config.kind} network, problem "
                                  f"{problem.name!r} is observed as {'a volume' if problem.volume else 'planes'} "
                                  f"(observation.layout), which needs a {need} network")
        if problem.grid.n_layers != self.n_layers:
            raise CheckpointError(f"layer mismatch: agent has {self.n_layers} build layers (z levels), problem "
                                  f"{problem.name!r} has {problem.grid.n_layers}")
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
              seed: int = 0, evaluator: EnergyEvaluator | None = None, relax_steps: int = 0) -> list[BuildResult]:
        """Build n structures with this agent and evaluate them with the problem's calculator.

        With `relax_steps` each finished build is also relaxed (template fixed, at most that many optimizer steps) as
        the basin criterion does it (`asla.basin.relax`) and, if the reference is a relaxed energy, judged against
        its basin: a grid-built structure is never relaxed, so its single point alone says little."""
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
            result = BuildResult(atoms, energy, rel, ok, list(state.actions), 0.0)
            if relax_steps > 0 and ok:
                self._judge(problem, result, relax_steps)
            result.seconds = time.perf_counter() - t0
            results.append(result)
        return results

    @staticmethod
    def _judge(problem: Problem, result: BuildResult, steps: int) -> None:
        from asla.basin import in_basin, relax
        relaxed = float(relax(problem, result.atoms, steps=steps).info["relaxed_energy"])
        result.relaxed_energy = relaxed
        ref = problem.reference_energy
        if ref is not None and problem.reference.get("relaxed"):  # an on-grid reference has no basin to judge
            result.in_reference_basin = in_basin(relaxed, ref)

    # -- persistence ----------------------------------------------------------------------
    def make_card(self, **extra: Any) -> dict:
        card = {"format": "asla-agent", "asla_version": asla.__version__, "species": self.species,
                "grid_spacing": list(self.grid_spacing), "n_layers": self.n_layers, "in_channels": self.in_channels,
                "network": self.network_config.to_dict(),
                "n_parameters": sum(p.numel() for p in self.net.parameters()),
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        card = {**self.card, **card, **self.layout_fields(), **extra}
        return card

    def layout_fields(self) -> dict:
        """The card fields (card_version 2) that let another tool rebuild the network and feed it: the forward
        pass, the action order, the observation channels in order, and the grid."""
        volume = self.network_config.kind == "3d"
        return {"card_version": CARD_VERSION, "architecture": network_description(self.network_config),
                "network_kind": self.network_config.kind,
                "action_order": action_order(self.species, self.n_layers),
                "observation_channels": observation_channels(self.species, self.n_layers, self.in_channels, volume),
                "grid": {"spacing": list(self.grid_spacing), "n_layers": self.n_layers,
                         "points": "point = i * nb + j; i along the cell vector a, j along b; any na x nb (the "
                                   "network is fully convolutional)",
                         "smear": float(self.card.get("smear", 0.0))}}

    def weights_metadata(self) -> dict[str, str]:
        """The safetensors file's own metadata (strings only, as the format requires): what the weights are."""
        return {"format": "asla-agent", "asla_version": asla.__version__, "card_version": str(CARD_VERSION),
                "architecture": architecture_name(self.network_config), "network_kind": self.network_config.kind,
                "species": json.dumps(self.species), "n_layers": str(self.n_layers),
                "in_channels": str(self.in_channels), "network": json.dumps(self.network_config.to_dict()),
                "action_order": "species, layer, point"}

    def save(self, path: str | Path, **card_extra: Any) -> None:
        self.card = self.make_card(**card_extra)
        save_tensors(path, self.net.state_dict(), self.card, self.weights_metadata())

    @classmethod
    def load(cls, path: str | Path, device: str | None = None) -> Agent:
        """The agent of a .safetensors + .json pair, a run directory or a shipped name. Both files are untrusted
        input: the card's fields are checked (the network through the recipe schema's Network section) and the
        weights must be finite floating-point tensors of the shapes that network has, all before the network is
        allocated (`asla.agents.checkpoint`)."""
        path = resolve_agent_path(path)
        tensors, card = load_tensors(path)
        jfile = base_path(path).with_suffix(".json")
        species, spacing, n_layers, in_channels, net_cfg = check_card(card, jfile)
        with torch.device("meta"):  # the shapes the card implies, without memory or random draws
            expected = QNetwork(in_channels, out_channels(species, n_layers, net_cfg), net_cfg).state_dict()
        check_weights(base_path(path).with_suffix(".safetensors"), tensors,
                      {k: tuple(v.shape) for k, v in expected.items()})
        agent = cls(species, spacing, n_layers, in_channels, net_cfg, card=card, device=device)
        agent.net.load_state_dict(tensors)
        return agent


MAX_SPECIES = 32  # species a card may name (a problem's bag rarely has more than three)


def check_card(card: dict, jfile: Path) -> tuple[list[str], tuple[float, float], int, int, NetworkConfig]:
    """The card's fields that build the network, checked: species, grid spacing, layers, channels, network."""
    from ase.data import atomic_numbers

    from asla.problem import MAX_LAYERS
    from asla.schema import check_value, from_mapping

    from .config import Network

    def error(name: str, message: str) -> CheckpointError:
        return CheckpointError(f"{jfile}: {name}: {message}")

    for key in ("species", "grid_spacing", "n_layers", "in_channels", "network"):
        if key not in card:
            raise error(key, "missing: card and weights do not describe an asla agent")
    species = card["species"]
    if not (isinstance(species, list) and 1 <= len(species) <= MAX_SPECIES and len(set(map(str, species))) == len(
            species) and all(isinstance(s, str) and s in atomic_numbers and s != "X" for s in species)):
        raise error("species", f"must be a list of 1 to {MAX_SPECIES} different element symbols, got "
                    f"{str(species)[:60]}")
    spacing = card["grid_spacing"]
    positive = schema.Option("", "number", minimum=0.0, exclusive_minimum=True, maximum=100.0)
    if not isinstance(spacing, list) or len(spacing) != 2:
        raise error("grid_spacing", f"must be two pixel sizes in A, got {str(spacing)[:60]}")
    spacing = tuple(float(check_value(positive, v, "grid_spacing", error)) for v in spacing)
    n_layers = check_value(schema.Option("", "int", minimum=1, maximum=MAX_LAYERS), card["n_layers"], "n_layers",
                           error)
    network = card["network"]
    if not isinstance(network, dict):
        raise error("network", f"must be a mapping, got {str(network)[:60]}")
    kind = network.get("kind", "2d")  # cards from before ASLA-3D are 2D networks
    if kind not in ("2d", "3d"):
        raise error("network.kind", f"unknown {str(kind)[:60]!r}; allowed: 2d, 3d")
    # placed atoms per layer (3d: per species, over the z levels) and the bag, then 0 to 16 template planes
    base = len(species) * 2 if kind == "3d" else len(species) * (n_layers + 1)
    in_channels = check_value(schema.Option("", "int", minimum=base, maximum=base + 16), card["in_channels"],
                              "in_channels", error)
    if "smear" in card:
        check_value(schema.Option("", "number", minimum=0.0, maximum=5.0), card["smear"], "smear", error)
    periodic = network.get("periodic", True)
    if not isinstance(periodic, bool):
        raise error("network.periodic", f"must be true or false, got {str(periodic)[:60]}")
    checked = from_mapping(Network, {k: v for k, v in network.items() if k not in ("periodic", "kind")}, "network.",
                           error)
    fields = {**schema.to_mapping(checked), "kind": kind}
    return species, spacing, n_layers, in_channels, NetworkConfig(**fields, periodic=periodic)


def out_channels(species: list[str], n_layers: int, cfg: NetworkConfig) -> int:
    """The head's channels: one Q map per (species, layer) in 2D, one Q volume per species in 3D."""
    return len(species) if cfg.kind == "3d" else len(species) * n_layers


def network_description(cfg: NetworkConfig) -> dict:
    """The Q-network's forward pass in words and numbers (`asla.agents.qnetwork.QNetwork`), by weight name."""
    k, d, pad = cfg.kernel, cfg.dilation, "circular" if cfg.periodic else "zeros"
    if cfg.kind == "3d":
        conv, space, pad = "conv3d", "(n_z, na, nb)", (f"{pad} along a and b, zeros along z" if cfg.periodic
                                                       else "zeros")
        out = "len(species), channel = species (one Q volume over (z level, a, b) each)"
        shape = "(batch, len(species), n_z, na, nb)"
        given = "float32 (batch, in_channels, n_z, na, nb) observation volume"
    else:
        conv, space = "conv2d", "(na, nb)"
        out = "len(species) * n_layers, channel = species * n_layers + layer"
        shape = "(batch, len(species) * n_layers, na, nb)"
        given = "float32 (batch, in_channels, na, nb) observation image"
    return {
        "name": architecture_name(cfg),
        "activation": "silu",  # x * sigmoid(x)
        "input": given,
        "stem": {"weights": ["stem.weight", "stem.bias"], "op": conv, "kernel": k, "dilation": 1,
                 "padding": k // 2, "padding_mode": pad, "then": "silu"},
        "blocks": {"count": cfg.depth, "weights": ["blocks.{n}.conv.weight", "blocks.{n}.conv.bias"]
                   + (["blocks.{n}.glob.weight", "blocks.{n}.glob.bias"] if cfg.global_branch else []),
                   "op": f"h = {conv}(x, kernel, dilation, padding=dilation * (kernel // 2), padding_mode)"
                         + (f" + linear(mean of x over {space}) broadcast over the pixels" if cfg.global_branch
                            else "") + "; x = x + silu(h)",
                   "kernel": k, "dilation": d, "padding": d * (k // 2), "padding_mode": pad,
                   "global_branch": cfg.global_branch},
        "head": {"weights": ["head.weight", "head.bias"], "op": conv, "kernel": 1, "out_channels": out},
        "output": f"head output {shape} flattened to (batch, n_actions): the Q-value of each action in "
                  "action_order",
    }


def action_order(species: list[str], n_layers: int) -> dict:
    return {"layout": ["species", "layer", "point"],
            "index": "action = (species * n_layers + layer) * (na * nb) + point (3d: layer = z level)",
            "species": list(species), "n_layers": int(n_layers)}


def observation_channels(species: list[str], n_layers: int, in_channels: int, volume: bool = False) -> list[str]:
    """Names of the observation's channels in order (`asla.builder.encode_observation`)."""
    if volume:
        n_template = in_channels - 2 * len(species)
        placed = [f"{s} placed (1 at its voxel; over z level, a, b)" for s in species]
        template = [f"template plane {t} from the top (its 2D image, the same at every z level)"
                    for t in range(n_template)]
        bag = [f"{s} still in the bag, as a fraction of the bag (constant volume)" for s in species]
        return placed + template + bag
    n_template = in_channels - len(species) * (n_layers + 1)
    placed = [f"{s} placed on build layer {layer} (1 at its grid point)" for s in species for layer in range(n_layers)]
    template = [f"template plane {t} from the top (1 at the grid point nearest each atom)" for t in range(n_template)]
    bag = [f"{s} still in the bag, as a fraction of the bag (constant plane)" for s in species]
    return placed + template + bag


def load_card_problem(card: dict, source: str | Path, trust: bool = False) -> Problem:
    """The problem an agent's card names, loaded without running code from the card.

    A card is a downloaded file, and a problem's ``calculator.name`` may be any import path (whose class would be
    imported and called with the card's keywords). So without `trust` the card's problem must be a shipped problem's
    name, or inline problem data whose calculators (``calculator``, ``faults.retry_settings``, any nested ``name``
    or ``inner``) are built-in names and whose keyword values name no file (GPAW's ``txt`` writes one); the
    template may not be read from a file. With `trust` (``asla build --trust-card``) the card's problem is loaded
    as a recipe's would be."""
    from asla.calculators import BUILDERS
    from asla.problem import list_problems, shipped_problem_dir

    name = card.get("problem")
    hint = "give --problem NAME_OR_YAML, or --trust-card if you trust this card"
    if name is None or name == "":
        raise CheckpointError(f"{source}: the agent card names no training problem; give --problem")
    if isinstance(name, str) and name in list_problems():
        return load_problem(shipped_problem_dir() / f"{name}.yaml")
    if trust:
        return load_problem(name)
    if not isinstance(name, dict):
        raise CheckpointError(f"{source}: the card's problem {str(name)[:60]!r} is not a shipped problem "
                              f"({', '.join(list_problems())}); {hint}")
    template = name.get("template")
    if isinstance(template, dict) and template.get("file") is not None:
        raise CheckpointError(f"{source}: the card's problem reads its template from a file (template.file); {hint}")
    problem = load_problem(name)
    for where, spec in (("calculator", problem.calculator), ("faults.retry_settings",
                                                            dict(problem.faults.retry_settings))):
        reason = _untrusted_calculator(spec, where, set(BUILDERS))
        if reason:
            raise CheckpointError(f"{source}: the card's problem {reason}; {hint}")
    return problem


def _untrusted_calculator(spec: Any, where: str, builtin: set[str], is_spec: bool = True) -> str | None:
    """Why a calculator section from a card could run code or touch files (None: it cannot). `is_spec`: `spec` is
    a calculator spec (the section itself or an ``inner`` one), whose ``name`` must be built in."""
    if isinstance(spec, str) and ("/" in spec or "\\" in spec or spec.startswith("~")):
        return f"gives a file path {spec[:60]!r} at {where} (a calculator may write it)"
    if isinstance(spec, dict):
        for key, value in spec.items():
            here = f"{where}.{key}"
            if (key == "name" and is_spec or key == "inner") and isinstance(value, str) and value not in builtin:
                return (f"names calculator {value[:60]!r} at {here}, which is not a built-in calculator "
                        f"({', '.join(sorted(builtin))}): an import path runs code")
            reason = _untrusted_calculator(value, here, builtin, is_spec=key == "inner")
            if reason:
                return reason
    elif isinstance(spec, list):
        for n, value in enumerate(spec):
            reason = _untrusted_calculator(value, f"{where}[{n}]", builtin, is_spec=False)
            if reason:
                return reason
    return None


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
