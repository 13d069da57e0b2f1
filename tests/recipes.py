"""Small recipes the training tests share: a network and replay small enough that a tiny-pd2o run takes seconds."""
from __future__ import annotations

from asla.agents.config import load_config

TINY = {"network": {"width": 8, "depth": 2, "kernel": 3}, "n_builders": 4, "checkpoint_every": 20,
        "learning": {"batch_size": 16, "warmup_episodes": 4}, "log_images_every": 20}


def tiny_cfg(**extra) -> dict:
    """The tiny-pd2o recipe with TINY's settings, then `extra` over the checked recipe."""
    cfg = load_config({"problem": "tiny-pd2o", **TINY})
    cfg.update(extra)
    return cfg
