"""Stochastic depth: drop a whole residual branch per sample during training (identity in eval)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero the branch for random batch items (probability ``p``); rescale the rest by 1/(1−p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) < keep
        return x * mask.to(x.dtype) / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"
