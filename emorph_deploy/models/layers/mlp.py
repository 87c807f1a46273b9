"""Transformer MLP: Linear → GELU → Linear (channels-last)."""

from __future__ import annotations

import torch
from torch import nn


class Mlp(nn.Module):
    """(…, C) → (…, C) through a hidden width ``int(C · ratio)``."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
