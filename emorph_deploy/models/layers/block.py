"""Transformer block: x + DropPath(Attn(LN(x))); x + DropPath(MLP(LN(x))) on channels-last tokens."""

from __future__ import annotations

import torch
from torch import nn

from emorph_deploy.models.layers.cascaded_attention import CascadedGroupPlaneAttention
from emorph_deploy.models.layers.drop_path import DropPath
from emorph_deploy.models.layers.mlp import Mlp
from emorph_deploy.models.layers.plane_attention import Plane, PlaneAttention


class PlaneBlock(nn.Module):
    """Pre-norm block with plane attention (``attention="plane"``) or cascaded group attention (``"cga"``)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        plane: Plane,
        grid_size: tuple[int, int, int] | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attention: str = "plane",
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        attn_cls = CascadedGroupPlaneAttention if attention == "cga" else PlaneAttention
        self.attn = attn_cls(dim, heads, plane, grid_size, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, D, H, W, C)
        return x + self.drop_path(self.mlp(self.norm2(x)))
