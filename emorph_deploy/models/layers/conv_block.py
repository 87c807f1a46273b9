"""Decoder conv block: Conv3d 3×3×3 (no bias) + InstanceNorm3d (no affine) + LeakyReLU(0.01)."""

from __future__ import annotations

import torch
from torch import nn

from emorph_deploy.models.layers.fastpath import onednn_conv, onednn_conv_cat
from emorph_deploy.models.layers.fastpath import use_onednn as _use_onednn


class ConvBlock3d(nn.Module):
    """(B, C_in, D, H, W) → (B, C_out, D, H, W)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.norm = nn.InstanceNorm3d(out_chans, affine=False)
        self.act = nn.LeakyReLU(0.01)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's CPU heuristic (ConvParams::use_mkldnn) sends batch-1 3×3×3 convs with N·C·D·H ≤ 20480 to
        # im2col ``slow_conv3d`` — e.g. the 2-channel skip conv (1·2·80·96 at 160×192×224), several times
        # slower. In eager inference call the oneDNN kernel directly (the one every larger conv already
        # gets; same result up to float32 summation order). Training and export keep nn.Conv3d.
        if _use_onednn(x):
            return onednn_conv(self.conv, x)
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm_act(self._conv(x))

    def forward_cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``forward(torch.cat(parts, dim=1))``. In eager CPU inference the concatenation is never built:
        conv(cat([a, b])) = conv_a(a) + conv_b(b) with the weight split along input channels (no bias;
        exact up to float32 summation order). Saves writing and re-reading the concatenated tensor, one of
        the largest in the decoder (sizes in ``benchmarks/results/profile_notes.md``)."""
        if not _use_onednn(parts[0]):
            return self.forward(torch.cat(parts, dim=1))
        return self._norm_act(onednn_conv_cat(self.conv, parts))

    def _norm_act(self, y: torch.Tensor) -> torch.Tensor:
        # y: (B, C_out, D, H, W), this block's own conv output
        if _use_onednn(y) and _channels_last(y):
            # InstanceNorm3d copies a channels_last_3d tensor back to NCDHW (and is much slower on it). Same
            # statistics computed on the layout instead: viewed as (B, D·H·W, C) the spatial reduction is
            # over an outer axis with contiguous channels. Two-pass (mean, then mean of squared deviations)
            # in float32 like the reference kernel: equal to InstanceNorm3d to ~1e-6.
            b, c = y.shape[:2]
            mean = y.permute(0, 2, 3, 4, 1).reshape(b, -1, c).mean(dim=1)  # (B, C)
            y = y.sub_(mean.view(b, c, 1, 1, 1))  # y is this block's own conv output
            var = y.permute(0, 2, 3, 4, 1).reshape(b, -1, c).square().mean(dim=1)  # (B, C), biased
            y = y.mul_(torch.rsqrt(var + self.norm.eps).view(b, c, 1, 1, 1))
            return self.act(y)
        return self.act(self.norm(y))


def _channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d)
