"""RAS reorientation, world-coordinate resampling and displacement helpers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from oracles import model_flow_to_native, warp_world
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from emorph_deploy.data import (
    affine_ras_to_lps,
    model_grid_affine,
    native_displacement_to_voxel_flow,
    reorient_to_ras,
    resample_to_grid,
    voxel_flow_to_world,
    voxel_sizes,
    world_flow_to_voxel,
)
from emorph_deploy.data.orientation import axcodes, fov_centre, ras_to_lps_points, ras_to_lps_vectors


def _oblique_lps_affine() -> np.ndarray:
    """Axis-permuted (array axes ~ S, L, P), anisotropic, slightly oblique, translated affine."""
    perm = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], dtype=np.float64)  # axis0->+z, axis1->-x, axis2->-y
    rot = Rotation.from_euler("xyz", [7, -5, 4], degrees=True).as_matrix()
    a = np.eye(4)
    a[:3, :3] = rot @ perm @ np.diag([1.5, 0.9, 1.2])
    a[:3, 3] = [12.0, -20.0, 5.5]
    return a


def _smooth(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    x = np.random.default_rng(seed).random(shape)
    return gaussian_filter(x, 2.0).astype(np.float32)


def test_voxel_sizes_and_axcodes() -> None:
    a = _oblique_lps_affine()
    np.testing.assert_allclose(voxel_sizes(a), [1.5, 0.9, 1.2], atol=1e-12)
    assert axcodes(a) == ("S", "L", "P")


def test_reorient_to_ras_keeps_world_positions() -> None:
    shape = (11, 12, 13)
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    a = _oblique_lps_affine()
    out = reorient_to_ras(nib.Nifti1Image(data, a))
    assert axcodes(out.affine) == ("R", "A", "S")
    assert out.shape == (12, 13, 11)
    # every voxel's content sits at the same world coordinate
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(a, ijk)
    ijk2 = nib.affines.apply_affine(np.linalg.inv(out.affine), world)
    np.testing.assert_allclose(ijk2, np.round(ijk2), atol=1e-9)
    ijk2 = np.round(ijk2).astype(int)
    out_data = np.asanyarray(out.dataobj)
    np.testing.assert_array_equal(out_data[ijk2[:, 0], ijk2[:, 1], ijk2[:, 2]], data.reshape(-1))


def test_ras_lps_helpers() -> None:
    p = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(ras_to_lps_points(p), [[-1.0, -2.0, 3.0]], atol=0)
    np.testing.assert_allclose(ras_to_lps_points(ras_to_lps_points(p)), p, atol=0)
    v = np.ones((3, 2, 2, 2))
    np.testing.assert_allclose(ras_to_lps_vectors(v)[:, 0, 0, 0], [-1, -1, 1], atol=0)
    a = _oblique_lps_affine()
    np.testing.assert_allclose(affine_ras_to_lps(a)[:3, :3], np.diag([-1, -1, 1]) @ a[:3, :3], atol=0)


def test_resample_matches_scipy_reference_on_oblique_affine() -> None:
    src_shape = (30, 34, 28)
    data = _smooth(src_shape)
    src_aff = _oblique_lps_affine()
    ref = (src_shape, src_aff)
    dst_shape = (32, 30, 36)
    dst_aff = model_grid_affine(ref, dst_shape, (1.1, 1.1, 1.1))
    fast = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1)
    slow = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, method="scipy")
    # independent reference: world of every destination voxel -> source voxel -> map_coordinates
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in dst_shape], indexing="ij"), 0).reshape(3, -1)
    world = dst_aff[:3, :3] @ ijk + dst_aff[:3, 3:4]
    src_ijk = np.linalg.inv(src_aff)[:3, :3] @ world + np.linalg.inv(src_aff)[:3, 3:4]
    ref_vals = map_coordinates(data.astype(np.float64), src_ijk, order=1, mode="grid-constant", cval=0.0)
    ref_vals = ref_vals.reshape(dst_shape)
    assert fast.dtype == np.float32 and fast.shape == dst_shape
    assert np.abs(ref_vals).max() > 0.1  # the grids overlap
    np.testing.assert_allclose(slow, ref_vals, atol=1e-10)
    np.testing.assert_allclose(fast, ref_vals, atol=1e-4)
    # non-zero cval and border padding agree with scipy too
    fast_c = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, cval=0.25)
    slow_c = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, cval=0.25, method="scipy")
    np.testing.assert_allclose(fast_c, slow_c, atol=1e-4)
    fast_b = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, padding="border")
    slow_b = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, padding="border", method="scipy")
    np.testing.assert_allclose(fast_b, slow_b, atol=1e-4)


@pytest.mark.parametrize(("padding", "cval"), [("zeros", 0.0), ("zeros", 0.25), ("border", 0.0)])
def test_axis_aligned_separable_path_matches_scipy_and_grid_sample(padding, cval, monkeypatch) -> None:
    """Axis-aligned maps (flips, anisotropic spacing, an axis permutation, a field of view larger than the
    source so both paddings matter) take three 1-D interpolations; they equal scipy and the 3D grid_sample."""
    import emorph_deploy.data.resample as rs

    src_shape = (30, 34, 28)
    data = _smooth(src_shape, seed=3) + 0.5
    src_aff = np.array([[0.0, 0.0, -1.2, 20.0], [1.1, 0.0, 0.0, -15.0], [0.0, -0.9, 0.0, 12.0], [0, 0, 0, 1]])
    dst_shape = (40, 31, 44)
    dst_aff = np.diag([0.8, 1.3, 0.9, 1.0])
    dst_aff[:3, 3] = [-18.0, -22.0, -16.0]
    m = np.linalg.inv(src_aff) @ dst_aff
    assert rs.axis_map(m) is not None  # permuted + flipped, still axis-aligned
    fast = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, cval=cval, padding=padding)
    slow = resample_to_grid(
        data, src_aff, dst_shape, dst_aff, order=1, cval=cval, padding=padding, method="scipy"
    )
    monkeypatch.setattr(rs, "axis_map", lambda m, tol=1e-7: None)  # force the 3D grid_sample route
    gs = resample_to_grid(data, src_aff, dst_shape, dst_aff, order=1, cval=cval, padding=padding)
    if padding == "zeros":
        inside = (slow != cval).mean()
        assert 0.2 < inside < 0.95  # the field of view crosses the source's edges
    np.testing.assert_allclose(fast, slow, atol=2e-5)
    np.testing.assert_allclose(fast, gs, atol=2e-5)
    # channels and a 4D input go through the same path
    two = resample_to_grid(
        np.stack([data, 2 * data]), src_aff, dst_shape, dst_aff, order=1, padding=padding, cval=cval
    )
    one = resample_to_grid(2 * data, src_aff, dst_shape, dst_aff, order=1, padding=padding, cval=cval)
    np.testing.assert_allclose(two[0], fast, atol=1e-5)
    np.testing.assert_allclose(two[1], one, atol=1e-5)


def test_identity_resampling_is_exact() -> None:
    data = _smooth((20, 21, 22))
    aff = _oblique_lps_affine()
    out = resample_to_grid(data, aff, data.shape, aff, order=1)
    np.testing.assert_array_equal(out, data)
    # an integer voxel shift (crop) through the general path is exact to float32 rounding
    shift = np.eye(4)
    shift[:3, 3] = [2, 3, 1]
    crop = resample_to_grid(data, aff, (10, 11, 12), aff @ shift, order=1)
    np.testing.assert_allclose(crop, data[2:12, 3:14, 1:13], atol=1e-6)
    crop_nn = resample_to_grid(data, aff, (10, 11, 12), aff @ shift, order=0)
    np.testing.assert_array_equal(crop_nn, data[2:12, 3:14, 1:13])


def test_nearest_keeps_label_values_and_dtype() -> None:
    rng = np.random.default_rng(3)
    values = np.array([0, 3, 17, 42, 1000, 30000], dtype=np.int16)
    labels = values[rng.integers(0, len(values), size=(16, 18, 20))]
    src_aff = _oblique_lps_affine()
    dst_aff = model_grid_affine((labels.shape, src_aff), (24, 24, 24), (0.7, 0.7, 0.7))
    out = resample_to_grid(labels, src_aff, (24, 24, 24), dst_aff, order=0)
    assert out.dtype == np.int16
    assert set(np.unique(out)) <= set(values.tolist())
    assert len(np.unique(out)) == len(values)
    slow = resample_to_grid(labels, src_aff, (24, 24, 24), dst_aff, order=0, method="scipy")
    np.testing.assert_array_equal(out, slow)


def test_model_grid_centred_on_reference_fov() -> None:
    ref_shape = (40, 50, 30)
    ref_aff = _oblique_lps_affine()
    shape, spacing = (16, 20, 24), (2.0, 1.5, 1.0)
    g = model_grid_affine((ref_shape, ref_aff), shape, spacing)
    np.testing.assert_allclose(fov_centre(shape, g), fov_centre(ref_shape, ref_aff), atol=1e-9)
    np.testing.assert_allclose(g[:3, :3], np.diag(spacing), atol=0)  # RAS-aligned, given spacing
    assert axcodes(g) == ("R", "A", "S")
    img = nib.Nifti1Image(np.zeros(ref_shape, np.float32), ref_aff)
    np.testing.assert_allclose(model_grid_affine(img, shape, spacing), g, atol=1e-9)


def test_flow_world_roundtrip() -> None:
    flow = np.random.default_rng(0).normal(size=(3, 4, 5, 6))
    a = _oblique_lps_affine()
    back = world_flow_to_voxel(voxel_flow_to_world(flow, a), a)
    np.testing.assert_allclose(back, flow, atol=1e-10)
    # unit voxel step along axis 0 is the first affine column in world mm
    e0 = np.zeros((3, 1, 1, 1))
    e0[0] = 1.0
    np.testing.assert_allclose(voxel_flow_to_world(e0, a)[:, 0, 0, 0], a[:3, 0], atol=1e-12)


def test_model_flow_to_native_and_warp_world() -> None:
    """A model-grid flow mapped to a non-RAS native grid warps an analytic moving image correctly."""

    def f(p: np.ndarray) -> np.ndarray:  # smooth function of world position (mm), p (..., 3)
        return np.sin(p[..., 0] / 7.0) + np.cos(p[..., 1] / 9.0) * np.sin(p[..., 2] / 11.0 + 0.3)

    mov_shape = (40, 44, 36)
    mov_aff = np.eye(4)
    mov_aff[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.diag([1.2, 1.2, 1.2])  # LPS moving grid
    mov_aff[:3, 3] = [24.0, 26.0, -21.0]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in mov_shape], indexing="ij"), -1)
    moving = f(nib.affines.apply_affine(mov_aff, ijk)).astype(np.float32)

    fix_shape = (20, 22, 18)
    fix_aff = _oblique_lps_affine()
    fix_aff[:3, 3] = -fix_aff[:3, :3] @ (np.array(fix_shape) - 1) / 2  # FOV centred on the origin
    grid = model_grid_affine((fix_shape, fix_aff), (24, 24, 24), (1.5, 1.5, 1.5))
    t_vox = np.array([1.0, -2.0, 0.5])
    flow = np.broadcast_to(t_vox.reshape(3, 1, 1, 1), (3, 24, 24, 24)).astype(np.float32)

    disp = model_flow_to_native(flow, grid, fix_shape, fix_aff)  # (3, *fix_shape) RAS mm
    np.testing.assert_allclose(disp[:, 3, 4, 5], 1.5 * t_vox, atol=1e-5)
    warped = warp_world(moving, mov_aff, fix_shape, fix_aff, disp, order=1)
    fix_world = nib.affines.apply_affine(
        fix_aff, np.stack(np.meshgrid(*[np.arange(s) for s in fix_shape], indexing="ij"), -1)
    )
    expected = f(fix_world + 1.5 * t_vox)
    np.testing.assert_allclose(warped, expected, atol=0.02)  # linear-interpolation error of a smooth function
    vox = native_displacement_to_voxel_flow(disp, fix_aff)
    np.testing.assert_allclose(voxel_flow_to_world(vox, fix_aff), disp, atol=1e-4)
    # no displacement = plain resampling; nearest keeps dtype
    lab = (moving > 0).astype(np.uint8)
    out = warp_world(lab, mov_aff, fix_shape, fix_aff, disp, order=0)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="order"):
        resample_to_grid(np.zeros((4, 4, 4)), np.eye(4), (4, 4, 4), np.eye(4) * 2, order=3)
    with pytest.raises(ValueError, match="padding"):
        resample_to_grid(np.zeros((4, 4, 4)), np.eye(4), (4, 4, 4), np.eye(4) * 2, padding="reflect")


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_lerp_axis_integral_indices_are_an_exact_gather(padding) -> None:
    """Integral source indices take the gather shortcut (identity: the tensor itself) and agree with the
    interpolating path, which a 1e-9 nudge forces."""
    import torch

    from emorph_deploy.data.resample import lerp_axis

    x = torch.from_numpy(RNG_LERP.random((2, 5, 6, 7)).astype(np.float32))
    ident = np.arange(6, dtype=np.float64)
    assert lerp_axis(x, 2, ident, padding) is x
    for coords in (np.array([0.0, 2, 2, 5, 1]), np.array([-2.0, 0, 3, 6, 9])):
        got = lerp_axis(x, 2, coords, padding)
        ref = lerp_axis(x, 2, coords + 1e-9, padding)  # not integral: the general lerp
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    if padding == "zeros":  # outside indices read the zero padding
        out = lerp_axis(x, 2, np.array([-1.0, 6.0]), padding)
        assert torch.count_nonzero(out) == 0
    # a shifted run clamped at both ends (grids on the same lattice) is slices + edge copies: exact
    for start, size in ((-3, 12), (2, 3), (-2, 2), (4, 5), (0, 6)):
        coords = np.arange(start, start + size, dtype=np.float64)
        if padding == "zeros" and (coords.min() < 0 or coords.max() > 5):
            continue
        got = lerp_axis(x, 2, coords, padding)
        ref = x.index_select(2, torch.from_numpy(np.clip(coords, 0, 5).astype(np.int64)))
        assert torch.equal(got, ref)


def test_resample_onto_the_same_grid_is_a_copy() -> None:
    data = RNG_LERP.random((6, 7, 8)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    out = resample_to_grid(data, aff, data.shape, aff, order=1)
    np.testing.assert_array_equal(out, data)
    assert not np.shares_memory(out, data)


RNG_LERP = np.random.default_rng(11)


@pytest.mark.parametrize("padding", ["border", "zeros"])
@pytest.mark.parametrize("offset", [0.5, 0.3, -3.7, 6.25, -40.5])
def test_lerp_axis_unit_step_slices_equal_the_gathers(padding, offset, monkeypatch) -> None:
    """Equal spacing (unit steps, any offset, clamped ends) runs on slices; bit-identical to the gathers."""
    import torch

    import emorph_deploy.data.resample as R

    x = torch.from_numpy(RNG_LERP.random((2, 9, 5, 4)).astype(np.float32))
    coords = np.arange(14, dtype=np.float64) + offset  # reaches past both ends for most offsets
    calls: list[object] = []
    real = R._unit_step_runs

    def spy(*a):
        out = real(*a)
        calls.append(out)
        return out

    monkeypatch.setattr(R, "_unit_step_runs", spy)
    got = R.lerp_axis(x, 1, coords, padding)
    assert calls and calls[0] is not None  # the slice path ran
    monkeypatch.setattr(R, "_unit_step_runs", lambda *a: None)
    ref = R.lerp_axis(x, 1, coords, padding)
    assert got.shape == ref.shape == (2, 14, 5, 4)
    assert torch.equal(got, ref)


def test_fortran_ordered_volume_resamples_like_its_c_copy() -> None:
    """A Fortran-ordered volume (nibabel's order) is sampled through its reversed view, not copied: the
    result equals that of the C-ordered copy (separable and oblique paths)."""
    data = np.asfortranarray(RNG_LERP.random((11, 13, 9)).astype(np.float32))
    src = np.array([[-1.4, 0, 0, 6], [0, 1.2, 0, -5], [0, 0, 1.7, 2], [0, 0, 0, 1.0]])
    oblique = np.eye(4)
    oblique[:3, :3] = [[0.99, -0.14, 0], [0.14, 0.99, 0], [0, 0, 1]]
    for dst in (np.diag([2.0, 2.0, 2.0, 1.0]), oblique @ np.diag([1.5, 1.5, 1.5, 1.0])):
        for padding in ("zeros", "border"):
            got = resample_to_grid(data, src, (7, 8, 6), dst, order=1, padding=padding)
            ref = resample_to_grid(np.ascontiguousarray(data), src, (7, 8, 6), dst, order=1, padding=padding)
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
            lab = (data > 0.5).astype(np.int16)
            got0 = resample_to_grid(np.asfortranarray(lab), src, (7, 8, 6), dst, order=0)
            ref0 = resample_to_grid(np.ascontiguousarray(lab), src, (7, 8, 6), dst, order=0)
            assert (got0 != ref0).mean() < 0.02  # rounding ties only


def test_resample_onto_a_crop_of_the_same_lattice_is_a_copy() -> None:
    """A grid on the source's own lattice (a crop: shifted integral indices, taken as slices) still returns a
    new array, never a view of the caller's."""
    data = RNG_LERP.random((10, 8, 6)).astype(np.float32)
    dst = np.eye(4)
    dst[:3, 3] = [2.0, 1.0, 0.0]
    out = resample_to_grid(data, np.eye(4), (5, 6, 6), dst, order=1)
    np.testing.assert_array_equal(out, data[2:7, 1:7])
    assert not np.shares_memory(out, data)
