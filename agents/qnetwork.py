"""Fully convolutional Q-network: one Q map per (species, layer) on the grid of the cell.

No layer's size depends on the cell, so weights trained on a 3x3 surface cell run unchanged on
a 5x5 one. Circular padding makes the network see the cell as periodic; a global branch (mean
over the cell, broadcast back) lets every pixel know about the whole structure cheaply.

``kind="3d"`` (ASLA-3D) is the same network with 3D convolutions over a voxel volume (channels, z, a, b): circular
padding along the periodic a and b, zero padding along z (the build region ends there), one Q volume per species.
Its flattened output, (species, z, point), is the 2D network's (species, layer, point) action order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("2d", "3d")  # and "auto" in a config, resolved before a network is built


@dataclass
class NetworkConfig:
    width: int = 32
    depth: int = 4
    kernel: int = 5
    dilation: int = 1
    global_branch: bool = True
    periodic: bool = True
    # "2d": stacked planes (C, na, nb); "3d": a voxel volume (C, n_z, na, nb); "auto": what the problem's
    # observation.layout needs (Agent.for_problem), 2d for a network built without a problem
    kind: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)


class Conv3dSlab(nn.Conv3d):
    """Conv3d over (z, a, b): circular padding along a and b when periodic, zeros along z.

    ``nn.Conv3d(padding_mode="circular")`` would wrap z as well, joining the top of the build region to its bottom;
    so a and b are wrapped here by F.pad and z is zero-padded by the convolution itself."""

    def __init__(self, c_in: int, c_out: int, kernel: int, dilation: int = 1, periodic: bool = True) -> None:
        pad = dilation * (kernel // 2)
        super().__init__(c_in, c_out, kernel, dilation=dilation, padding=(pad, 0, 0) if periodic else pad)
        self.wrap = pad if periodic else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wrap:
            x = F.pad(x, (self.wrap, self.wrap, self.wrap, self.wrap, 0, 0), mode="circular")
        return super().forward(x)


def _conv(cfg: NetworkConfig, c_in: int, c_out: int, kernel: int, dilation: int = 1) -> nn.Module:
    if cfg.kind == "3d":
        return Conv3dSlab(c_in, c_out, kernel, dilation, cfg.periodic)
    return nn.Conv2d(c_in, c_out, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                     padding_mode="circular" if cfg.periodic else "zeros")


class _Block(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.conv = _conv(cfg, cfg.width, cfg.width, cfg.kernel, cfg.dilation)
        self.glob = nn.Linear(cfg.width, cfg.width) if cfg.global_branch else None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.glob is not None:
            space = tuple(range(2, x.ndim))  # (na, nb) or (n_z, na, nb): the whole cell
            h = h + self.glob(x.mean(dim=space)).reshape(*x.shape[:2], *(1,) * len(space))
        return x + self.act(h)


class QNetwork(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: NetworkConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or NetworkConfig()
        self.cfg = replace(cfg, kind="2d") if cfg.kind == "auto" else cfg
        self.in_channels, self.out_channels = in_channels, out_channels
        c = self.cfg
        if c.kind not in KINDS:
            raise ValueError(f"network.kind: unknown {c.kind!r}; allowed: {', '.join(KINDS)}")
        self.stem = _conv(c, in_channels, c.width, c.kernel)
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(c.depth)])
        self.head = _conv(c, c.width, out_channels, 1)
        self.act = nn.SiLU()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, out_channels * H * W) Q-values in action order; 3D: (B, C, Z, H, W) volume ->
        (B, out_channels * Z * H * W), out_channels = species."""
        x = self.act(self.stem(obs))
        x = self.blocks(x)
        return self.head(x).flatten(1)

    def receptive_field(self) -> int:
        """Pixels across the local receptive field (the global branch sees everything)."""
        c = self.cfg
        return 1 + (c.kernel - 1) + c.depth * c.dilation * (c.kernel - 1)
