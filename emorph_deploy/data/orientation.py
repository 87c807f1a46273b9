"""Pure affine maths: voxel sizes, RAS reorientation, voxel<->world maps, RAS<->LPS conversion.

NIfTI affines map voxel indices (i, j, k) to RAS+ world millimetres. ITK/ANTs/SimpleITK use LPS+: ``p_lps =
diag(-1, -1, 1) @ p_ras`` (the same flip applies to displacement vectors).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

__all__ = [
    "RAS_TO_LPS",
    "affine_ras_to_lps",
    "axcodes",
    "fov_centre",
    "is_ras_aligned",
    "lps_to_ras_points",
    "ras_to_lps_points",
    "ras_to_lps_vectors",
    "reorient_array_to_ras",
    "reorient_to_ras",
    "voxel_sizes",
    "voxel_to_world",
    "world_to_voxel",
]

#: 4x4 homogeneous RAS<->LPS flip (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing in mm along array axes 0, 1, 2 (column norms of the 3x3 part)."""
    a = np.asarray(affine, dtype=np.float64)
    return np.sqrt((a[:3, :3] ** 2).sum(axis=0))


def axcodes(affine: np.ndarray) -> tuple[str, str, str]:
    """Closest anatomical axis codes, e.g. ``('R', 'A', 'S')``."""
    return tuple(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))  # type: ignore[return-value]


def is_ras_aligned(affine: np.ndarray, atol: float = 1e-6) -> bool:
    """True if the affine's 3x3 part is diagonal with positive entries (array axes = R, A, S)."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    off = lin - np.diag(np.diag(lin))
    return bool(np.all(np.abs(off) <= atol * np.abs(lin).max()) and np.all(np.diag(lin) > 0))


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel coordinates ``(..., 3)`` to world mm ``(..., 3)``."""
    return nib.affines.apply_affine(np.asarray(affine, dtype=np.float64), np.asarray(ijk, dtype=np.float64))


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map world mm ``(..., 3)`` to (continuous) voxel coordinates ``(..., 3)``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return nib.affines.apply_affine(inv, np.asarray(xyz, dtype=np.float64))


def fov_centre(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """World position (mm) of the centre of the field of view: voxel ``(n - 1) / 2`` on each axis."""
    centre = (np.asarray(shape[:3], dtype=np.float64) - 1.0) / 2.0
    return voxel_to_world(affine, centre)


def reorient_array_to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute/flip the first three array axes so they point (closest to) R, A, S; no resampling.

    Returns ``(data, affine)`` such that every voxel keeps its world position. Extra trailing axes (e.g.
    vector components) are carried along untouched.
    """
    affine = np.asarray(affine, dtype=np.float64)
    src = ornt.io_orientation(affine)
    dst = ornt.axcodes2ornt(("R", "A", "S"))
    transform = ornt.ornt_transform(src, dst)
    out = ornt.apply_orientation(np.asarray(data), transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, np.asarray(data).shape[:3])
    return np.ascontiguousarray(out), new_affine


def reorient_to_ras(img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    """RAS-reoriented copy of a nibabel image (array axes permuted/flipped; world positions unchanged)."""
    data, affine = reorient_array_to_ras(np.asanyarray(img.dataobj), img.affine)
    hdr = img.header.copy() if isinstance(img, nib.Nifti1Image) else None
    if hdr is not None:
        hdr.set_sform(affine, code=max(1, int(hdr["sform_code"])))
        hdr.set_qform(affine, code=max(1, int(hdr["qform_code"])))
    return nib.Nifti1Image(data, affine, hdr)  # in-memory affine stays exact (float64)


def affine_ras_to_lps(affine: np.ndarray) -> np.ndarray:
    """Voxel-to-LPS-world matrix from a voxel-to-RAS-world (NIfTI) affine."""
    return RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)


def ras_to_lps_points(points: np.ndarray) -> np.ndarray:
    """Flip x and y of points ``(..., 3)`` (RAS -> LPS; the same function maps LPS -> RAS)."""
    p = np.array(points, dtype=np.float64, copy=True)
    p[..., 0] *= -1.0
    p[..., 1] *= -1.0
    return p


lps_to_ras_points = ras_to_lps_points


def ras_to_lps_vectors(vectors: np.ndarray, axis: int = 0) -> np.ndarray:
    """Flip the x and y components of vectors stored along ``axis`` (e.g. (3, D, H, W) with axis=0)."""
    v = np.array(vectors, copy=True)
    v = np.moveaxis(v, axis, 0)
    if v.shape[0] != 3:
        raise ValueError(f"expected 3 vector components along axis {axis}, got {v.shape[0]}")
    v[0] *= -1
    v[1] *= -1
    return np.moveaxis(v, 0, axis)
