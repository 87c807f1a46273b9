"""Cascade stage: a small conv U-Net that sees the moving image warped by the network's flow and the fixed
image, and adds a flow correction (one learned refinement iteration inside the network)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emorph_deploy.models.layers.fastpath import onednn_conv, onednn_conv_cat, use_channels_last
from emorph_deploy.models.layers.fastpath import use_onednn as _use_onednn
from emorph_deploy.models.layers.upsample import upsample2x_trilinear

_SLOPE = 0.01  # LeakyReLU negative slope, as in the decoder


class CascadeStage(nn.Module):
    """``(pair (B, C_in, D, H, W), features (B, C_feat, D/2, H/2, W/2)) → correction (B, 3, D, H, W)`` voxels.

    ``pair`` is cat(moving warped by the network's flow, fixed): the stage estimates what that flow left.
    The backbone's decoder already sees the whole displacement at once; a network that sees only the
    residual, with a receptive field of several centimetres, recovers the part of a displacement the
    single pass under-estimates (``benchmarks/results/network_precision.md``).

    Encoder (3×3×3 conv + LeakyReLU, stride 2 from level to level): D → D/2 (w) → D/4 (2w) → D/8 (2w, and
    one more conv there). Decoder: up ×2 → cat skip → conv, to D/4 (w) and D/2 (w), where the decoder
    ``features`` join; a 3×3×3 head gives the correction at D/2, upsampled ×2. Nothing runs at full
    resolution but the strided first conv, which reads it (the full-resolution stage precedes this one). No
    norm: the pair is intensity-normalised, and a plain conv stack quantises cleanly. The head starts at
    ~N(0, ``init_std``) with zero bias, so a model warm-started from one without the stage keeps its flow.
    """

    def __init__(self, in_chans: int, feat_chans: int, width: int, init_std: float = 1e-5) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Conv3d(in_chans, w, kernel_size=3, stride=2, padding=1)  # D/2
        self.enc2 = nn.Conv3d(w, 2 * w, kernel_size=3, stride=2, padding=1)  # D/4
        self.enc3 = nn.Conv3d(2 * w, 2 * w, kernel_size=3, stride=2, padding=1)  # D/8
        self.mid = nn.Conv3d(2 * w, 2 * w, kernel_size=3, padding=1)  # D/8
        self.dec2 = nn.Conv3d(4 * w, w, kernel_size=3, padding=1)  # D/4: cat(up(mid), enc2)
        self.dec1 = nn.Conv3d(2 * w + feat_chans, w, kernel_size=3, padding=1)  # D/2: cat(up, enc1, feat)
        self.head = nn.Conv3d(w, 3, kernel_size=3, padding=1)
        nn.init.normal_(self.head.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.head.bias)

    def _conv(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        # eager float32 inference: oneDNN directly (PyTorch may pick slow_conv3d for small batch-1 convs)
        if _use_onednn(x):
            return F.leaky_relu_(onednn_conv(conv, x), _SLOPE)
        if use_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return F.leaky_relu(conv(x), _SLOPE)

    def _conv_cat(self, conv: nn.Conv3d, parts: list[torch.Tensor]) -> torch.Tensor:
        if _use_onednn(parts[0]):  # eager inference: the concatenation is never written
            cl = torch.channels_last_3d
            return F.leaky_relu_(
                onednn_conv_cat(conv, [p.contiguous(memory_format=cl) for p in parts]), _SLOPE
            )
        return self._conv(conv, torch.cat(parts, dim=1))

    def forward(self, pair: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        e1 = self._conv(self.enc1, pair)  # (B, w, D/2, H/2, W/2)
        e2 = self._conv(self.enc2, e1)  # (B, 2w, D/4, H/4, W/4)
        e3 = self._conv(self.mid, self._conv(self.enc3, e2))  # (B, 2w, D/8, H/8, W/8)
        d2 = self._conv_cat(self.dec2, [upsample2x_trilinear(e3), e2])  # (B, w, D/4, H/4, W/4)
        d1 = self._conv_cat(self.dec1, [upsample2x_trilinear(d2), e1, features])  # (B, w, D/2, H/2, W/2)
        if _use_onednn(d1):
            corr = onednn_conv(self.head, d1)
        else:
            corr = self.head(d1)
        return upsample2x_trilinear(corr.contiguous())  # (B, 3, D, H, W), plain NCDHW


__all__ = ["CascadeStage"]
