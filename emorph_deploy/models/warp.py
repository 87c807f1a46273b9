"""3D warping by a voxel displacement field (align_corners=True semantics).

``warped(x) = src(x + flow(x))`` where ``flow`` is (B, 3, D, H, W) in voxels and channel k is the displacement
along array axis k (D, H, W). Voxel centres sit at integer indices, so a zero flow is the identity.

Two interchangeable samplers:

* ``"grid_sample"`` — :func:`torch.nn.functional.grid_sample` (ONNX ``GridSample``, opset ≥ 20 for 5D);
* ``"gather"`` — floor the coordinates, gather the 8 corners from the flattened volume with
  :func:`torch.gather` and blend with trilinear weights (nearest: round half-to-even, like ``grid_sample``).
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
    src: torch.Tensor, coords: torch.Tensor, size: tuple[int, int, int], mode: str, padding: str
) -> torch.Tensor:
    b, c = src.shape[0], src.shape[1]
    sd, sh, sw = size  # static source size
    out_shape = coords.shape[2:]
    flat = src.reshape(b, c, sd * sh * sw)  # (B, C, N_src)
    maxes = (sd - 1, sh - 1, sw - 1)
    cz, cy, cx = coords[:, 0], coords[:, 1], coords[:, 2]  # (B, D, H, W) each
    if padding == "border":
        cz = cz.clamp(0.0, float(maxes[0]))
        cy = cy.clamp(0.0, float(maxes[1]))
        cx = cx.clamp(0.0, float(maxes[2]))

    def gather(iz: torch.Tensor, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        # float integer-valued indices (B, D, H, W) → values (B, C, D·H·W) times validity (zeros padding)
        valid = None
        if padding == "zeros":
            valid = (
                (iz >= 0) & (iz <= maxes[0]) & (iy >= 0) & (iy <= maxes[1]) & (ix >= 0) & (ix <= maxes[2])
            ).to(src.dtype)
        iz = iz.clamp(0.0, float(maxes[0]))
        iy = iy.clamp(0.0, float(maxes[1]))
        ix = ix.clamp(0.0, float(maxes[2]))
        lin = ((iz * sh + iy) * sw + ix).to(torch.int64).reshape(b, 1, -1)  # (B, 1, N_out)
        vals = torch.gather(flat, 2, lin.expand(b, c, lin.shape[-1]))  # (B, C, N_out)
        if valid is not None:
            vals = vals * valid.reshape(b, 1, -1)
        return vals

    if mode == "nearest":
        out = gather(torch.round(cz), torch.round(cy), torch.round(cx))
        return out.reshape(b, c, *out_shape)

    z0, y0, x0 = torch.floor(cz), torch.floor(cy), torch.floor(cx)
    wz1, wy1, wx1 = cz - z0, cy - y0, cx - x0  # weights of the upper corners
    wz0, wy0, wx0 = 1.0 - wz1, 1.0 - wy1, 1.0 - wx1
    z1, y1, x1 = z0 + 1.0, y0 + 1.0, x0 + 1.0
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
    coords: torch.Tensor,
    mode: str,
    sampler: str,
    padding: str,
    size: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    if size is None:
        size = tuple(int(s) for s in src.shape[2:])  # type: ignore[assignment]
    if sampler == "gather":
        return _sample_gather(src, coords, size, mode, padding)  # type: ignore[arg-type]
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
    grid = identity_grid(tuple(int(s) for s in flow.shape[2:]), dtype=flow.dtype, device=flow.device)
    return _sample(src, grid.unsqueeze(0) + flow, mode, sampler, padding)


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
        coords = self.grid.to(flow.dtype) + flow  # (B, 3, D, H, W) absolute voxel coordinates
        return _sample(src, coords, self.mode, self.sampler, self.padding, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}, sampler={self.sampler!r}, padding={self.padding!r}"


__all__ = ["MODES", "PADDINGS", "SAMPLERS", "SpatialTransformer", "compose", "identity_grid", "warp"]
