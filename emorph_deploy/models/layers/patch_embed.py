"""Patch embedding: Conv3d(kernel = stride = patch) + LayerNorm, channels-last output."""

from __future__ import annotations

import torch
from torch import nn

from emorph_deploy.models.layers.fastpath import onednn_conv
from emorph_deploy.models.layers.fastpath import use_onednn as _use_onednn


class PatchEmbed3D(nn.Module):
    """(B, C_in, D, H, W) → (B, D/p, H/p, W/p, C_out): non-overlapping patch conv then LayerNorm."""

    def __init__(self, in_chans: int, embed_dim: int, patch: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_onednn(x):
            # eager CPU inference: PyTorch sends this strided conv to im2col ``slow_conv3d`` at small grids;
            # oneDNN on a channels-last input also returns channels-last, so the permute below is already
            # contiguous and LayerNorm needs no copy (same result up to float32 summation order)
            x = onednn_conv(self.proj, x.contiguous(memory_format=torch.channels_last_3d))
        else:
            x = self.proj(x)  # (B, C, D', H', W')
        return self.norm(x.permute(0, 2, 3, 4, 1))  # (B, D', H', W', C)
