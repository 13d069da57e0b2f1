"""Train sb3-contrib's MaskablePPO with asla's CNN features extractor and report the best energy found.

    python scripts/sb3_example.py --problem tiny-pd2o --steps 2048 --seed 0

A thin example of using asla's environments from Stable-Baselines3 (asla's own agent is ``asla train``): the env's
``action_masks()`` is what MaskablePPO calls, ``maskable_ppo_policy_kwargs`` makes ``"CnnPolicy"`` fit our images,
and a callback reads each finished build's energy from ``info["energy"]``.
"""
from __future__ import annotations

import argparse
import math

import gymnasium
import numpy as np
from sb3_contrib import MaskablePPO
from stable_baselines3.common.callbacks import BaseCallback

import asla  # noqa: F401 - registers the asla/<problem>-v0 ids
from asla.envs.build_env import REWARD_MODES
from asla.envs.sb3 import maskable_ppo_policy_kwargs


class BestEnergy(BaseCallback):
    """Keeps the lowest energy of the finished builds (``info["energy"]`` at termination) and when it was found."""

    def __init__(self) -> None:
        super().__init__()
        self.best = math.inf
        self.best_step: int | None = None
        self.energies: list[float] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            energy = info.get("energy")
            if energy is None or not np.isfinite(energy):
                continue
            self.energies.append(float(energy))
            if energy < self.best:
                self.best, self.best_step = float(energy), self.num_timesteps
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="tiny-pd2o", help="a shipped problem (env id asla/<problem>-v0)")
    parser.add_argument("--steps", type=int, default=2048, help="environment steps to train for")
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy and the env")
    parser.add_argument("--reward-mode", default="fixed", choices=REWARD_MODES,
                        help="the env's reward (fixed: stationary, from the problem's reference energy)")
    parser.add_argument("--fixed-scale", type=float, default=1.0,
                        help="fixed mode: eV per placed atom above the reference where the reward is 0")
    args = parser.parse_args(argv)

    env = gymnasium.make(f"asla/{args.problem}-v0", reward_mode=args.reward_mode,
                         fixed_scale=args.fixed_scale)
    model = MaskablePPO("CnnPolicy", env, policy_kwargs=maskable_ppo_policy_kwargs(env), n_steps=256,
                        batch_size=64, seed=args.seed, verbose=0)
    callback = BestEnergy()
    model.learn(args.steps, callback=callback)

    reference = env.unwrapped.problem.reference_energy
    gap = "" if reference is None else f" (reference {reference:.4f} eV, gap {callback.best - reference:+.4f} eV)"
    energies = callback.energies
    print(f"{args.problem}: {len(energies)} builds in {model.num_timesteps} steps; best energy {callback.best:.4f} eV"
          f" at step {callback.best_step}{gap}")
    k = min(100, len(energies) // 2)
    if k:  # whether the policy learned: its builds' energies early and late in the run
        print(f"mean energy of the first {k} builds {np.mean(energies[:k]):.4f} eV, of the last {k} "
              f"{np.mean(energies[-k:]):.4f} eV")


if __name__ == "__main__":
    main()
