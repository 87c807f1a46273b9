"""Registration metrics (numpy in, Python floats out; torch only for :func:`ncc_global_float32`).

Conventions: arrays are indexed (D, H, W); label maps are integer-valued (float arrays holding integers, as
nibabel returns them, are accepted); displacement fields are (3, D, H, W) in **voxels**, channel k along array
axis k; ``spacing`` is the voxel size in mm per array axis.

Evaluation protocol (reference): Dice over labels present in both volumes, background 0 excluded;
fraction of voxels with Jacobian determinant ≤ 0; true std of log J; the Learn2Reg std of log(J + 3)
(clipped), labelled as such; HD95 in mm (Learn2Reg reports it with unit spacing, i.e. in voxels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from emorph_deploy.errors import InputError

__all__ = [
    "dice_per_label",
    "fraction_nonpositive_jacobian",
    "hd95",
    "jacobian_determinant",
    "mean_dice",
    "ncc_global",
    "ncc_global_float32",
    "psnr",
    "registration_metrics",
    "sd_log_jacobian",
    "sd_log_jacobian_l2r",
]

# Label values up to this bound use O(N) bincount paths; larger or negative labels fall back to np.unique.
_BINCOUNT_MAX_LABEL = 1 << 20


# ----------------------------------------------------------------------------------------------- helpers
def _as_labels(x: np.ndarray, name: str) -> np.ndarray:
    """Integer label array (int64); float arrays must hold integral values."""
    x = np.asarray(x)
    if x.dtype == bool:
        return x.astype(np.int64)
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.int64, copy=False)
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise InputError(f"{name}: expected a label map, got NaN/inf values; fix: pass integer labels")
        r = np.rint(x)
        if not np.array_equal(r, x):
            raise InputError(
                f"{name}: expected integer label values, got fractional values; fix: load labels with "
                "nearest-neighbour resampling"
            )
        return r.astype(np.int64)
    raise InputError(f"{name}: expected a numeric label array, got dtype {x.dtype}; fix: pass integer labels")


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(
            f"{what}: expected arrays of equal shape, got {a.shape} and {b.shape}; fix: compare volumes on "
            "the same grid"
        )


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except TypeError as exc:
        raise InputError(
            f"spacing: expected {ndim} numbers, got {spacing!r}; fix: pass e.g. (1, 1, 1)"
        ) from exc
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise InputError(
            f"spacing: expected {ndim} positive voxel sizes in mm, got {spacing!r}; fix: pass e.g. (1, 1, 1)"
        )
    return sp


def _common_labels(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None) -> np.ndarray:
    """Sorted labels (≠ 0) present in both ``a`` and ``b`` (and in ``labels`` if given)."""
    if a.size and min(a.min(), b.min()) >= 0 and max(a.max(), b.max()) < _BINCOUNT_MAX_LABEL:
        n = int(max(a.max(), b.max())) + 1
        in_a = np.bincount(a.ravel(), minlength=n) > 0
        in_b = np.bincount(b.ravel(), minlength=n) > 0
        common = np.flatnonzero(in_a & in_b)
    else:
        common = np.intersect1d(np.unique(a), np.unique(b))
    common = common[common != 0]
    if labels is not None:
        wanted = np.asarray(list(labels), dtype=np.int64)
        common = np.intersect1d(common, wanted)
    return common.astype(np.int64)


# ----------------------------------------------------------------------------------------------- Dice
def dice_per_label(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice ``2|A∩B| / (|A| + |B|)`` per label, for labels present in both maps (background 0 excluded).

    ``labels`` restricts the evaluation to those values (e.g. ``range(1, 36)`` for OASIS); labels missing from
    either map are skipped, not scored 0 (the protocol's "mean over labels present in both").
    Returns ``{label: dice}`` sorted by label (empty if no label is common).
    """
    a = _as_labels(a, "dice a")
    b = _as_labels(b, "dice b")
    _check_same_shape(a, b, "dice")
    common = _common_labels(a, b, labels)
    if common.size == 0:
        return {}
    if a.min() >= 0 and b.min() >= 0 and int(common.max()) < _BINCOUNT_MAX_LABEL:
        n = int(max(a.max(), b.max())) + 1
        size_a = np.bincount(a.ravel(), minlength=n)
        size_b = np.bincount(b.ravel(), minlength=n)
        inter = np.bincount(a[a == b], minlength=n)
        return {int(k): float(2.0 * inter[k] / (size_a[k] + size_b[k])) for k in common}
    out: dict[int, float] = {}
    for k in common:
        ma, mb = a == k, b == k
        out[int(k)] = float(2.0 * np.count_nonzero(ma & mb) / (np.count_nonzero(ma) + np.count_nonzero(mb)))
    return out


def mean_dice(a: np.ndarray, b: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` over labels present in both; ``nan`` if there is no common label."""
    d = dice_per_label(a, b, labels)
    return float(np.mean(list(d.values()))) if d else float("nan")


# ----------------------------------------------------------------------------------------------- Jacobian
def jacobian_determinant(flow: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Jacobian determinant of the map ``x → x + u(x)`` for a displacement ``u`` (3, D, H, W) in voxels.

    ``J = det(I + ∇u)`` with ``∇u[i, j] = ∂u_i/∂x_j`` from central differences (``np.gradient``; one-sided
    at the volume faces), per voxel. Returns a float64 (D, H, W) array; a zero flow gives exactly 1.

    ``spacing`` (mm per array axis) is validated but does not change the result: J is dimensionless and
    spacing-invariant — with ``S = diag(spacing)`` the same map in mm has ``∇u_mm = S ∇u_vox S⁻¹`` and
    ``det(I + S G S⁻¹) = det(I + G)``. It is accepted so callers can pass their grid spacing uniformly.
    A (1, 3, D, H, W) flow (batch of one) is accepted too.
    """
    u = np.asarray(flow)
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 4 or u.shape[0] != 3:
        raise InputError(
            f"jacobian_determinant: expected a (3, D, H, W) displacement in voxels, got shape {u.shape}; "
            "fix: pass flow[0] of a (B, 3, D, H, W) model output"
        )
    if min(u.shape[1:]) < 2:
        raise InputError(
            f"jacobian_determinant: expected ≥ 2 voxels per axis, got {u.shape[1:]}; fix: pass a 3D field"
        )
    _check_spacing(spacing, 3)
    u = u.astype(np.float64, copy=False)
    # g[i][j] = ∂u_i/∂x_j (per voxel); add the identity on the diagonal.
    g = [np.gradient(u[i], axis=(0, 1, 2)) for i in range(3)]
    a11, a12, a13 = g[0][0] + 1.0, g[0][1], g[0][2]
    a21, a22, a23 = g[1][0], g[1][1] + 1.0, g[1][2]
    a31, a32, a33 = g[2][0], g[2][1], g[2][2] + 1.0
    return a11 * (a22 * a33 - a23 * a32) - a12 * (a21 * a33 - a23 * a31) + a13 * (a21 * a32 - a22 * a31)


def fraction_nonpositive_jacobian(jac: np.ndarray) -> float:
    """Fraction of voxels with ``J ≤ 0`` (folding), in [0, 1]."""
    jac = np.asarray(jac)
    if jac.size == 0:
        return float("nan")
    return float(np.count_nonzero(jac <= 0) / jac.size)


def sd_log_jacobian(jac: np.ndarray) -> float:
    """True standard deviation (ddof 0) of ``log J`` over voxels with ``J > 0``; ``nan`` if there are none."""
    jac = np.asarray(jac, dtype=np.float64)
    pos = jac[jac > 0]
    if pos.size == 0:
        return float("nan")
    return float(np.std(np.log(pos)))


def sd_log_jacobian_l2r(jac: np.ndarray) -> float:
    """Learn2Reg variant of SDlogJ: ``std(log(clip(J + 3, 1e-9, 1e9)))`` over all voxels.

    This is what the official Learn2Reg evaluation reports as "SDlogJ" (it shifts J by +3, so it is *not*
    the std of log J — compare values only with other L2R-variant numbers). The official script also crops
    2 voxels from each face before this; crop ``jac`` yourself to match that exactly.
    """
    jac = np.asarray(jac, dtype=np.float64)
    if jac.size == 0:
        return float("nan")
    return float(np.std(np.log(np.clip(jac + 3.0, 1e-9, 1e9))))


# ----------------------------------------------------------------------------------------------- HD95
def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its 6-connected erosion (mask voxels on the array border count)."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def _hd95_masks(ma: np.ndarray, mb: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Symmetric 95th-percentile surface distance between two non-empty boolean masks, in mm."""
    from scipy import ndimage

    sa, sb = _surface(ma), _surface(mb)
    # distance (mm) from every voxel to the nearest surface voxel of the other mask
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    d_ab = dist_to_b[sa]
    d_ba = dist_to_a[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def _bbox(mask_union: np.ndarray, shape: tuple[int, ...], margin: int = 1) -> tuple[slice, ...]:
    idx = []
    for ax in range(mask_union.ndim):
        other = tuple(i for i in range(mask_union.ndim) if i != ax)
        nz = np.flatnonzero(mask_union.any(axis=other))
        idx.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, shape[ax])))
    return tuple(idx)


def hd95(
    a: np.ndarray,
    b: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    labels: Iterable[int] | None = None,
) -> float:
    """95th-percentile symmetric surface Hausdorff distance in mm, averaged over labels present in both maps.

    Per label: surfaces ``S_A``, ``S_B`` = mask minus its 6-connected erosion; directed distances from each
    surface voxel of one mask to the nearest surface voxel of the other (Euclidean, in mm via
    ``distance_transform_edt(sampling=spacing)``); HD95 = ``max(P95(d(S_A→S_B)), P95(d(S_B→S_A)))`` (numpy's
    linear-interpolated percentile; the MedPy/MONAI convention). Background 0 is excluded; ``labels``
    restricts the labels as in :func:`dice_per_label`. Returns ``nan`` if no label is common. Unit spacing
    gives the value in voxels (the Learn2Reg convention). A 2D or 3D map is accepted; ``spacing`` needs one
    entry per axis.
    """
    a = _as_labels(a, "hd95 a")
    b = _as_labels(b, "hd95 b")
    _check_same_shape(a, b, "hd95")
    sp = _check_spacing(spacing, a.ndim)
    common = _common_labels(a, b, labels)
    if common.size == 0:
        return float("nan")
    values = []
    for k in common:
        ma, mb = a == k, b == k
        box = _bbox(ma | mb, a.shape)  # all surface voxels of both masks lie inside; crop for speed
        values.append(_hd95_masks(ma[box], mb[box], sp))
    return float(np.mean(values))


# ----------------------------------------------------------------------------------------------- intensity
def ncc_global(a: np.ndarray, b: np.ndarray) -> float:
    """Global normalised cross-correlation (Pearson correlation) of two images; ``nan`` if either is flat."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, "ncc_global")
    da = a - a.mean()
    db = b - b.mean()
    denom = math.sqrt(float(np.sum(da * da)) * float(np.sum(db * db)))
    if denom == 0.0:
        return float("nan")
    return float(np.sum(da * db) / denom)


def ncc_global_float32(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`ncc_global` in float32 with torch (all threads; the three sums are taken to float64 at the
    end): what registration QC reports for volumes (D, H, W) on the model grid. Agrees with the float64
    :func:`ncc_global` to ~1e-6, not bit for bit; ``nan`` if either image is flat."""
    import torch

    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(-1)
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).reshape(-1)
    ta = ta - ta.mean()
    tb = tb - tb.mean()
    den = float(torch.sqrt((ta * ta).sum().double() * (tb * tb).sum().double()))
    return float((ta * tb).sum().double() / den) if den > 0 else float("nan")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10·log10(data_range² / MSE)`` in dB; ``inf`` for identical images."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _check_same_shape(a, b, "psnr")
    if not data_range > 0:
        raise InputError(f"psnr: expected data_range > 0, got {data_range!r}; fix: pass e.g. 1.0")
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * math.log10(data_range * data_range / mse))


# ----------------------------------------------------------------------------------------------- summary
def registration_metrics(
    flow: np.ndarray,
    fixed_labels: np.ndarray | None = None,
    warped_labels: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    labels: Iterable[int] | None = None,
) -> dict[str, float]:
    """Flat dict of the standard registration metrics for one pair.

    Keys (always all present): ``dice`` (mean Dice over common labels), ``hd95_mm`` (mean HD95 in mm with
    ``spacing``), ``frac_jac_nonpos`` (fraction of voxels with J ≤ 0), ``sdlogj`` (true std of log J over
    J > 0), ``sdlogj_l2r`` (Learn2Reg std of log(J + 3), clipped). ``dice`` and ``hd95_mm`` are ``nan`` when
    the label maps are not given (or share no label). ``flow`` is (3, D, H, W) in voxels; the label maps are
    (D, H, W) on the same grid (the warped moving labels and the fixed labels).
    """
    jac = jacobian_determinant(flow, spacing)
    out = {"dice": float("nan"), "hd95_mm": float("nan")}
    if (fixed_labels is None) != (warped_labels is None):
        raise InputError(
            "registration_metrics: expected both fixed_labels and warped_labels or neither, got only one; "
            "fix: pass both label maps"
        )
    if fixed_labels is not None and warped_labels is not None:
        lab = None if labels is None else list(labels)
        if np.shape(fixed_labels) != jac.shape:
            raise InputError(
                f"registration_metrics: expected label maps of the flow's grid {jac.shape}, got "
                f"{np.shape(fixed_labels)}; fix: resample labels to the model grid"
            )
        out["dice"] = mean_dice(warped_labels, fixed_labels, lab)
        out["hd95_mm"] = hd95(warped_labels, fixed_labels, spacing, lab)
    out["frac_jac_nonpos"] = fraction_nonpositive_jacobian(jac)
    out["sdlogj"] = sd_log_jacobian(jac)
    out["sdlogj_l2r"] = sd_log_jacobian_l2r(jac)
    return out
