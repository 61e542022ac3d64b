"""Encoder and decoder of the SQ-VAE paper's vision experiments (ResNet-style, width d).

Image (C, S, S) --conv4x4/2--> (d/2, S/2) --conv4x4/2--> (d, S/4) --conv3x3--> res blocks
--> z (d, S/4, S/4); 28x28 gives a 7x7 grid and 32x32 an 8x8 grid. The decoder mirrors it
with transposed convolutions. As in the official code, the encoder's last residual block is
split into a mean head and (for Gaussian SQ-VAE II-IV and the VAE) a log-variance head.
"""
from __future__ import annotations

import torch
from torch import nn


def _norm(ch: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(ch) if batch_norm else nn.Identity()


class ResBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), with optional batch-norm after each conv."""

    def __init__(self, dim: int, batch_norm: bool = True):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(), nn.Conv2d(dim, dim, 3, 1, 1), _norm(dim, batch_norm),
            nn.ReLU(), nn.Conv2d(dim, dim, 1), _norm(dim, batch_norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, in_channels: int, dim: int, num_rb: int, batch_norm: bool = True,
                 with_log_var: bool = False):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, dim // 2, 4, 2, 1), _norm(dim // 2, batch_norm), nn.ReLU(),
            nn.Conv2d(dim // 2, dim, 4, 2, 1), _norm(dim, batch_norm), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, 1, 1),
        )
        self.res = nn.Sequential(*[ResBlock(dim, batch_norm) for _ in range(num_rb - 1)])
        self.res_mean = ResBlock(dim, batch_norm)
        self.res_log_var = ResBlock(dim, batch_norm) if with_log_var else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (z, log_var) each (B, d, S/4, S/4); log_var is None without the head."""
        h = self.res(self.conv(x))
        log_var = self.res_log_var(h) if self.res_log_var is not None else None
        return self.res_mean(h), log_var


class Decoder(nn.Module):
    """Returns pre-activation outputs (B, out_channels, S, S); the likelihood decides the link."""

    def __init__(self, out_channels: int, dim: int, num_rb: int, batch_norm: bool = True):
        super().__init__()
        self.res = nn.Sequential(*[ResBlock(dim, batch_norm) for _ in range(num_rb)])
        self.convt = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 3, 1, 1), _norm(dim, batch_norm), nn.ReLU(),
            nn.ConvTranspose2d(dim, dim // 2, 4, 2, 1), _norm(dim // 2, batch_norm), nn.ReLU(),
            nn.ConvTranspose2d(dim // 2, out_channels, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.convt(self.res(z))
