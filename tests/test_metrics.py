"""Tests for emorph_deploy.metrics (small volumes, explicit tolerances)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from emorph_deploy.errors import InputError
from emorph_deploy.metrics import (
    dice_per_label,
    fraction_nonpositive_jacobian,
    hd95,
    jacobian_determinant,
    mean_dice,
    ncc_global,
    ncc_global_float32,
    psnr,
    registration_metrics,
    sd_log_jacobian,
    sd_log_jacobian_l2r,
)


def cube(shape, lo, size, label=1) -> np.ndarray:
    out = np.zeros(shape, dtype=np.int64)
    out[tuple(slice(o, o + size) for o in lo)] = label
    return out


def random_labels(shape=(16, 16, 16), n=5, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=shape)


def grid(shape) -> np.ndarray:
    """Voxel coordinates (3, D, H, W) as float64."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))


# ----------------------------------------------------------------------------------------------- Dice
def test_dice_identical_is_one():
    lab = random_labels()
    d = dice_per_label(lab, lab)
    assert sorted(d) == [1, 2, 3, 4]  # background 0 excluded
    assert all(abs(v - 1.0) <= 1e-12 for v in d.values())
    assert abs(mean_dice(lab, lab) - 1.0) <= 1e-12


def test_dice_disjoint_is_zero():
    a = cube((16, 16, 16), (0, 0, 0), 4)
    b = cube((16, 16, 16), (8, 8, 8), 4)
    assert dice_per_label(a, b) == {1: 0.0}
    assert mean_dice(a, b) == 0.0


def test_dice_known_partial_overlap():
    a = cube((16, 16, 16), (2, 2, 2), 4)  # 64 voxels
    b = cube((16, 16, 16), (3, 2, 2), 4)  # shifted by 1: overlap 3·4·4 = 48
    assert abs(dice_per_label(a, b)[1] - 2 * 48 / 128) <= 1e-12
    # a second label only in a: not scored (labels present in both)
    a2 = a + cube((16, 16, 16), (10, 10, 10), 3, label=7)
    assert dice_per_label(a2, b) == dice_per_label(a, b)


def test_dice_matches_slow_reference_and_label_filter():
    a, b = random_labels(seed=1, n=6), random_labels(seed=2, n=6)
    fast = dice_per_label(a, b)
    for k in range(1, 6):
        ma, mb = a == k, b == k
        ref = 2 * np.sum(ma & mb) / (np.sum(ma) + np.sum(mb))
        assert abs(fast[k] - ref) <= 1e-12
    sub = dice_per_label(a, b, labels=[2, 4, 99])
    assert sorted(sub) == [2, 4]
    assert abs(mean_dice(a, b, labels=[2, 4]) - (fast[2] + fast[4]) / 2) <= 1e-12
    # negative / float labels take the generic path and agree
    assert dice_per_label(a - 3, b - 3, labels=[-2, -1, 1, 2]) == {
        k - 3: v for k, v in fast.items() if k - 3 in (-2, -1, 1, 2)
    }
    assert dice_per_label(a.astype(np.float32), b.astype(np.float64)) == fast


def test_mean_dice_nan_without_common_labels():
    a = cube((8, 8, 8), (0, 0, 0), 2, label=1)
    b = cube((8, 8, 8), (0, 0, 0), 2, label=2)
    assert dice_per_label(a, b) == {}
    assert math.isnan(mean_dice(a, b))
    assert math.isnan(mean_dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 4))))


def test_dice_rejects_bad_input():
    with pytest.raises(InputError):
        dice_per_label(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError):
        dice_per_label(np.full((4, 4, 4), 0.5), np.zeros((4, 4, 4)))


# ----------------------------------------------------------------------------------------------- Jacobian
def test_jacobian_identity_is_exactly_one():
    jac = jacobian_determinant(np.zeros((3, 12, 10, 8), dtype=np.float32))
    assert jac.shape == (12, 10, 8)
    assert np.all(jac == 1.0)
    assert fraction_nonpositive_jacobian(jac) == 0.0
    assert sd_log_jacobian(jac) == 0.0
    assert abs(sd_log_jacobian_l2r(jac)) <= 1e-15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobian_linear_field(seed):
    rng = np.random.default_rng(seed)
    a = 0.3 * rng.standard_normal((3, 3))
    shape = (10, 12, 14)
    u = np.einsum("ij,jdhw->idhw", a, grid(shape))  # u = A x
    jac = jacobian_determinant(u)
    expected = np.linalg.det(np.eye(3) + a)
    assert np.max(np.abs(jac - expected)) <= 1e-6
    # float32 input and a batch-of-one axis are accepted
    jac32 = jacobian_determinant(u[None].astype(np.float32))
    assert np.max(np.abs(jac32 - expected)) <= 1e-4


def test_jacobian_spacing_invariant():
    rng = np.random.default_rng(3)
    u = 0.5 * rng.standard_normal((3, 8, 8, 8))
    j1 = jacobian_determinant(u)
    j2 = jacobian_determinant(u, spacing=(2.0, 1.0, 0.5))
    assert np.array_equal(j1, j2)
    # the same map expressed in mm (u_mm = s·u, derivatives per mm) has the same determinant
    s = np.array([2.0, 1.0, 0.5])
    u_mm = u * s[:, None, None, None]
    g = np.stack([np.stack(np.gradient(u_mm[i], *s)) for i in range(3)])  # (3, 3, D, H, W)
    jm = np.linalg.det(np.moveaxis(g, (0, 1), (-2, -1)) + np.eye(3))
    assert np.max(np.abs(jm - j1)) <= 1e-9
    with pytest.raises(InputError):
        jacobian_determinant(u, spacing=(1.0, 0.0, 1.0))


def test_jacobian_quadratic_field_interior():
    shape = (10, 6, 6)
    c = 0.05
    u = np.zeros((3, *shape))
    u[0] = c * grid(shape)[0] ** 2  # ∂u0/∂x0 = 2 c i, central differences exact in the interior
    jac = jacobian_determinant(u)
    i = np.arange(1, shape[0] - 1)
    assert np.max(np.abs(jac[1:-1] - (1 + 2 * c * i)[:, None, None])) <= 1e-9


def test_folding_field_detected():
    shape = (16, 16, 16)
    u = np.zeros((3, *shape))
    u[0] = 3.0 * np.sin(2 * np.pi * grid(shape)[0] / 16)  # max |∂u0/∂x0| ≈ 1.18 > 1: folds
    frac = fraction_nonpositive_jacobian(jacobian_determinant(u))
    assert 0.0 < frac < 1.0
    u_flip = -2.0 * grid(shape)  # x → −x: J = −1 everywhere
    assert fraction_nonpositive_jacobian(jacobian_determinant(u_flip)) == 1.0
    assert math.isnan(sd_log_jacobian(jacobian_determinant(u_flip)))


def test_sd_log_jacobian_values():
    jac = np.array([1.0, math.e, math.e**2, 0.0, -1.0])
    assert abs(sd_log_jacobian(jac) - math.sqrt(2 / 3)) <= 1e-12  # J ≤ 0 excluded
    ref = np.log(np.clip(jac + 3, 1e-9, 1e9)).std()
    assert abs(sd_log_jacobian_l2r(jac) - ref) <= 1e-12
    assert abs(sd_log_jacobian_l2r(np.array([-5.0, 1.0])) - np.std(np.log([1e-9, 4.0]))) <= 1e-12
    assert abs(fraction_nonpositive_jacobian(jac) - 0.4) <= 1e-12


def test_jacobian_rejects_bad_shape():
    with pytest.raises(InputError):
        jacobian_determinant(np.zeros((2, 8, 8, 8)))
    with pytest.raises(InputError):
        jacobian_determinant(np.zeros((3, 8, 1, 8)))


# ----------------------------------------------------------------------------------------------- HD95
def brute_force_hd95_label(ma: np.ndarray, mb: np.ndarray, spacing) -> float:
    """Obvious reference: surface = voxel with a 6-neighbour outside the mask (or the array); all pairs."""

    def surface_points(m):
        pts = []
        for idx in itertools.product(*[range(s) for s in m.shape]):
            if not m[idx]:
                continue
            for ax, step in itertools.product(range(3), (-1, 1)):
                nb = list(idx)
                nb[ax] += step
                if not (0 <= nb[ax] < m.shape[ax]) or not m[tuple(nb)]:
                    pts.append(idx)
                    break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing)

    pa, pb = surface_points(ma), surface_points(mb)
    d_ab = [min(math.dist(p, q) for q in pb) for p in pa]
    d_ba = [min(math.dist(q, p) for p in pa) for q in pb]
    return max(float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95)))


def test_hd95_identical_is_zero():
    lab = random_labels((12, 12, 12), n=4)
    assert hd95(lab, lab) == 0.0
    assert hd95(lab, lab, spacing=(2.0, 1.0, 0.5)) == 0.0


@pytest.mark.parametrize(("k", "spacing"), [(2, (1.0, 1.0, 1.0)), (3, (2.0, 1.0, 1.0)), (4, (0.8, 1.5, 1.2))])
def test_hd95_shifted_mask(k, spacing):
    shape = (32, 24, 24)
    a = cube(shape, (6, 6, 6), 10)
    b = cube(shape, (6 + k, 6, 6), 10)  # shifted by k voxels along axis 0
    value = hd95(a, b, spacing=spacing)
    assert abs(value - k * spacing[0]) <= spacing[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    shape = (7, 8, 6)
    a = np.zeros(shape, dtype=np.int64)
    b = np.zeros(shape, dtype=np.int64)
    # two labels: blobby random masks (random noise thresholded), overlapping but different
    for lab in (1, 2):
        a[(rng.random(shape) < 0.3) & (a == 0)] = lab
        b[(rng.random(shape) < 0.3) & (b == 0)] = lab
    spacing = (1.5, 1.0, 0.7)
    refs = [brute_force_hd95_label(a == lab, b == lab, spacing) for lab in (1, 2)]
    assert abs(hd95(a, b, spacing=spacing) - np.mean(refs)) <= 1e-9
    assert abs(hd95(a, b, spacing=spacing, labels=[2]) - refs[1]) <= 1e-9


def test_hd95_crop_does_not_change_value():
    # the per-label bounding-box crop must be exact: compare against an uncropped brute force
    a = cube((14, 14, 14), (1, 2, 3), 5) + cube((14, 14, 14), (8, 8, 8), 4, label=1)
    b = cube((14, 14, 14), (3, 2, 1), 6)
    assert abs(hd95(a, b) - brute_force_hd95_label(a == 1, b == 1, (1, 1, 1))) <= 1e-9


def test_hd95_no_common_labels_is_nan():
    a = cube((8, 8, 8), (0, 0, 0), 2, label=1)
    b = cube((8, 8, 8), (0, 0, 0), 2, label=2)
    assert math.isnan(hd95(a, b))
    with pytest.raises(InputError):
        hd95(a, b, spacing=(1.0, 1.0))


# ----------------------------------------------------------------------------------------------- intensity
def test_ncc_global_sanity():
    rng = np.random.default_rng(0)
    x = rng.random((8, 8, 8))
    y = rng.random((8, 8, 8))
    assert abs(ncc_global(x, x) - 1.0) <= 1e-12
    assert abs(ncc_global(x, 3.0 * x + 2.0) - 1.0) <= 1e-12
    assert abs(ncc_global(x, -x) + 1.0) <= 1e-12
    assert abs(ncc_global(x, y) - np.corrcoef(x.ravel(), y.ravel())[0, 1]) <= 1e-12
    assert math.isnan(ncc_global(x, np.ones_like(x)))


def test_ncc_global_float32_follows_the_float64_reference():
    rng = np.random.default_rng(1)
    x = rng.random((20, 18, 16)).astype(np.float32)
    y = (0.7 * x + 0.3 * rng.random(x.shape)).astype(np.float32)
    assert abs(ncc_global_float32(x, y) - ncc_global(x, y)) <= 1e-6
    assert abs(ncc_global_float32(x, x) - 1.0) <= 1e-6
    assert math.isnan(ncc_global_float32(x, np.ones_like(x)))


def test_psnr_sanity():
    rng = np.random.default_rng(0)
    x = rng.random((8, 8, 8))
    assert psnr(x, x) == math.inf
    assert abs(psnr(x, x + 0.1) - 20.0) <= 1e-9  # MSE 0.01, range 1
    assert abs(psnr(x, x + 0.1, data_range=10.0) - 40.0) <= 1e-9
    assert psnr(x, x + 0.01) > psnr(x, x + 0.1)
    with pytest.raises(InputError):
        psnr(x, x, data_range=0.0)


# ----------------------------------------------------------------------------------------------- summary
def test_registration_metrics_keys_and_values():
    shape = (12, 12, 12)
    rng = np.random.default_rng(0)
    flow = 0.3 * rng.standard_normal((3, *shape))
    fixed = cube(shape, (2, 2, 2), 6)
    warped = cube(shape, (3, 2, 2), 6)
    out = registration_metrics(flow, fixed, warped, spacing=(1.0, 1.0, 2.0))
    assert set(out) == {"dice", "hd95_mm", "frac_jac_nonpos", "sdlogj", "sdlogj_l2r"}
    assert all(isinstance(v, float) for v in out.values())
    jac = jacobian_determinant(flow)
    assert abs(out["dice"] - mean_dice(warped, fixed)) <= 1e-12
    assert abs(out["hd95_mm"] - hd95(warped, fixed, spacing=(1.0, 1.0, 2.0))) <= 1e-12
    assert abs(out["frac_jac_nonpos"] - fraction_nonpositive_jacobian(jac)) <= 1e-12
    assert abs(out["sdlogj"] - sd_log_jacobian(jac)) <= 1e-12
    assert abs(out["sdlogj_l2r"] - sd_log_jacobian_l2r(jac)) <= 1e-12

    no_labels = registration_metrics(np.zeros((3, *shape)))
    assert math.isnan(no_labels["dice"]) and math.isnan(no_labels["hd95_mm"])
    assert no_labels["frac_jac_nonpos"] == 0.0 and no_labels["sdlogj"] == 0.0
    with pytest.raises(InputError):
        registration_metrics(flow, fixed, None)
    with pytest.raises(InputError):
        registration_metrics(flow, fixed[:-1], warped[:-1])
