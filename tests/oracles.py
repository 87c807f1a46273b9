"""Reference implementations that only tests use: plain, float64 where it matters, no fused fast paths.

Imported as ``import oracles`` (the tests folder is on ``sys.path`` through its ``conftest.py``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from emorph_deploy.data.orientation import grid_coordinates, voxel_flow_to_world
from emorph_deploy.data.resample import (
    Padding,
    resample_displacement,
    resample_to_grid,
    sample_at_voxel_coords,
)


def model_flow_to_native(
    flow: np.ndarray,
    model_affine: np.ndarray,
    native_shape: tuple[int, int, int],
    native_affine: np.ndarray,
    padding: Padding = "border",
    method: Literal["torch", "scipy"] = "torch",
) -> np.ndarray:
    """Model-grid voxel flow (3, d, h, w) -> world displacement (3, *native_shape) in RAS mm on the native
    grid: with ``disp`` the result, the registered moving image on the native (fixed) grid is
    ``moving_world(p + disp(p))`` for each native voxel centre p (see :func:`warp_world`). The reference of
    :func:`emorph_deploy.registration.native.warp_to_native`'s displacement."""
    disp_model = voxel_flow_to_world(flow, model_affine).astype(np.float32)
    return resample_displacement(
        disp_model, model_affine, native_shape, native_affine, padding=padding, method=method
    )


def warp_world(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    disp: np.ndarray | None = None,
    order: int = 1,
    cval: float = 0.0,
    padding: Padding = "zeros",
    method: Literal["torch", "scipy"] = "torch",
) -> np.ndarray:
    """Sample ``moving`` (D, H, W) or (C, D, H, W) at ``p + disp(p)`` for each destination voxel centre p
    (world RAS mm); ``disp`` (3, *dst_shape) is a world displacement on the destination grid, ``None`` plain
    resampling. ``order=0`` keeps label values and dtype. The reference of
    :func:`emorph_deploy.registration.native.warp_to_native`'s warp."""
    dst_shape = tuple(int(s) for s in dst_shape[:3])
    if disp is None:
        return resample_to_grid(moving, moving_affine, dst_shape, dst_affine, order, cval, padding, method)
    disp = np.asarray(disp)
    if disp.shape != (3, *dst_shape):
        raise ValueError(f"expected disp (3, {dst_shape}), got {disp.shape}")
    # voxel coords in the moving grid: inv(A_mov) @ (A_dst j + d) = grid_coordinates + inv(A_mov)[:3, :3] @ d
    inv_mov = np.linalg.inv(np.asarray(moving_affine, dtype=np.float64))
    coords = grid_coordinates(moving_affine, dst_shape, dst_affine)
    coords += np.einsum("ab,b...->a...", inv_mov[:3, :3], disp.astype(np.float64))
    return sample_at_voxel_coords(moving, coords, order=order, cval=cval, padding=padding, method=method)
