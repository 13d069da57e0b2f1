"""The ASLA agent: CNN Q-network, Q-learning with symmetry augmentation, checkpoints, pretrained agents."""
from __future__ import annotations

from .agent import Agent, BuildResult, list_pretrained
from .qnetwork import NetworkConfig, QNetwork

__all__ = ["Agent", "BuildResult", "NetworkConfig", "QNetwork", "list_pretrained", "train"]


def train(*args, **kwargs):  # noqa: ANN002, ANN003 - thin lazy wrapper keeps `import agents` light
    from .train import train as _train
    return _train(*args, **kwargs)
