"""Cascaded group attention (EfficientViT, Liu et al. 2023) on plane attention.

Channels are split into h groups of C/h. Head i takes group i plus the (voxel-wise) output of head i−1,
applies its own q/k/v projection Linear(C/h → 3·C/h, no bias) and runs single-head plane attention on it
(token vector S·C/h, scale 1/sqrt(S·C/h), as for a head of :class:`PlaneAttention`). Head outputs are
concatenated → ReLU → Linear(C → C). The q/k/v projections cost 3C²/h instead of 3C².
"""

from __future__ import annotations

import torch
from torch import nn

from emorph_deploy.models.layers.plane_attention import Plane, plane_attention


class CascadedGroupPlaneAttention(nn.Module):
    """(B, D, H, W, C) → (B, D, H, W, C), heads computed in sequence, each feeding the next."""

    def __init__(
        self,
        dim: int,
        heads: int,
        plane: Plane,
        grid_size: tuple[int, int, int] | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.dim, self.heads, self.plane = dim, heads, tuple(plane)
        self.group = dim // heads
        self.shape = None if grid_size is None else (*(int(s) for s in grid_size), self.group)
        self.qkvs = nn.ModuleList(nn.Linear(self.group, 3 * self.group, bias=qkv_bias) for _ in range(heads))
        self.act = nn.ReLU()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.split(self.group, dim=-1)  # h × (B, D, H, W, C/h)
        outs: list[torch.Tensor] = []
        feat = groups[0]
        for i, qkv in enumerate(self.qkvs):
            if i > 0:
                feat = groups[i] + outs[-1]
            q, k, v = qkv(feat).split(self.group, dim=-1)
            outs.append(plane_attention(q, k, v, self.plane, 1, self.shape))  # (B, D, H, W, C/h)
        return self.proj(self.act(torch.cat(outs, dim=-1)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, plane={self.plane}"
