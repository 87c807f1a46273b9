"""Pure affine maths, the one home of the index <-> world <-> grid maps: voxel sizes, RAS reorientation,
voxel <-> world points, index maps between two grids, model grids, voxel <-> world displacements, RAS <-> LPS.

NIfTI affines map voxel indices (i, j, k) to RAS+ world millimetres (4x4, float64). An *index map* between
two grids is ``inv(A_src) @ A_dst``: destination voxel index -> (continuous) source voxel index. ITK/ANTs/
SimpleITK use LPS+: ``p_lps = diag(-1, -1, 1) @ p_ras`` (the same flip applies to displacement vectors).
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

__all__ = [
    "RAS_TO_LPS",
    "affine_ras_to_lps",
    "axcodes",
    "axis_map",
    "fov_centre",
    "grid_coordinates",
    "index_map",
    "is_ras_aligned",
    "itk_geometry_to_ras",
    "itk_params_to_ras",
    "lps_to_ras_points",
    "model_grid_affine",
    "ras_to_itk_params",
    "ras_to_lps_points",
    "ras_to_lps_vectors",
    "reorient_array_to_ras",
    "reorient_to_ras",
    "voxel_flow_to_world",
    "voxel_sizes",
    "voxel_to_world",
    "world_flow_to_voxel",
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


def itk_geometry_to_ras(direction: Any, spacing: Any, origin: Any) -> np.ndarray:
    """The voxel-to-RAS affine (4x4 float64) of an ITK/SimpleITK image given its LPS geometry: ``direction``
    (3x3, columns = array axes x, y, z, or its 9 values row by row), ``spacing`` (3,) mm and ``origin`` (3,)
    LPS mm. ITK index (x, y, z) is NIfTI voxel (i, j, k); ``GetArrayFromImage`` gives (z, y, x), so its
    transpose is indexed by this affine."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) * np.asarray(
        spacing, dtype=np.float64
    )
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return RAS_TO_LPS @ lps


def ras_to_lps_vectors(vectors: np.ndarray, axis: int = 0) -> np.ndarray:
    """Flip the x and y components of vectors stored along ``axis`` (e.g. (3, D, H, W) with axis=0)."""
    v = np.array(vectors, copy=True)
    v = np.moveaxis(v, axis, 0)
    if v.shape[0] != 3:
        raise ValueError(f"expected 3 vector components along axis {axis}, got {v.shape[0]}")
    v[0] *= -1
    v[1] *= -1
    return np.moveaxis(v, 0, axis)


# ------------------------------------------------------------------------------------------------------------
# index maps between grids
# ------------------------------------------------------------------------------------------------------------
def index_map(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """4x4 float64 map from destination voxel indices to continuous source voxel indices:
    ``inv(src_affine) @ dst_affine`` (both voxel -> world RAS mm)."""
    return np.linalg.inv(np.asarray(src_affine, dtype=np.float64)) @ np.asarray(dst_affine, dtype=np.float64)


def grid_coordinates(
    src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray, d_slice: slice | None = None
) -> np.ndarray:
    """Continuous source voxel coordinates (3, d, H, W) float64 of the destination grid's voxels
    (``dst_shape`` (D, H, W); ``d_slice`` selects rows ``d`` of axis 0, default all)."""
    m = index_map(src_affine, dst_affine)
    d_slice = d_slice or slice(0, dst_shape[0])
    i = np.arange(d_slice.start, d_slice.stop, dtype=np.float64)
    j = np.arange(dst_shape[1], dtype=np.float64)
    k = np.arange(dst_shape[2], dtype=np.float64)
    ii, jj, kk = np.meshgrid(i, j, k, indexing="ij")
    coords = np.einsum("ab,b...->a...", m[:3, :3], np.stack([ii, jj, kk]))
    coords += m[:3, 3].reshape(3, 1, 1, 1)
    return coords


def axis_map(m: np.ndarray, tol: float = 1e-7) -> list[tuple[int, float, float]] | None:
    """For a 4x4 index map ``m`` (output index → source index) that takes each source axis from exactly one
    output axis (axis-aligned: scaling, flips, translation, axis permutation), return per source axis
    ``(output axis, scale, offset)``; None when oblique (a source axis mixes output axes)."""
    out = []
    lin = np.asarray(m, dtype=np.float64)[:3, :3]
    scale = np.abs(lin).max()
    used = set()
    for a in range(3):
        nz = [b for b in range(3) if abs(lin[a, b]) > tol * scale]
        if len(nz) != 1 or nz[0] in used:
            return None
        used.add(nz[0])
        out.append((nz[0], float(lin[a, nz[0]]), float(m[a, 3])))
    return out


def _reference_shape_affine(reference: Any) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a nibabel image, a PreparedVolume or an (array-or-shape, affine) pair."""
    if hasattr(reference, "affine") and hasattr(reference, "shape"):
        return tuple(int(s) for s in reference.shape[:3]), np.asarray(reference.affine, dtype=np.float64)
    if isinstance(reference, tuple | list) and len(reference) == 2:
        first, affine = reference
        shape = np.shape(first) if hasattr(first, "shape") or np.ndim(first) > 1 else tuple(first)
        return tuple(int(s) for s in shape[:3]), np.asarray(affine, dtype=np.float64)
    raise TypeError(
        f"expected a nibabel image or a (shape-or-array, affine) pair, got {type(reference).__name__}"
    )


def model_grid_affine(
    reference: Any, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> np.ndarray:
    """RAS-aligned grid affine of ``shape`` voxels at ``spacing`` mm, centred on the reference's FOV centre.

    ``reference`` is the image whose field of view defines the grid (the fixed image): a nibabel image or a
    ``(array-or-shape, affine)`` pair. The grid centre (voxel ``(n - 1) / 2``) lands exactly on the world
    position of the reference's centre voxel ``(m - 1) / 2``.
    """
    ref_shape, ref_affine = _reference_shape_affine(reference)
    centre_world = (
        ref_affine[:3, :3] @ ((np.asarray(ref_shape, dtype=np.float64) - 1) / 2) + ref_affine[:3, 3]
    )
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = np.diag(spacing_arr)
    out[:3, 3] = centre_world - spacing_arr * (np.asarray(shape, dtype=np.float64) - 1) / 2
    return out


# ------------------------------------------------------------------------------------------------------------
# displacements
# ------------------------------------------------------------------------------------------------------------
def voxel_flow_to_world(flow: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement (3, ...) of the grid with ``affine`` -> world displacement (3, ...) in RAS mm."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    return np.einsum("ab,b...->a...", lin, np.asarray(flow, dtype=np.float64))


def world_flow_to_voxel(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World displacement (3, ...) in RAS mm -> voxel displacement (3, ...) of the grid with ``affine``."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.einsum("ab,b...->a...", inv, np.asarray(disp, dtype=np.float64))


# ------------------------------------------------------------------------------------------------------------
# ITK/ANTs affine transforms
# ------------------------------------------------------------------------------------------------------------
def ras_to_itk_params(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 point map in RAS mm (e.g. fixed world -> moving world) as ITK ``AffineTransform`` parameters:
    ``(parameters (12,), fixed parameters (3,))`` in LPS mm — the 3x3 matrix row by row, then the
    translation; the centre (fixed parameters) is the origin, so the translation is the offset.

    ITK/ANTs transforms map points of the output (fixed) space to the input (moving) space, which is the
    direction of a pull-back registration map; the same matrix therefore serves both."""
    lps = RAS_TO_LPS @ np.asarray(matrix, dtype=np.float64) @ RAS_TO_LPS
    return np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]), np.zeros(3)


def itk_params_to_ras(params: np.ndarray, fixed: np.ndarray | None = None) -> np.ndarray:
    """ITK ``AffineTransform`` parameters (12,) and centre (3,) in LPS mm -> 4x4 RAS point map (float64).

    ITK: ``T(x) = A (x - c) + c + t``, so the offset is ``t + c - A c``."""
    p = np.asarray(params, dtype=np.float64).ravel()
    if p.size != 12:
        raise ValueError(f"expected 12 affine parameters (3x3 matrix + translation), got {p.size}")
    c = np.zeros(3) if fixed is None else np.asarray(fixed, dtype=np.float64).ravel()[:3]
    a = p[:9].reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = a
    lps[:3, 3] = p[9:] + c - a @ c
    return RAS_TO_LPS @ lps @ RAS_TO_LPS
