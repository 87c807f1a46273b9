"""Trilinear ×2 upsampling (``align_corners=False``), with a separable eager fast path for NCDHW tensors.

PyTorch's CPU ``upsample_trilinear3d`` on a contiguous (NCDHW) tensor is several times slower than three
separable 1-D passes (timings in ``benchmarks/results/profile_notes.md``). At ×2 with ``align_corners=False``
each output sample along an axis is ``0.75 x[i] + 0.25 x[i ∓ 1]`` (even/odd phase; the edge sample repeated),
so a pass is two ``lerp``s written straight into the even and odd phases of the output. Channels-last tensors
keep PyTorch's kernel, which is as fast there. The result equals ``F.interpolate`` to float32 rounding (the
sums are associated differently).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from emorph_deploy.models.layers.fastpath import use_fast_upsample

__all__ = ["upsample2x_separable", "upsample2x_trilinear"]


def _upsample2x_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    shape = list(x.shape)
    shape[dim] = 2 * n
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    phases = out.unflatten(dim, (n, 2))
    even, odd = phases.select(dim + 1, 0), phases.select(dim + 1, 1)
    if n > 1:  # even 2i: 0.75 x[i] + 0.25 x[i-1]; odd 2i+1: 0.75 x[i] + 0.25 x[i+1]
        torch.lerp(x.narrow(dim, 1, n - 1), x.narrow(dim, 0, n - 1), 0.25, out=even.narrow(dim, 1, n - 1))
        torch.lerp(x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1), 0.25, out=odd.narrow(dim, 0, n - 1))
    even.narrow(dim, 0, 1).copy_(x.narrow(dim, 0, 1))  # the source index clamps at the faces
    odd.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1))
    return out


def upsample2x_separable(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) → (B, C, 2D, 2H, 2W), contiguous; equal to ``F.interpolate(x, scale_factor=2,
    mode="trilinear", align_corners=False)`` to rounding. No autograd (it writes into strided views)."""
    x = x.contiguous()
    for dim in (4, 3, 2):  # the contiguous axis first: the later passes copy whole rows
        x = _upsample2x_axis(x, dim)
    return x


def upsample2x_trilinear(x: torch.Tensor) -> torch.Tensor:
    """Trilinear ×2 upsampling of (B, C, D, H, W), ``align_corners=False``: the separable passes for a
    contiguous tensor in eager CPU inference, ``F.interpolate`` otherwise (export, training,
    channels-last)."""
    if x.is_contiguous() and use_fast_upsample(x):
        return upsample2x_separable(x)
    return F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)
