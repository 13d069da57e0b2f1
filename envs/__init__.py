"""Gymnasium environments for asla problems (``asla.envs``).

``gymnasium.make("asla/<problem>-v0")`` works after ``import asla``, which registers one id per shipped problem."""
from __future__ import annotations

import gymnasium

from asla.problem import list_problems

from .build_env import AtomBuildEnv

ENV_IDS: dict[str, str] = {}


def register_all() -> None:
    """Register one id per shipped problem (idempotent)."""
    for name in list_problems():
        env_id = f"asla/{name}-v0"
        ENV_IDS[name] = env_id
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point="asla.envs.build_env:AtomBuildEnv", kwargs={"problem": name})
    if "asla/AtomBuild-v0" not in gymnasium.registry:
        gymnasium.register(id="asla/AtomBuild-v0", entry_point="asla.envs.build_env:AtomBuildEnv")


register_all()

__all__ = ["AtomBuildEnv", "ENV_IDS", "register_all"]
