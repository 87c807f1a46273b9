"""Plane-based attention (the correct form of EfficientMorph's attention).

A block has a plane (axes a, b ∈ {1, 2, 3} = D, H, W of a channels-last (B, D, H, W, C) tensor) and a
stacking axis s (the third). Each of the N = |a|·|b| plane positions is one token; its q (k, v) is the
concatenation along s of the per-voxel C-channel vectors, length S·C.

Head split (our documented choice): head i owns channel group i (C/h channels) of *every* slice along s, so
its vectors have length S·C/h and there is one N×N attention map per head, shared across the stacking axis.
Softmax scale = 1/sqrt(S·C/h) (the dot-product length). The output is reshaped back and the permutation
undone, so each voxel receives its own plane position's output. Batch items never mix.

Kernels: when traced / exported, attention is written as MatMul + Softmax + MatMul (plain ONNX ops,
TensorRT-friendly). In eager torch it calls
``F.scaled_dot_product_attention`` (same scale), which on CPU runs the blocked flash kernel — no N×N map in
memory, scale fused, no head-dim limit — equal to the explicit form up to float32 rounding (~1e-6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from emorph_deploy.models.layers.fastpath import reference_ops_required

Plane = tuple[int, int]


def plane_permutation(plane: Plane) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Permutation (B, D, H, W, C) → (B, A, Bp, S, C) for ``plane`` = (a, b), and its inverse."""
    a, b = plane
    s = 6 - a - b
    perm = (0, a, b, s, 4)
    inv = tuple(perm.index(i) for i in range(5))
    return perm, inv


def _plane_attention_permuted(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plane: Plane,
    heads: int,
    shape: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """:func:`plane_attention` without the final un-permutation: returns the contiguous (B, A, Bp, S, C)
    output and ``inv`` (``out.permute(*inv)`` is (B, D, H, W, C)). Lets a per-voxel Linear run on the
    contiguous tensor before the (free) permuted view instead of after it (saves one full-tensor copy)."""
    dhwc = tuple(int(x) for x in q.shape[1:]) if shape is None else tuple(shape)
    perm, inv = plane_permutation(plane)
    na, nb, ns, c = (dhwc[perm[i] - 1] for i in (1, 2, 3, 4))
    q, k, v = (t.permute(*perm) for t in (q, k, v))  # (B, A, Bp, S, C)
    n, hd = na * nb, ns * (c // heads)  # tokens, head vector length S·C/h

    def split(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, n, ns, heads, c // heads)  # (B, N, S, h, C/h)
        return t.permute(0, 3, 1, 2, 4).reshape(-1, heads, n, hd)  # (B, h, N, S·C/h)

    qh, kh, vh = split(q), split(k), split(v)
    scale = 1.0 / math.sqrt(hd)
    if reference_ops_required():  # export/analysis: explicit MatMul + Softmax + MatMul (TensorRT-listed ops)
        attn = torch.matmul(qh * scale, kh.transpose(-2, -1))  # (B, h, N, N)
        attn = torch.softmax(attn, dim=-1)
        out = torch.matmul(attn, vh)  # (B, h, N, S·C/h)
    else:  # eager: fused kernel (flash attention on CPU), same scale
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # (B, h, N, S·C/h)
    out = out.reshape(-1, heads, n, ns, c // heads).permute(0, 2, 3, 1, 4)  # (B, N, S, h, C/h)
    return out.reshape(-1, na, nb, ns, c), inv  # (B, A, Bp, S, C) contiguous


def plane_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plane: Plane,
    heads: int,
    shape: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Global attention over the plane positions. q, k, v: (B, D, H, W, C) → (B, D, H, W, C).

    ``shape`` = static (D, H, W, C) (modules pass it so traced/exported graphs hold constants, not Shape ops);
    by default it is read from ``q``.
    """
    out, inv = _plane_attention_permuted(q, k, v, plane, heads, shape)  # (B, A, Bp, S, C)
    return out.permute(*inv)  # (B, D, H, W, C)


class PlaneAttention(nn.Module):
    """qkv = Linear(C → 3C, no bias) per voxel → plane attention (h heads) → Linear(C → C)."""

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
        self.shape = None if grid_size is None else (*(int(s) for s in grid_size), dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, D, H, W, 3C): [q | k | v] along channels
        q, k, v = qkv.split(self.dim, dim=-1)
        out, inv = _plane_attention_permuted(q, k, v, self.plane, self.heads, self.shape)  # (B, A, Bp, S, C)
        if reference_ops_required():  # export: proj after the Transpose, the graph the artifacts hold
            return self.proj(out.permute(*inv))  # (B, D, H, W, C)
        # eager: proj acts per voxel on the channel axis, which the plane permutation keeps in place, so apply
        # it to the contiguous tensor and return the permuted view (saves the copy Linear makes of a strided
        # input; the residual add in PlaneBlock takes the view and writes x's contiguous layout)
        return self.proj(out).permute(*inv)  # (B, D, H, W, C)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, plane={self.plane}"
