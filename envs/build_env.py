"""Gymnasium environment: build a structure atom by atom on the problem's grid (``asla/<problem>-v0``).

The full description (spaces, rewards, episode end, info keys, arguments) is the docstring of
:class:`AtomBuildEnv`, in Gymnasium's sections.
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from asla.builder import BuildState, decode_action, n_actions, observation_shape
from asla.errors import ConfigError
from asla.problem import Problem, load_problem
from asla.render import render_atoms
from asla.reward import EnergyEvaluator, RewardScale

REWARD_MODES = ("scaled", "energy", "fixed")


class AtomBuildEnv(gym.Env):
    """Build a structure atom by atom on a pixel grid; the calculator scores the finished structure.

    ## Description
    One episode places every atom of the problem's bag (``problem.bag``, ``problem.n_atoms`` atoms) above the
    template (e.g. a Pd(100) slab), one atom per step, on the problem's grid of ``na x nb`` points along the cell
    vectors a and b at ``n_layers`` heights. When the bag is empty the structure is scored by the problem's
    calculator (EMT, Tersoff, xtb, DFT, ...; relaxed first if the problem asks for it). The goal is the lowest
    energy; ``problem.reference_energy`` is the best known one.

    ## Action Space
    ``Discrete(n_species * n_layers * na * nb)``: action ``(s * n_layers + layer) * na * nb + i * nb + j`` places
    species ``problem.species[s]`` at grid point ``(i, j)`` of ``layer`` (``asla.builder.decode_action``;
    ``describe_action(a)`` says it in words). Most actions are illegal at any step (species not left in the bag,
    too close to an atom, too far from all atoms): the legal ones are ``action_masks()`` (what sb3-contrib's
    MaskablePPO calls) and ``info["action_mask"]`` (bool array of the action space's size). An illegal action
    places nothing and gives reward 0 (see Episode End).

    ## Observation Space
    ``Box(0, 1, (C, na, nb), float32)``, channels first (not uint8: pass ``normalize_images=False`` to SB3, as
    ``asla.envs.sb3.maskable_ppo_policy_kwargs`` does): one channel per (species, layer) with the placed atoms
    (one-hot pixels, or Gaussians if the problem's ``observation.smear`` > 0), then the template's top atomic
    planes, then planes for the atoms still in the bag. The image is periodic along a (b) when ``problem.pbc[0]``
    (``pbc[1]``) is true: pixel ``na`` is pixel 0. A problem with ``observation.layout: volume`` (ASLA-3D, a voxel
    grid of ``n_layers`` z levels) gives ``Box(0, 1, (C, n_layers, na, nb))`` instead: one channel per species with
    its atoms on their z levels, then the template planes and the bag, each the same at every level; the actions
    are the same, with layer = z level.

    ## Rewards
    0 on every step but the last. At the end, from the finished structure's energy E (eV), by ``reward_mode``:

    - ``"scaled"`` (default, what asla's own agent uses): ``asla.reward.RewardScale``, 1 at the lowest E seen so far
      by this env, 0 at the ``reward_quantile`` of the energies seen, clipped to [-1, 1]. The scale moves between
      episodes as lower structures are found, so the same build can get different rewards in two episodes.
    - ``"energy"``: ``-E``, stationary and unbounded (compare it across problems with care).
    - ``"fixed"``: ``clip(1 - (E - E_ref) / (fixed_scale * n_atoms), -1, 1)`` with ``E_ref`` the problem's reference
      energy: stationary, 1 at the reference, 0 at ``fixed_scale`` eV per placed atom above it. Needs a reference.

    A failed calculation, a dead end and a truncation get ``failure_reward`` (default -1; in ``"energy"`` mode
    ``-(E_ref + 2 * fixed_scale * n_atoms)``, the energy at which the fixed mode's reward reaches its floor -1; a
    finished build still higher in energy gets less than a failure there, so set it for such problems).

    ## Episode End
    - Termination: the last atom of the bag is placed and scored.
    - Truncation: no legal action is left before the bag is empty (a dead end, ``info["dead_end"]``), or
      ``max_steps_factor * n_atoms`` steps have been taken (only reachable by a client that takes illegal actions).

    ## Information
    Every step: ``action_mask`` (bool, legal actions now), ``step`` (atoms placed), ``remaining`` (int array, atoms
    left per species), ``n_evaluations`` (calculator calls so far by this env). On an illegal action:
    ``illegal_action`` (True). On a dead end: ``dead_end`` (True), ``atoms`` (the partial structure). At
    termination: ``energy`` (eV; nan if failed), ``energy_relative`` (E - reference, or None), ``failed`` (bool),
    ``error`` (the calculator's message or None), ``atoms`` (the scored, maybe relaxed, ``ase.Atoms``), ``n_calls``
    (calculator calls for this structure), ``cached`` (True if the energy came from the env's cache of builds).

    ## Arguments
    - ``problem``: a shipped problem's name, a ``Problem``, or a problem dict (``asla.problem.load_problem``).
    - ``render_mode``: None or ``"rgb_array"`` (``render()`` returns an image of the structure).
    - ``reward_quantile``: the ``"scaled"`` reward's 0 point, a quantile of the energies seen.
    - ``failure_dir``: where structures whose calculation failed are written (None: not written).
    - ``max_steps_factor``: truncation after this many steps per atom.
    - ``reward_mode``: ``"scaled"``, ``"energy"`` or ``"fixed"`` (see Rewards).
    - ``fixed_scale``: eV per placed atom between reward 1 and 0 in ``"fixed"`` mode.
    - ``failure_reward``: the reward of failures, dead ends and truncations (None: the mode's default).

    ## Version History
    - v0: the first version. ``reward_mode``, ``fixed_scale`` and ``failure_reward`` were added later with defaults
      that keep v0's behaviour.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(self, problem: str | Problem | dict = "pd100-oxide-2x2", render_mode: str | None = None,
                 reward_quantile: float = 0.9, failure_dir: str | None = None,
                 max_steps_factor: int = 10, reward_mode: str = "scaled", fixed_scale: float = 1.0,
                 failure_reward: float | None = None) -> None:
        self.problem = load_problem(problem)
        self.reward_mode = reward_mode
        self.fixed_scale = float(fixed_scale)
        self._failure_reward_given = failure_reward is not None
        self.failure_reward = self._failure_reward(failure_reward)
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
            return self.state.observation(), self.failure_reward if truncated else 0.0, False, truncated, \
                self._info(illegal_action=True)
        self.state.place(action)
        obs = self.state.observation()
        if self.state.done:
            atoms = self.state.atoms()
            ev = self.evaluator.evaluate(atoms, key=self.state.canonical_key())
            reward = self._reward(ev.energy, ev.ok)
            self._last_atoms = ev.atoms
            info = self._info(energy=ev.energy, energy_relative=self.evaluator.relative(ev.energy) if ev.ok else None,
                              failed=not ev.ok, error=ev.error, atoms=ev.atoms, n_calls=ev.n_calls, cached=ev.cached)
            return obs, reward, True, False, info
        mask = self.state.action_mask()
        if not mask.any():
            return obs, self.failure_reward, False, True, self._info(dead_end=True, atoms=self.state.atoms())
        return obs, 0.0, False, False, self._info(mask=mask)

    def action_masks(self) -> np.ndarray:
        return self.state.action_mask()

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        atoms = self._last_atoms if self._last_atoms is not None else self.state.atoms()
        return render_atoms(atoms, n_template=len(self.problem.template))

    # -- helpers -----------------------------------------------------------------------
    def _failure_reward(self, failure_reward: float | None) -> float:
        """Check reward_mode and its needs once, at construction, and fix the reward of failures."""
        if self.reward_mode not in REWARD_MODES:
            raise ConfigError("reward_mode", f"unknown {self.reward_mode!r}; allowed: {', '.join(REWARD_MODES)}")
        if not (np.isfinite(self.fixed_scale) and self.fixed_scale > 0):
            raise ConfigError("fixed_scale", f"must be a positive number of eV per atom, got {self.fixed_scale}")
        ref = self.problem.reference_energy
        if self.reward_mode != "scaled" and ref is None and (self.reward_mode == "fixed" or failure_reward is None):
            raise ConfigError("reward_mode", f"{self.reward_mode!r} needs the problem's reference energy, and "
                              f"{self.problem.name} has none; use 'scaled'"
                              + ("" if self.reward_mode == "fixed" else " or pass failure_reward"))
        if failure_reward is not None:
            return float(failure_reward)
        if self.reward_mode == "energy":
            return -(ref + 2.0 * self.fixed_scale * self.problem.n_atoms)
        return -1.0

    def _reward(self, energy: float, ok: bool) -> float:
        """The final step's reward by reward_mode (the class docstring's Rewards)."""
        if self.reward_mode == "scaled":
            # v0 exactly: RewardScale gives failed (non-finite) builds -1 itself; a given failure_reward overrides it.
            self.scale.update([energy])
            reward = float(self.scale([energy])[0])
            failed = not ok or not np.isfinite(energy)
            return self.failure_reward if failed and self._failure_reward_given else reward
        if not ok or not np.isfinite(energy):
            return self.failure_reward
        if self.reward_mode == "energy":
            return -float(energy)
        above = (float(energy) - self.problem.reference_energy) / (self.fixed_scale * self.problem.n_atoms)
        return float(np.clip(1.0 - above, -1.0, 1.0))

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
