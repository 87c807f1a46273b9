"""Decoder conv block: Conv3d 3×3×3 (no bias) + InstanceNorm3d (no affine) + LeakyReLU(0.01)."""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock3d(nn.Module):
    """(B, C_in, D, H, W) → (B, C_out, D, H, W)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.norm = nn.InstanceNorm3d(out_chans, affine=False)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))
