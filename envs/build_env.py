"""Gymnasium environment: build a structure atom by atom on the problem's grid.

Observation: float32 image (C, na, nb): placed atoms per (species, layer), template planes,
remaining-bag planes. Action: Discrete over (species, layer, grid point); illegal ones are masked
(``action_masks()`` for sb3-contrib's MaskablePPO, ``info["action_mask"]`` for everyone else);
an unmasked illegal action places nothing, and after max_steps_factor x atoms steps the episode is
truncated with the worst reward.
Reward only at the end, from the energy of the finished structure; raw energy in ``info``.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from asla.builder import BuildState, decode_action, n_actions, observation_shape
from asla.problem import Problem, load_problem
from asla.render import render_atoms
from asla.reward import EnergyEvaluator, RewardScale


class AtomBuildEnv(gym.Env):
    """One episode places every atom of the bag, then the calculator scores the structure."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, problem: str | Problem | dict = "pd100-oxide-2x2", render_mode: str | None = None,
                 reward_quantile: float = 0.9, failure_dir: str | None = None,
                 max_steps_factor: int = 10) -> None:
        self.problem = load_problem(problem)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode: unknown {render_mode!r}; allowed: rgb_array or None")
        self.render_mode = render_mode
        shape = observation_shape(self.problem)
        self.observation_space = spaces.Box(low=0.0, high=1.0, shape=shape, dtype=np.float32)
        self.action_space = spaces.Discrete(n_actions(self.problem))
        self.evaluator = EnergyEvaluator(self.problem, failure_dir=failure_dir)
        self.scale = RewardScale(quantile=reward_quantile)
        self.state = BuildState(self.problem)
        self._last_atoms = None
        self._steps = 0
        self.max_steps = max_steps_factor * self.problem.n_atoms

    # -- Gymnasium API ------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.state = BuildState(self.problem)
        self._last_atoms = None
        self._steps = 0
        return self.state.observation(), self._info()

    def step(self, action):
        action = int(action)
        self._steps += 1
        if not self.state.is_legal(action):
            # A client that ignores the mask: nothing is placed; too many such steps end the episode.
            truncated = self._steps >= self.max_steps
            return self.state.observation(), -1.0 if truncated else 0.0, False, truncated, \
                self._info(illegal_action=True)
        self.state.place(action)
        obs = self.state.observation()
        if self.state.done:
            atoms = self.state.atoms()
            ev = self.evaluator.evaluate(atoms, key=self.state.canonical_key())
            self.scale.update([ev.energy])
            reward = float(self.scale([ev.energy])[0])
            self._last_atoms = ev.atoms
            info = self._info(energy=ev.energy, energy_relative=self.evaluator.relative(ev.energy) if ev.ok else None,
                              failed=not ev.ok, error=ev.error, atoms=ev.atoms, n_calls=ev.n_calls, cached=ev.cached)
            return obs, reward, True, False, info
        mask = self.state.action_mask()
        if not mask.any():
            return obs, -1.0, False, True, self._info(dead_end=True, atoms=self.state.atoms())
        return obs, 0.0, False, False, self._info(mask=mask)

    def action_masks(self) -> np.ndarray:
        return self.state.action_mask()

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        atoms = self._last_atoms if self._last_atoms is not None else self.state.atoms()
        return render_atoms(atoms, n_template=len(self.problem.template))

    # -- helpers -----------------------------------------------------------------------
    def _info(self, mask: np.ndarray | None = None, **extra: Any) -> dict[str, Any]:
        info = {"action_mask": self.state.action_mask() if mask is None else mask,
                "step": self.state.step_index, "remaining": self.state.remaining.copy(),
                "n_evaluations": self.evaluator.n_calls}
        info.update(extra)
        return info

    def describe_action(self, action: int) -> str:
        s, layer, k = decode_action(self.problem, action)
        i, j = divmod(k, self.problem.grid.nb)
        return f"{self.problem.species[s]} at layer {layer}, grid point ({i}, {j})"
