"""The ASLA agent (``asla.agents``): CNN Q-network, Q-learning with symmetry augmentation, checkpoints, pretrained
agents. The training loop is ``asla.agents.training``; ``train`` is re-exported lazily so that importing the agent
does not import TensorBoard."""
from __future__ import annotations

from typing import Any

from .agent import Agent, BuildResult, list_pretrained
from .qnetwork import NetworkConfig, QNetwork

__all__ = ["Agent", "BuildResult", "NetworkConfig", "QNetwork", "Trainer", "list_pretrained", "train"]


def __getattr__(name: str) -> Any:
    if name in ("train", "Trainer"):
        from . import training
        return getattr(training, name)
    raise AttributeError(f"module 'asla.agents' has no attribute {name!r}")
