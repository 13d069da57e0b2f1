"""Training recipes: YAML with a problem and hyperparameters, validated, overridable by --set."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from asla.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "problem": None,            # shipped problem name, a YAML path, or an inline mapping
    "problem_overrides": {},    # problem fields to change, e.g. {relax: {steps: 10}} for relaxation before the reward
    "seed": 0,
    "episodes": 1000,
    "n_builders": 4,            # builds per iteration, forward passes batched
    "device": None,             # cuda when available, else cpu
    "torch_threads": 1,         # 2 threads: 1.5-2x faster steps on an idle 2-vCPU machine, 9x slower when another job competes (docs/throughput.md)
    "run_dir": None,            # default runs/<recipe>-s<seed>
    "network": {"width": 32, "depth": 4, "kernel": 5, "dilation": 1, "global_branch": True},
    "epsilon": {"start": 0.5, "end": 0.05, "decay_episodes": 500},
    "fine_tune_epsilon": {"start": 0.2, "end": 0.05, "decay_episodes": 200},   # used with --init-from
    "temperature": {"start": 0.0, "end": 0.0, "decay_episodes": 1000},  # > 0: Boltzmann sampling of the non-random steps
    "learning": {"target": "mc", "lr": 1.0e-3, "batch_size": 64, "grad_steps_per_episode": 1, "loss": "huber",
                 "replay_capacity": 2000, "n_best": 20, "best_fraction": 0.25, "reward_quantile": 0.9, "weight_decay": 0.0,
                 "warmup_episodes": 16, "order_free": False,
                 "reward": "linear", "reward_resolution": 0.01},
    "augment": {"exact": True, "arbitrary_rotation": False},
    "checkpoint_every": 200,    # episodes
    "log_images_every": 100,    # episodes
    "record_evaluations": True, # every evaluated structure into the evaluations database
    "database": None,           # default run_dir/evaluations.db; any ase.db URL (e.g. postgresql://...)
    "seed_from_db": None,       # ase.db whose structures enter the replay buffer as demonstrations
    "stop_at_reference": False, # stop once a build reaches the problem's reference energy (on-grid)
    "max_evaluations": None,    # stop once this many calculator evaluations are spent (a budget, as benchmarks set)
    "executor": "serial",       # serial | process (local pool) | ray (local or cluster)
    "workers": 1,               # evaluation workers for process/ray
    "ray_address": None,        # None/local starts Ray here; "auto" or HOST:PORT joins a cluster
    "init_from": None,          # agent to start from (set by --init-from; kept for --resume)
    "command": None,            # the command line that started the run (recorded in the model card)
}

CHOICES = {"learning.loss": ("huber", "mse"), "learning.target": ("mc", "max"), "learning.reward": ("linear", "log")}


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
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            pass
    return value


def load_config(path: str | Path | dict | None = None, overrides: list[str] | None = None) -> dict:
    """Recipe (path or dict) merged over the defaults, with 'key.sub=value' overrides."""
    if path is None:
        data: dict = {}
    elif isinstance(path, dict):
        data = copy.deepcopy(path)
    else:
        p = Path(path)
        if not p.exists():
            from importlib import resources
            shipped = Path(str(resources.files("asla.configs"))) / f"{path}.yaml"
            if not shipped.exists():
                raise ConfigError("config", f"file {str(path)!r} does not exist")
            p = shipped
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError("config", f"{p} must hold a mapping")
        data.setdefault("name", p.stem)
    name = data.pop("name", None)
    cfg = _merge(DEFAULTS, data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError("--set", f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for part in parts[:-1]:
            if parts[0] == "problem_overrides":
                node = node.setdefault(part, {})
                continue
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(key, f"unknown key; allowed: {', '.join(sorted(node))}")
            node = node[part]
        if parts[-1] not in node and parts[0] not in ("problem", "problem_overrides"):
            raise ConfigError(key, f"unknown key; allowed: {', '.join(sorted(node))}")
        node[parts[-1]] = parse_value(value)
    if cfg["problem"] is None:
        raise ConfigError("problem", "is required: a shipped problem name, a YAML path or a mapping")
    for key, allowed in CHOICES.items():
        sec, sub = key.split(".")
        if cfg[sec][sub] not in allowed:
            raise ConfigError(key, f"unknown value {cfg[sec][sub]!r}; allowed: {', '.join(allowed)}")
    for key in ("episodes", "n_builders", "checkpoint_every"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(key, f"must be a positive integer, got {cfg[key]!r}")
    cfg["name"] = name or (cfg["problem"] if isinstance(cfg["problem"], str) else "run")
    return cfg
