"""Stable-Baselines3 support (``asla.envs.sb3``): a CNN features extractor for asla's observation images.

SB3's default ``NatureCNN`` has 8x8 stride-4 kernels, larger than our smallest grids (8x8 points), and pads with
zeros although the cell is periodic. ``PeriodicCnn`` uses 3x3 kernels, circular padding along the periodic axes
(zero padding along the others) and global pooling, so one network works on any grid size and is equivariant to
whole-pixel shifts of a periodic structure. Importing this module needs stable-baselines3 (``import asla`` does
not)::

    from sb3_contrib import MaskablePPO
    from asla.envs.sb3 import maskable_ppo_policy_kwargs
    env = gymnasium.make("asla/tiny-pd2o-v0")
    model = MaskablePPO("CnnPolicy", env, policy_kwargs=maskable_ppo_policy_kwargs(env)).learn(256)
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn
from torch.nn import functional as F


class PeriodicPad2d(nn.Module):
    """Pad an (N, C, H, W) image by ``width`` pixels: circular along periodic axes, zeros along the others.

    ``nn.Conv2d(padding_mode="circular")`` wraps both axes; a slab periodic along a only (or a molecule, periodic
    along neither) needs them chosen per axis. An (N, C, Z, H, W) volume (``observation.layout: volume``) is padded
    the same way in-plane and with zeros along z, which never wraps."""

    def __init__(self, periodic: tuple[bool, bool], width: int = 1) -> None:
        super().__init__()
        self.periodic = (bool(periodic[0]), bool(periodic[1]))
        self.width = int(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.width
        # F.pad's tuple runs from the last axis: (W left, W right, H left, H right[, Z left, Z right]); a 5D input
        # takes circular padding only as a tuple over its last three axes.
        z = (0, 0) if x.ndim == 5 else ()
        if x.ndim == 5:
            x = F.pad(x, (0, 0, 0, 0, w, w))
        x = F.pad(x, (0, 0, w, w, *z), mode="circular" if self.periodic[0] else "constant")
        return F.pad(x, (w, w, 0, 0, *z), mode="circular" if self.periodic[1] else "constant")

    def extra_repr(self) -> str:
        return f"periodic={self.periodic}, width={self.width}"


class PeriodicCnn(BaseFeaturesExtractor):
    """3x3 convolutions with periodic padding, then global mean and max pooling and a linear layer.

    :param observation_space: the env's ``Box(0, 1, (C, na, nb))``, or ``(C, n_z, na, nb)`` for a volume (3x3x3
        convolutions then).
    :param features_dim: size of the output, what the policy and value heads see.
    :param periodic: whether the image wraps along its first and second spatial axis (the problem's pbc[:2]).
    :param channels: output channels of each convolution (its length is the number of layers).
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 128,
                 periodic: tuple[bool, bool] = (True, True), channels: tuple[int, ...] = (32, 64, 64)) -> None:
        super().__init__(observation_space, features_dim)
        if len(observation_space.shape) not in (3, 4):
            raise ValueError(f"observation_space: expected a (C, H, W) image or a (C, Z, H, W) volume, got shape "
                             f"{observation_space.shape}")
        conv = nn.Conv3d if len(observation_space.shape) == 4 else nn.Conv2d
        self.space_dims = tuple(range(2, len(observation_space.shape) + 1))
        layers: list[nn.Module] = []
        c_in = observation_space.shape[0]
        for c_out in channels:
            layers += [PeriodicPad2d(periodic), conv(c_in, c_out, kernel_size=3), nn.ReLU()]
            c_in = c_out
        self.cnn = nn.Sequential(*layers)
        # Mean and max pooling: invariant to shifts and to the grid size; max keeps "is there a site like this".
        self.linear = nn.Sequential(nn.Linear(2 * c_in, features_dim), nn.ReLU())

    def pooled(self, observations: torch.Tensor) -> torch.Tensor:
        """The globally pooled convolution features (before the linear layer), shape (N, 2 * channels[-1])."""
        h = self.cnn(observations)
        return torch.cat([h.mean(dim=self.space_dims), h.amax(dim=self.space_dims)], dim=1)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pooled(observations))


def periodic_axes(env: gym.Env) -> tuple[bool, bool]:
    """Whether the env's observation image wraps along its two axes: the problem's pbc along a and b."""
    problem = env.unwrapped.problem
    return bool(problem.pbc[0]), bool(problem.pbc[1])


def maskable_ppo_policy_kwargs(env: gym.Env, features_dim: int = 128, **extractor_kwargs: Any) -> dict[str, Any]:
    """``policy_kwargs`` for ``MaskablePPO("CnnPolicy", env, ...)`` (or ``PPO``/``DQN``'s CnnPolicy) on an asla env.

    ``normalize_images=False``: the observation is already float in [0, 1] and not uint8, so SB3 must neither divide
    it by 255 nor check it as an image (SB3's ``is_image_space`` wants uint8)."""
    kwargs = {"features_dim": features_dim, "periodic": periodic_axes(env), **extractor_kwargs}
    return {"features_extractor_class": PeriodicCnn, "features_extractor_kwargs": kwargs, "normalize_images": False}


__all__ = ["PeriodicCnn", "PeriodicPad2d", "maskable_ppo_policy_kwargs", "periodic_axes"]
