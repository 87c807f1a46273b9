"""Full-resolution residual flow stage: decoder features (D/2) + the input pair (D) → a flow correction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emorph_deploy.models.layers.fastpath import onednn_conv, onednn_conv_cat, use_channels_last
from emorph_deploy.models.layers.fastpath import use_onednn as _use_onednn
from emorph_deploy.models.layers.upsample import upsample2x_trilinear


class FullResStage(nn.Module):
    """``(features (B, C_feat, D/2, H/2, W/2), pair (B, C_in, D, H, W)) → correction (B, 3, D, H, W)`` voxels.

    ``proj`` (1×1×1) narrows the features at D/2, where it is 8× cheaper (projection and trilinear
    upsampling commute); then at full resolution: Conv3d 3×3×3 on cat(upsampled features, pair) →
    LeakyReLU(0.01) → Conv3d 3×3×3 head to 3 channels. No norm: the features come out of a normalised conv
    block and the pair is intensity-normalised. The head starts at ~N(0, ``init_std``) with zero bias, so
    the stage begins as (nearly) the identity correction, and a model warm-started from one without it
    starts from that model's flow.

    On CPU outside tracing/export the full-resolution tensors run channels-last (NDHWC memory, same NCDHW
    shapes), in training too: oneDNN's 3D conv forward and backward with these few channels is several
    times faster on that layout. The exported graph is the plain one (ONNX has no memory format).
    """

    def __init__(self, feat_chans: int, in_chans: int, width: int, init_std: float = 1e-5) -> None:
        super().__init__()
        self.proj = nn.Conv3d(feat_chans, width, kernel_size=1)
        self.conv = nn.Conv3d(width + in_chans, width, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU(0.01)
        self.head = nn.Conv3d(width, 3, kernel_size=3, padding=1)
        nn.init.normal_(self.head.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.head.bias)

    def _conv(self, conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        # eager float32 inference: oneDNN directly (PyTorch may pick slow_conv3d for small batch-1 convs)
        return onednn_conv(conv, x) if _use_onednn(x) else conv(x)

    def forward(self, features: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        f = upsample2x_trilinear(self._conv(self.proj, features))  # (B, width, D, H, W)
        if _use_onednn(pair):  # eager inference: the concatenation is never written, activation in place
            cl = torch.channels_last_3d
            parts = [f.contiguous(memory_format=cl), pair.contiguous(memory_format=cl)]
            z = F.leaky_relu_(onednn_conv_cat(self.conv, parts), self.act.negative_slope)
        else:
            z = torch.cat([f, pair], dim=1)  # (B, width + C_in, D, H, W)
            if use_channels_last(pair):
                z = z.contiguous(memory_format=torch.channels_last_3d)
            z = self.act(self.conv(z))  # (B, width, D, H, W)
        return self._conv(self.head, z).contiguous()  # (B, 3, D, H, W), plain NCDHW


__all__ = ["FullResStage"]
