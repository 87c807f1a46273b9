"""``grid_sample`` of one 3D volume on every thread.

torch's CPU 3D ``grid_sample`` kernel (forward and backward) parallelises over the batch dimension only, so
registration's typical call — one volume, millions of sample points — runs on a single core. The helper
below splits the sample points into ``parts`` equal runs and samples them as a batch of ``parts``
zero-copy views (``expand``) of the same volume: every point is computed by the same kernel with the same
arithmetic, so the result is bit-identical to the plain call (tests assert ``torch.equal``), and autograd
works through it (``expand``'s backward sums the per-run input gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["c_order_view", "grid_sample_3d", "index_to_grid"]

#: Below this many points per part the split is not worth its bookkeeping.
_MIN_POINTS_PER_PART = 1 << 14


#: 4x4 map between the indices (i, j, k) of a 3D array and (k, j, i) of its transpose (its own inverse).
_REVERSE_AXES = np.eye(4)[[2, 1, 0, 3]]


def c_order_view(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(view, P)``: a Fortran-ordered 3D array (what nibabel reads) as its reversed, C-contiguous view
    ``arr.T`` — no copy — with ``P`` the 4x4 map from ``arr``'s indices to the view's (the axis reversal);
    any other array as is, with ``P`` the identity. A voxel-to-world affine ``A`` of ``arr`` is ``A @ P`` for
    the view (``P`` is its own inverse)."""
    if arr.ndim == 3 and arr.flags.f_contiguous and not arr.flags.c_contiguous:
        return arr.T, _REVERSE_AXES.copy()
    return arr, np.eye(4)


def index_to_grid(shape: Sequence[int]) -> np.ndarray:
    """4x4 map from array indices ``(a0, a1, a2, 1)`` of a volume of ``shape`` to ``grid_sample``'s
    normalised coordinates ``(x, y, z, 1) = (a2, a1, a0)`` scaled to [-1, 1] (``align_corners=True``)."""
    n = np.zeros((4, 4))
    for row, axis in ((0, 2), (1, 1), (2, 0)):
        n[row, axis] = 2.0 / max(int(shape[axis]) - 1, 1)
        n[row, 3] = -1.0
    n[3, 3] = 1.0
    return n


def grid_sample_3d(
    src: torch.Tensor,
    grid: torch.Tensor,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
    align_corners: bool = True,
    parts: int | None = None,
) -> torch.Tensor:
    """``F.grid_sample`` for a single 5D volume, spread over ``parts`` threads (default: torch's count).

    ``src`` (1, C, D, H, W); ``grid`` (1, d, h, w, 3) normalised (x, y, z) → (1, C, d, h, w). Other batch
    sizes, non-CPU tensors and small grids go straight to ``F.grid_sample``.
    """
    n = torch.get_num_threads() if parts is None else int(parts)
    npts = grid[0, ..., 0].numel() if grid.dim() == 5 else 0
    if (
        n <= 1
        or src.dim() != 5
        or grid.dim() != 5
        or src.shape[0] != 1
        or grid.shape[0] != 1
        or src.device.type != "cpu"
        or npts < n * _MIN_POINTS_PER_PART
    ):
        return F.grid_sample(src, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)
    c = src.shape[1]
    out_shape = grid.shape[1:4]
    flat = grid.reshape(npts, 3)
    per = npts // n
    main = per * n
    kw = {"mode": mode, "padding_mode": padding_mode, "align_corners": align_corners}
    # (n, C, per, 1, 1): run b samples points [b * per, (b + 1) * per) of the same (expanded) volume
    body = F.grid_sample(src.expand(n, -1, -1, -1, -1), flat[:main].view(n, per, 1, 1, 3), **kw)
    body = body.view(n, c, per).transpose(0, 1).reshape(c, main)  # a view when C == 1
    if main < npts:
        tail = F.grid_sample(src, flat[main:].view(1, npts - main, 1, 1, 3), **kw).view(c, npts - main)
        body = torch.cat([body, tail], dim=1)
    return body.view(1, c, *out_shape)
