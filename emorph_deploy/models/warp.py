"""3D warping by a voxel displacement field (align_corners=True semantics).

``warped(x) = src(x + flow(x))`` where ``flow`` is (B, 3, D, H, W) in voxels and channel k is the displacement
along array axis k (D, H, W). Voxel centres sit at integer indices, so a zero flow is the identity.

Two interchangeable samplers:

* ``"grid_sample"`` — :func:`torch.nn.functional.grid_sample` (ONNX ``GridSample``, opset ≥ 20 for 5D);
* ``"gather"`` — floor the coordinates, gather the 8 corners from the flattened volume with
  :func:`torch.gather` and blend with trilinear weights (nearest: round half-to-even, like ``grid_sample``,
  applied to the displacement). Indices are integer arithmetic (index ramp + ⌊flow⌋ in int32), so the
  graph samples the right voxels even when a runtime computes its float ops in bf16.
  Exports to plain ONNX ops (Floor, Gather(Elements), Mul, Add) at opset 17 — no GridSample, no ScatterND.

Padding: ``"zeros"`` — out-of-range corners contribute 0 (as ``grid_sample(padding_mode="zeros")``);
``"border"`` — coordinates are clamped to the volume (as ``padding_mode="border"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from emorph_deploy.errors import InputError
from emorph_deploy.models.layers.fastpath import is_tracing, use_parallel_sampler
from emorph_deploy.sampling import grid_sample_3d

MODES = ("bilinear", "nearest")
SAMPLERS = ("grid_sample", "gather")
PADDINGS = ("zeros", "border")
#: How the gather sampler forms its indices, recorded in export manifests (``gather_indices``): "int32" =
#: index ramp + ⌊flow⌋ in integers, exact under a bf16 runtime. Exports without it (before this) formed them
#: from float coordinates, which a bf16 runtime breaks inside a network that warps (``warps_inside``).
GATHER_INDICES = "int32"


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise InputError(f"warp {what} must be one of {choices}; got {value!r}")


def identity_grid(
    size: tuple[int, int, int], dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Voxel index grid (3, D, H, W): channel k holds the index along array axis k."""
    target = torch.get_default_device() if device is None else torch.device(device)
    # channel-k ramps (3, s_k) built on the CPU, then broadcast-added on the target device (may be "meta")
    grid = None
    for k, s in enumerate(size):
        cpu = torch.device("cpu")
        ramp_k = torch.arange(s, dtype=dtype, device=cpu)
        rows = [ramp_k if j == k else torch.zeros(s, dtype=dtype, device=cpu) for j in range(3)]
        ramp = torch.stack(rows)  # (3, s)
        shape = [3, 1, 1, 1]
        shape[1 + k] = s
        ramp = ramp.view(shape).to(target)
        grid = ramp if grid is None else grid + ramp
    assert grid is not None
    return grid.contiguous()  # (3, D, H, W)


def _sample_grid_sample(
    src: torch.Tensor, coords: torch.Tensor, size: tuple[int, int, int], mode: str, padding: str
) -> torch.Tensor:
    # coords (B, 3, D, H, W) in voxel indices of src → normalised [-1, 1] (align_corners=True), xyz = W, H, D
    sz, sy, sx = (2.0 / max(s - 1, 1) for s in size)
    grid = torch.stack(
        [coords[:, 2] * sx - 1.0, coords[:, 1] * sy - 1.0, coords[:, 0] * sz - 1.0], dim=-1
    )  # (B, D, H, W, 3) as (x=W, y=H, z=D)
    if use_parallel_sampler(src):  # eager CPU: torch's 3D kernel is single-threaded at batch 1
        return grid_sample_3d(src, grid, mode=mode, padding_mode=padding, align_corners=True)
    return F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=True)


def _sample_gather(
    src: torch.Tensor, flow: torch.Tensor, size: tuple[int, int, int], mode: str, padding: str
) -> torch.Tensor:
    # Index arithmetic in integers: output voxel i samples src at i + flow(i); the integer part
    # i + floor(flow) is formed in int32 from a constant index ramp and only the fractional part
    # flow − floor(flow) (the trilinear weights) stays floating point. A reduced-precision runtime
    # (OpenVINO bf16 computes the graph's elementwise ops in bf16, 8 mantissa bits) then keeps exact
    # indices and weights to the precision of the displacement itself; absolute coordinates (~100)
    # or flattened indices (~10^6) in bf16 would sample the wrong voxels.
    b, c = src.shape[0], src.shape[1]
    sd, sh, sw = size  # static source size
    out_shape = tuple(int(s) for s in flow.shape[2:])
    flat = src.reshape(b, c, sd * sh * sw)  # (B, C, N_src)
    maxes = (sd - 1, sh - 1, sw - 1)
    ramps = [
        torch.arange(n, dtype=torch.int32, device=flow.device).view([n if k == a else 1 for k in range(3)])
        for a, n in enumerate(out_shape)
    ]  # (D, 1, 1), (1, H, 1), (1, 1, W): output voxel indices

    def split(axis: int, rounding: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # (B, D, H, W) int32 index along ``axis`` and the float weight of the upper corner (None: nearest)
        f = flow[:, axis]
        whole = torch.round(f) if rounding else torch.floor(f)
        idx = ramps[axis] + whole.to(torch.int32)
        frac = None if rounding else f - whole
        if padding == "border":  # the coordinate clamped to [0, max]: a corner index, weight 0
            lo, hi = idx < 0, idx >= maxes[axis]
            idx = torch.clamp(idx, 0, maxes[axis])
            if frac is not None:
                frac = torch.where(lo | hi, torch.zeros_like(frac), frac)
        return idx, frac

    def gather(iz: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        # int32 indices (B, D, H, W) → values (B, C, D·H·W) times validity (zeros padding)
        valid = None
        if padding == "zeros":
            valid = (
                (iz >= 0) & (iz <= maxes[0]) & (iy >= 0) & (iy <= maxes[1]) & (ix >= 0) & (ix <= maxes[2])
            ).to(src.dtype)
        iz = torch.clamp(iz, 0, maxes[0])
        iy = torch.clamp(iy, 0, maxes[1])
        ix = torch.clamp(ix, 0, maxes[2])
        lin = ((iz * sh + iy) * sw + ix).to(torch.int64).reshape(b, 1, -1)  # (B, 1, N_out)
        vals = torch.gather(flat, 2, lin.expand(b, c, lin.shape[-1]))  # (B, C, N_out)
        if valid is not None:
            vals = vals * valid.reshape(b, 1, -1)
        return vals

    if mode == "nearest":
        out = gather(*(split(a, True)[0] for a in range(3)))
        return out.reshape(b, c, *out_shape)

    (z0, wz1), (y0, wy1), (x0, wx1) = (split(a, False) for a in range(3))
    assert wz1 is not None and wy1 is not None and wx1 is not None
    wz0, wy0, wx0 = 1.0 - wz1, 1.0 - wy1, 1.0 - wx1
    z1, y1, x1 = z0 + 1, y0 + 1, x0 + 1
    out = None
    for iz, wz in ((z0, wz0), (z1, wz1)):
        for iy, wy in ((y0, wy0), (y1, wy1)):
            for ix, wx in ((x0, wx0), (x1, wx1)):
                w = (wz * wy * wx).reshape(b, 1, -1)  # (B, 1, N_out)
                term = gather(iz, iy, ix) * w
                out = term if out is None else out + term
    assert out is not None
    return out.reshape(b, c, *out_shape)


def _sample(
    src: torch.Tensor,
    flow: torch.Tensor,
    identity: torch.Tensor | None,
    mode: str,
    sampler: str,
    padding: str,
    size: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``src`` sampled at ``identity + flow`` (voxel coordinates; ``identity`` (1, 3, D, H, W) is the index
    grid of ``flow``'s spatial shape, None = built here when needed: the gather sampler uses its own
    integer ramps)."""
    if size is None:
        size = tuple(int(s) for s in src.shape[2:])  # type: ignore[assignment]
    if sampler == "gather":
        return _sample_gather(src, flow, size, mode, padding)  # type: ignore[arg-type]
    if identity is None:
        identity = identity_grid(tuple(int(s) for s in flow.shape[2:]), dtype=flow.dtype, device=flow.device)
    coords = identity.to(flow.dtype) + flow  # (B, 3, D, H, W) absolute voxel coordinates
    return _sample_grid_sample(src, coords, size, mode, padding)  # type: ignore[arg-type]


def _check_shapes(src: torch.Tensor, flow: torch.Tensor) -> None:
    if src.dim() != 5 or flow.dim() != 5 or flow.shape[1] != 3:
        raise InputError(
            f"warp expects src (B, C, D, H, W) and flow (B, 3, D, H, W); got {tuple(src.shape)} and "
            f"{tuple(flow.shape)}"
        )
    if src.shape[0] != flow.shape[0]:
        raise InputError(f"warp: batch sizes differ: src {src.shape[0]}, flow {flow.shape[0]}")


def warp(
    src: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "bilinear",
    sampler: str = "grid_sample",
    padding: str = "zeros",
) -> torch.Tensor:
    """Warp ``src`` (B, C, D, H, W) by ``flow`` (B, 3, D', H', W') in voxels → (B, C, D', H', W').

    Functional form of :class:`SpatialTransformer` (builds the identity grid on each call).
    """
    _check_choice(mode, MODES, "mode")
    _check_choice(sampler, SAMPLERS, "sampler")
    _check_choice(padding, PADDINGS, "padding")
    _check_shapes(src, flow)
    return _sample(src, flow, None, mode, sampler, padding)


def compose(first: torch.Tensor, second: torch.Tensor, sampler: str = "grid_sample") -> torch.Tensor:
    """The flow of warping by ``first`` and then by ``second`` (both (B, 3, D, H, W) voxels), (B, 3, D, H,
    W): ``second(x) + first(x + second(x))``, so ``warp(src, compose(first, second)) ≈ warp(warp(src, first),
    second)`` with one interpolation of ``src``. ``first`` is sampled with border padding (its edge
    displacement continues outside the grid)."""
    return second + warp(first, second, sampler=sampler, padding="border")


class SpatialTransformer(nn.Module):
    """Warp by a voxel displacement field on a fixed grid ``size`` = (D, H, W).

    The identity grid is a non-persistent buffer (not in the state dict; exported as a constant).
    ``forward(src (B, C, D, H, W), flow (B, 3, D, H, W)) -> (B, C, D, H, W)``.
    """

    def __init__(
        self,
        size: tuple[int, int, int] | list[int],
        mode: str = "bilinear",
        sampler: str = "grid_sample",
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        _check_choice(mode, MODES, "mode")
        _check_choice(sampler, SAMPLERS, "sampler")
        _check_choice(padding, PADDINGS, "padding")
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 3:
            raise InputError(f"SpatialTransformer size must be (D, H, W); got {size!r}")
        self.mode = mode
        self.sampler = sampler
        self.padding = padding
        self.register_buffer("grid", identity_grid(self.size).unsqueeze(0), persistent=False)  # (1,3,D,H,W)

    def forward(self, src: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        if not is_tracing():
            _check_shapes(src, flow)
            if tuple(flow.shape[2:]) != self.size or tuple(src.shape[2:]) != self.size:
                raise InputError(
                    f"SpatialTransformer built for size {self.size}; got src {tuple(src.shape[2:])} and flow "
                    f"{tuple(flow.shape[2:])}; fix: build it with the size of the volumes"
                )
        return _sample(src, flow, self.grid, self.mode, self.sampler, self.padding, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}, sampler={self.sampler!r}, padding={self.padding!r}"


__all__ = [
    "GATHER_INDICES",
    "MODES",
    "PADDINGS",
    "SAMPLERS",
    "SpatialTransformer",
    "compose",
    "identity_grid",
    "warp",
]
