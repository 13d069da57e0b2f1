"""Training recipes: YAML with a problem and hyperparameters, checked against one typed schema, overridable by --set.

:class:`Recipe` declares every key once (type, range or allowed values, default, one-line doc);
:func:`load_config` returns the checked recipe as the plain dict the training loop reads
(``cfg["learning"]["lr"]``), with the same keys and defaults as before; ``Recipe.from_dict(cfg)`` and
``recipe.to_dict()`` give the typed object. The README's "Learning options" table is :func:`markdown_table`.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from asla import schema
from asla.errors import ConfigError
from asla.schema import option, section
from asla.surrogate import SurrogateConfig

MAX_GRAD_STEPS_PER_EPISODE = 64  # a sane bound: more gradient steps per built structure only overfit the buffer


def _problem(value: Any, name: str) -> Any:
    if not isinstance(value, (str, dict)) or isinstance(value, str) and not value:
        raise ConfigError(name, f"must be a shipped problem name, a YAML path or a mapping, got {value!r}")
    return value


def _device(value: Any, name: str) -> Any:
    """cpu, cuda, cuda:N or mps, and present on this machine (checked before anything is written)."""
    if not isinstance(value, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        raise ConfigError(name, f"unknown device {value!r}; allowed: cpu, cuda, cuda:N, mps (or null: cuda when "
                          "available, else cpu)")
    if value.startswith("cuda"):
        import torch
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.partition(":")[2] or 0)
        if index >= n:
            raise ConfigError(name, f"{value!r} is not available on this machine ({n} CUDA device(s)); "
                              "use cpu or leave device unset")
    if value == "mps":
        import torch
        if not torch.backends.mps.is_available():
            raise ConfigError(name, "'mps' is not available on this machine; use cpu or leave device unset")
    return value


def _is_url(value: str) -> bool:
    return "://" in value


def _writable_folder(folder: Path, value: str, name: str) -> None:
    """The nearest existing folder of `folder` is writable (a run makes the rest); checked before anything is made."""
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(name, f"{value!r} cannot be made: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(name, f"{value!r} cannot be written: {folder} is not writable")


def _writable_dir(value: Any, name: str) -> Any:
    _writable_folder(Path(value), value, name)
    return value


def _writable_db(value: Any, name: str) -> Any:
    """A database URL, or a file path that exists or whose folder can be written."""
    if not _is_url(value):
        path = Path(value)
        if path.is_dir():
            raise ConfigError(name, f"{value!r} is a folder; give a database file such as run/evaluations.db")
        if not path.exists():
            _writable_folder(path.parent, value, name)
        elif not os.access(path, os.W_OK):
            raise ConfigError(name, f"{value!r} is not writable")
    return value


def _existing_db(value: Any, name: str) -> Any:
    if not _is_url(value) and not Path(value).is_file():
        raise ConfigError(name, f"file {value!r} does not exist (or give an ase.db URL)")
    return value


@dataclass
class Network:
    """The fully convolutional Q-network (agents/qnetwork.py)."""

    width: int = option(32, "channels of every convolution layer", "int", minimum=1, maximum=1024)
    depth: int = option(4, "residual convolution blocks (the receptive field grows with each)", "int",
                        minimum=1, maximum=64)
    kernel: int = option(5, "convolution kernel size in pixels (odd, so that the output stays centred)", "int",
                         minimum=1, maximum=31, odd=True)
    dilation: int = option(1, "dilation of the convolutions", "int", minimum=1, maximum=16)
    global_branch: bool = option(True, "each block adds a linear map of the channel means (whole-cell context)",
                                 "bool")
    kind: str = option("auto", "2d: convolutions over stacked planes; 3d: over a voxel volume (ASLA-3D, needs the "
                       "problem's observation.layout: volume); auto: what the problem's layout needs", "choice",
                       choices=("auto", "2d", "3d"))


def _schedule(first: float, last: float, decay: int, what: str, upper: float | None) -> type:
    """A linear schedule section (epsilon, temperature): start to end over decay_episodes."""
    kw = {"minimum": 0.0, "maximum": upper}

    @dataclass
    class Schedule:
        start: float = option(first, f"{what} at episode 0", "number", **kw)
        end: float = option(last, f"{what} after decay_episodes", "number", **kw)
        decay_episodes: int = option(decay, "episodes of the linear decay from start to end", "int",
                                     minimum=0, maximum=10**9)

    return Schedule


Epsilon = _schedule(0.5, 0.05, 500, "probability of a random legal action", 1.0)
FineTuneEpsilon = _schedule(0.2, 0.05, 200, "probability of a random legal action (with --init-from)", 1.0)
Temperature = _schedule(0.0, 0.0, 1000, "Boltzmann temperature of the non-random steps (0: greedy)", None)


@dataclass
class Learning:
    """Targets, rewards, replay and optimiser."""

    target: str = option("mc", "`mc`: every step towards its episode's reward; `max`: the best reward reached "
                         "through the same partial structure", "choice", choices=("mc", "max"))
    lr: float = option(1.0e-3, "Adam learning rate", "number", minimum=0.0, exclusive_minimum=True)
    batch_size: int = option(64, "episodes per gradient step", "int", minimum=1, maximum=65536)
    grad_steps_per_episode: float = option(
        1, "may be fractional (0.5: a step every second episode)", "number", minimum=0.0,
        maximum=MAX_GRAD_STEPS_PER_EPISODE)
    loss: str = option("huber", "regression loss of Q towards its target", "choice", choices=("huber", "mse"))
    replay_capacity: int = option(2000, "most recent episodes kept in the replay buffer", "int",
                                  minimum=1, maximum=10**7)
    n_best: int = option(20, "lowest-energy episodes kept besides the recent ones", "int", minimum=0, maximum=10**6)
    best_fraction: float = option(0.25, "share of each batch drawn from the best episodes", "number",
                                  minimum=0.0, maximum=1.0)
    reward_quantile: float = option(0.9, "energy quantile that maps to reward 0 (the lowest energy maps to 1)",
                                    "number", minimum=0.0, exclusive_minimum=True, maximum=1.0)
    weight_decay: float = option(0.0, "Adam weight decay", "number", minimum=0.0)
    warmup_episodes: int = option(16, "episodes built before the first gradient step", "int",
                                  minimum=0, maximum=10**9)
    order_free: bool = option(False, "a state is a random subset of a finished structure and every missing atom an "
                              "action towards its reward (more targets per forward pass; teaches every build order)",
                              "bool")
    reward: str = option("linear", "`log` compresses the distance above the best energy so that near-degenerate "
                         "structures still differ in reward", "choice", choices=("linear", "log"))
    reward_resolution: float = option(0.01, "with `log`: the energy difference resolved, as a fraction of the "
                                      "reward's range", "number", minimum=0.0, exclusive_minimum=True, maximum=1.0)


@dataclass
class Augment:
    """Symmetry augmentation of the learning targets."""

    exact: bool = option(True, "train on a random exact symmetry image of each sampled episode", "bool")
    arbitrary_rotation: bool = option(False, "also arbitrary in-plane rotations, re-gridded onto the grid", "bool")


@dataclass
class Mutation:
    """Mutants of the best builds beside the agent's own (agents/mutation.py): an exploitation move."""

    fraction: float = option(0.0, "share of each iteration's builds made as a mutant of one of the best builds "
                             "(two atoms' species exchanged or one atom moved) instead of by the agent; 0: off",
                             "number", minimum=0.0, maximum=1.0)
    parents: int = option(3, "the lowest-energy distinct builds a mutant is made from, uniformly", "int",
                          minimum=1, maximum=10**6)
    swap_probability: float = option(0.5, "chance that a mutant exchanges two atoms' species rather than moves "
                                     "one (a bag of one species always moves one)", "number", minimum=0.0,
                                     maximum=1.0)
    shift_radius: float = option(1.0, "Angstrom: how far a moved atom may go (to any grid point, any layer)",
                                 "number", minimum=0.0, exclusive_minimum=True)


@dataclass
class Recipe:
    """A training recipe: the problem and every hyperparameter of a run (configs/*.yaml, a run's config.yaml)."""

    problem: Any = option(None, "shipped problem name, a YAML path or an inline mapping (required)", "any",
                          nullable=True, check=_problem)
    problem_overrides: dict = option({}, "problem fields to change, e.g. {relax: {steps: 10}} for relaxation before "
                                     "the reward", "mapping")
    seed: int = option(0, "seed of every random choice (same seed, same run)", "int", minimum=0, maximum=2**32 - 1)
    episodes: int = option(1000, "builds to train for", "int", minimum=1, maximum=10**9)
    n_builders: int = option(4, "builds per iteration, forward passes batched", "int", minimum=1, maximum=4096)
    device: str | None = option(None, "torch device: cpu, cuda, cuda:N or mps (default: cuda when available, "
                                "else cpu)", "str", nullable=True, check=_device)
    torch_threads: int = option(1, "two threads are 1.5-2x faster on an idle 2-vCPU machine, up to 9x slower when "
                                "another job competes (docs/throughput.md)", "int", minimum=1, maximum=1024)
    run_dir: str | None = option(None, "where the run goes (default runs/<recipe>-s<seed>)", "str", nullable=True,
                                 check=_writable_dir)
    network: Network = section(Network, "the Q-network")
    epsilon: Any = section(Epsilon, "epsilon-greedy schedule")
    fine_tune_epsilon: Any = section(FineTuneEpsilon, "epsilon-greedy schedule with --init-from")
    temperature: Any = section(Temperature, "> 0: non-random steps sample softmax(Q/T) (Boltzmann exploration)")
    learning: Learning = section(Learning, "targets, rewards, replay and optimiser")
    augment: Augment = section(Augment, "symmetry augmentation")
    mutation: Mutation = section(Mutation, "mutants of the best builds beside the agent's builds (off by default)")
    surrogate: SurrogateConfig = section(SurrogateConfig, "surrogate relaxation of finished builds (off by default; "
                                         "docs/surrogate.md)")
    checkpoint_every: int = option(200, "episodes between checkpoints", "int", minimum=1, maximum=10**9)
    log_images_every: int = option(100, "episodes between TensorBoard pictures", "int", minimum=1, maximum=10**9)
    log_relevance: bool = option(False, "with the pictures, LRP relevance maps of the chosen action at the first "
                                 "build step and at the best build's last step (docs/explain.md)", "bool")
    record_evaluations: bool = option(True, "every evaluated structure into the evaluations database", "bool")
    database: str | None = option(None, "evaluations database (default run_dir/evaluations.db); any ase.db URL, "
                                  "e.g. postgresql://...", "str", nullable=True, check=_writable_db)
    seed_from_db: str | None = option(None, "ase.db whose structures enter the replay buffer as demonstrations",
                                      "str", nullable=True, check=_existing_db)
    stop_at_reference: bool = option(False, "stop once a build's reward energy reaches the problem's reference "
                                     "(on-grid: exactly; relaxed: within 0.05 eV)", "bool")
    max_evaluations: int | None = option(None, "stop when this many calculator evaluations are spent (benchmarks "
                                         "set a budget)", "int", nullable=True, minimum=1)
    executor: str = option("serial", "where structures are evaluated: serial, process (local pool) or ray (local "
                           "or cluster)", "choice", choices=("serial", "process", "ray"))
    workers: int = option(1, "evaluation workers for process/ray", "int", minimum=1, maximum=4096)
    ray_address: str | None = option(None, "null/local starts Ray here; auto or HOST:PORT joins a cluster", "str",
                                     nullable=True)
    init_from: str | None = option(None, "agent to start from (set by --init-from; kept for --resume)", "str",
                                   nullable=True)
    command: str | None = option(None, "the command line that started the run (recorded in the model card)", "str",
                                 nullable=True)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Check a recipe mapping (without ``name``); one ConfigError line per bad field."""
        recipe = schema.from_mapping(cls, data, "", ConfigError)
        recipe.surrogate.validate()  # the checks between its fields (a model and what it needs)
        _check_surrogate(recipe)
        return recipe

    def to_dict(self) -> dict:
        return schema.to_mapping(self)


def _check_surrogate(recipe: Recipe) -> None:
    """What the surrogate block needs of the rest of the recipe (checked before a run directory is made)."""
    sur = recipe.surrogate
    if not sur.enabled:
        return
    if sur.screen_candidates > 1 and sur.screen_candidates != recipe.n_builders:
        raise ConfigError("surrogate.screen_candidates", f"the candidates of a screening round are one iteration's "
                          f"builds: set n_builders to it too (n_builders {recipe.n_builders}, screen_candidates "
                          f"{sur.screen_candidates})")
    if sur.forces and recipe.executor != "serial":
        raise ConfigError("surrogate.forces", f"force training needs executor serial (workers return energies "
                          f"only), got {recipe.executor}")


DEFAULTS: dict[str, Any] = Recipe().to_dict()


def _merge(base: dict, over: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        name = f"{prefix}{k}"
        if k not in base:
            raise ConfigError(name, f"unknown key; allowed: {', '.join(sorted(base))}")
        if isinstance(base[k], dict) and k not in ("problem", "problem_overrides"):
            if not isinstance(v, dict):
                raise ConfigError(name, f"must be a mapping with keys {', '.join(sorted(base[k]))}")
            out[k] = _merge(base[k], v, f"{name}.")
        else:
            out[k] = v
    return out


def parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):
        return text  # not YAML: kept as the string, which the schema then judges
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    return value


def _read_recipe(path: str | Path) -> dict:
    """A recipe file or shipped recipe name; a problem (its YAML, or a shipped problem without a recipe of its own)
    gets the default recipe derived from it (asla.agents.defaults)."""
    from .defaults import default_recipe
    p = Path(path)
    if not p.exists():
        from importlib import resources

        from asla.problem import list_problems
        shipped = Path(str(resources.files("asla.configs"))) / f"{path}.yaml"
        if not shipped.exists():
            if not p.suffix and str(path) in list_problems():
                return {**default_recipe(str(path)), "name": str(path)}
            raise ConfigError("config", f"file {str(path)!r} does not exist")
        p = shipped
    data = schema.load_yaml_file(p, "config", ConfigError) or {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{p} must hold a mapping")
    if "bag" in data and "problem" not in data:  # a problem file, not a recipe: train on it with the default recipe
        return {**default_recipe(str(p)), "name": p.stem}
    data.setdefault("name", p.stem)
    return data


def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None) -> dict:
    """Recipe (path or dict) merged over the defaults, with 'key.sub=value' overrides, checked by :class:`Recipe`."""
    if path is None:
        data: dict = {}
    elif isinstance(path, dict):
        schema.check_size(path, "config", ConfigError)
        data = copy.deepcopy(path)
    else:
        data = _read_recipe(path)
    name = data.pop("name", None)
    if name is not None and not isinstance(name, str):
        raise ConfigError("name", f"must be a string, got {name!r}")
    cfg = _merge(DEFAULTS, data)
    for item in overrides or []:
        _apply_override(cfg, item)
    if cfg["problem"] is None:
        raise ConfigError("problem", "is required: a shipped problem name, a YAML path or a mapping")
    cfg = Recipe.from_dict(cfg).to_dict()
    _check_problem(cfg)
    cfg["name"] = name or (cfg["problem"] if isinstance(cfg["problem"], str) else "run")
    return cfg


def _check_problem(cfg: dict) -> None:
    """Load the problem with the recipe's overrides (cheap: no random builds), so that a bad problem or
    problem_overrides value, or a network kind that does not fit the problem's observation, fails here, in one
    line, before a run directory is made."""
    from asla.problem import load_problem

    from .agent import network_kind_for
    network_kind_for(load_problem(cfg["problem"], **cfg["problem_overrides"]), cfg["network"]["kind"])


def _apply_override(cfg: dict, item: str) -> None:
    """One --set KEY=VALUE into the merged recipe (the schema checks the value afterwards)."""
    if "=" not in item:
        raise ConfigError("--set", f"expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for part in parts[:-1]:
        if parts[0] == "problem_overrides":
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"{part} is not a mapping here")
            continue
        if part not in node or not isinstance(node[part], dict):
            raise ConfigError(key, f"unknown key; allowed: {', '.join(sorted(node))}")
        node = node[part]
    if parts[-1] not in node and parts[0] not in ("problem", "problem_overrides"):
        raise ConfigError(key, f"unknown key; allowed: {', '.join(sorted(node))}")
    if isinstance(node.get(parts[-1]), dict) and parts[0] != "problem_overrides" and len(parts) == 1 \
            and parts[0] != "problem":
        raise ConfigError(key, f"is a section; set its keys, e.g. {key}.{next(iter(node[parts[-1]]))}=...")
    node[parts[-1]] = parse_value(value)


def _cell(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def markdown_table() -> str:
    """The README's "Learning options (recipe keys)" table, one row per recipe key, from the schema."""
    lines = ["| key | default | what |", "|---|---|---|"]
    for key, default, doc in schema.rows(Recipe):
        lines.append(f"| `{key}` | {_cell(default)} | {doc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
