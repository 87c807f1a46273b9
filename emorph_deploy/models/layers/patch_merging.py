"""Patch merging: concatenate each 2×2×2 neighbourhood, LayerNorm, Linear (no bias)."""

from __future__ import annotations

import itertools

import torch
from torch import nn


class PatchMerging3D(nn.Module):
    """(B, D, H, W, C) → (B, D/2, H/2, W/2, C_out) via concat(8·C) → LayerNorm(8·C) → Linear(8·C → C_out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [x[:, i::2, j::2, k::2, :] for i, j, k in itertools.product((0, 1), repeat=3)]
        x = torch.cat(parts, dim=-1)  # (B, D/2, H/2, W/2, 8C)
        return self.reduction(self.norm(x))
