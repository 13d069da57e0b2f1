"""Fully convolutional Q-network: one Q map per (species, layer) on the grid of the cell.

No layer's size depends on the cell, so weights trained on a 3x3 surface cell run unchanged on
a 5x5 one. Circular padding makes the network see the cell as periodic; a global branch (mean
over the cell, broadcast back) lets every pixel know about the whole structure cheaply.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class NetworkConfig:
    width: int = 32
    depth: int = 4
    kernel: int = 5
    dilation: int = 1
    global_branch: bool = True
    periodic: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        pad = cfg.dilation * (cfg.kernel // 2)
        self.conv = nn.Conv2d(cfg.width, cfg.width, cfg.kernel, padding=pad, dilation=cfg.dilation,
                              padding_mode="circular" if cfg.periodic else "zeros")
        self.glob = nn.Linear(cfg.width, cfg.width) if cfg.global_branch else None
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.glob is not None:
            h = h + self.glob(x.mean(dim=(2, 3)))[:, :, None, None]
        return x + self.act(h)


class QNetwork(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, cfg: NetworkConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or NetworkConfig()
        self.in_channels, self.out_channels = in_channels, out_channels
        c = self.cfg
        self.stem = nn.Conv2d(in_channels, c.width, c.kernel, padding=c.kernel // 2,
                              padding_mode="circular" if c.periodic else "zeros")
        self.blocks = nn.Sequential(*[_Block(c) for _ in range(c.depth)])
        self.head = nn.Conv2d(c.width, out_channels, 1)
        self.act = nn.SiLU()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, out_channels * H * W) Q-values in action order."""
        x = self.act(self.stem(obs))
        x = self.blocks(x)
        return self.head(x).flatten(1)

    def receptive_field(self) -> int:
        """Pixels across the local receptive field (the global branch sees everything)."""
        c = self.cfg
        return 1 + (c.kernel - 1) + c.depth * c.dilation * (c.kernel - 1)
