"""The outputs other toolkits consume: ANTsPy and SimpleITK apply ``affine.mat``, ``displacement.nii.gz`` and
``inverse_displacement.nii.gz``; ``jacobian.nii.gz`` matches ITK's; header codes survive.

The pair: nilearn's MNI152 template at 4 mm (fixed, sform/qform codes 4/2, a display range) and the same
template moved by a known rigid transform onto an oblique 3.5 mm grid (moving); a stub runner returns a
smooth flow of up to ~5 mm, composed with the affine pre-alignment.
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

from emorph_deploy.data.orientation import RAS_TO_LPS, voxel_to_world
from emorph_deploy.registration import Registrar

GRID = (24, 28, 24)


def _rigid(angle_deg: float, shift: tuple[float, float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    t = np.eye(4)
    t[:3, :3] = [[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]
    t[:3, 3] = shift
    return t


#: The pair's rigid transform, fixed world -> moving world.
TRUE_T = _rigid(6.0, (4.0, -3.0, 2.0))


def write_mni_pair(folder) -> dict:
    """``folder``/fixed.nii.gz (MNI152 at 4 mm, codes 2/4, cal_max 0.8) and ``folder``/moving.nii.gz (it under
    :data:`TRUE_T` on an oblique 3.5 mm grid): ``{"fixed": array, "moving": array, "f_aff", "m_aff"}``."""
    datasets = pytest.importorskip("nilearn.datasets", reason="nilearn ships the MNI152 template")
    from emorph_deploy.data.resample import resample_to_grid

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = datasets.load_mni152_template(resolution=2)
    data = np.asanyarray(t.dataobj, dtype=np.float32)[::2, ::2, ::2].copy()
    data /= data.max()
    f_aff = t.affine.copy()
    f_aff[:3, :3] *= 2.0
    m_aff = _rigid(20.0, (0, 0, 0)) @ np.diag([3.5, 3.5, 3.5, 1.0])
    m_aff[:3, 3] = voxel_to_world(f_aff, (np.array(data.shape) - 1) / 2) - m_aff[:3, :3] @ [24, 26, 24]
    m_shape = (49, 53, 49)
    moving = resample_to_grid(data, TRUE_T @ f_aff, m_shape, m_aff, order=1)
    fixed_img = nib.Nifti1Image(data, f_aff)
    fixed_img.set_qform(f_aff, code=2)
    fixed_img.set_sform(f_aff, code=4)
    fixed_img.header["cal_min"], fixed_img.header["cal_max"] = 0.0, 0.8
    nib.save(fixed_img, folder / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(moving, m_aff), folder / "moving.nii.gz")
    return {"fixed": data, "moving": moving, "f_aff": f_aff, "m_aff": m_aff}


@pytest.fixture(scope="module")
def registered(tmp_path_factory, stub_runner):
    from test_native import smooth_flow

    tmp = tmp_path_factory.mktemp("itk")
    pair = write_mni_pair(tmp)
    runner = stub_runner(smooth_flow(GRID, amp=0.8), spacing=7.0)
    res = Registrar(runner, affine=True, warmup=False).register(tmp / "fixed.nii.gz", tmp / "moving.nii.gz")
    res.save(tmp / "out")
    return {
        "dir": tmp,
        "out": tmp / "out",
        "res": res,
        "fixed": pair["fixed"],
        "f_aff": pair["f_aff"],
        "m_aff": pair["m_aff"],
    }


def _brain_points(reg, n: int = 3000) -> np.ndarray:
    """World points (RAS mm) of fixed voxels inside the brain, (n, 3)."""
    ijk = np.argwhere(reg["fixed"] > 0.3)
    ijk = ijk[np.random.default_rng(0).choice(len(ijk), size=min(n, len(ijk)), replace=False)]
    return voxel_to_world(reg["f_aff"], ijk)


def test_outputs_written_with_header_codes(registered):
    out = registered["out"]
    names = {p.name for p in out.iterdir()}
    assert {"inverse_displacement.nii.gz", "jacobian.nii.gz", "affine.mat", "displacement.nii.gz"} <= names
    assert json.loads((out / "qc.json").read_text())["outputs"]["affine"] == "affine.mat"
    for name in ("warped.nii.gz", "displacement.nii.gz", "jacobian.nii.gz"):
        hdr = nib.load(out / name).header
        assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (2, 4), name
    warped = nib.load(out / "warped.nii.gz").header
    assert float(warped["cal_max"]) == pytest.approx(0.8)
    inv = nib.load(out / "inverse_displacement.nii.gz")
    assert inv.shape == (49, 53, 49, 1, 3) and inv.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(inv.affine, registered["m_aff"], atol=1e-4)


def test_simpleitk_forward_then_inverse_returns_points(registered):
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is the ITK client under test")
    out = registered["out"]

    def field(name):
        img = sitk.ReadImage(str(out / name), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(img)

    fwd, inv = field("displacement.nii.gz"), field("inverse_displacement.nii.gz")
    pts = _brain_points(registered) @ RAS_TO_LPS[:3, :3]
    moved = np.array([fwd.TransformPoint(tuple(p)) for p in pts])
    back = np.array([inv.TransformPoint(tuple(q)) for q in moved])
    err = np.linalg.norm(back - pts, axis=1)
    assert np.linalg.norm(moved - pts, axis=1).mean() > 3.0  # a real transform, not the identity
    assert err.mean() < 0.5, err.mean()

    aff = sitk.ReadTransform(str(out / "affine.mat"))
    pre = registered["res"].pre_affine
    assert registered["res"].qc["affine_accepted"] and not np.allclose(pre, np.eye(4), atol=1e-2)
    expect = (pts @ RAS_TO_LPS[:3, :3] @ pre[:3, :3].T + pre[:3, 3]) @ RAS_TO_LPS[:3, :3]
    got = np.array([aff.TransformPoint(tuple(p)) for p in pts[:50]])
    np.testing.assert_allclose(got, expect[:50], atol=1e-6)


def test_jacobian_matches_world_gradient(registered):
    """ITK's DisplacementFieldJacobianDeterminant differentiates along index axes and ignores the image
    direction, so the reference here is numpy's gradient of the field in world axes (RAS-aligned grid)."""
    out = registered["out"]
    ours = nib.load(out / "jacobian.nii.gz").get_fdata()
    disp = nib.load(out / "displacement.nii.gz").get_fdata()[:, :, :, 0, :] @ RAS_TO_LPS[:3, :3]  # RAS mm
    spacing = np.diag(registered["f_aff"])[:3]
    grad = np.stack([np.stack(np.gradient(disp[..., c], *spacing), -1) for c in range(3)], -2)
    ref = np.linalg.det(np.eye(3) + grad)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    times = registered["res"].qc["times_s"]
    assert np.ptp(ours[registered["fixed"] > 0.3]) > 0.05, times  # a deformation, not a constant


def test_antspy_applies_forward_inverse_and_affine(registered):
    ants = pytest.importorskip("ants", reason="ANTsPy is the ANTs client under test")
    d, out = registered["dir"], registered["out"]
    fixed, moving = ants.image_read(str(d / "fixed.nii.gz")), ants.image_read(str(d / "moving.nii.gz"))
    warped = ants.apply_transforms(fixed, moving, [str(out / "displacement.nii.gz")]).numpy()
    ours = nib.load(out / "warped.nii.gz").get_fdata()
    assert np.abs(warped - ours)[registered["fixed"] > 0.3].max() < 1e-3

    # coordinate images: through the inverse onto the moving grid, then forward back onto the fixed grid
    ijk = np.indices(registered["fixed"].shape).transpose(1, 2, 3, 0)
    world = voxel_to_world(registered["f_aff"], ijk)
    back = []
    for c in range(3):
        nib.save(nib.Nifti1Image(world[..., c].astype(np.float32), registered["f_aff"]), d / f"c{c}.nii.gz")
        coord = ants.image_read(str(d / f"c{c}.nii.gz"))
        on_moving = ants.apply_transforms(moving, coord, [str(out / "inverse_displacement.nii.gz")])
        back.append(ants.apply_transforms(fixed, on_moving, [str(out / "displacement.nii.gz")]).numpy())
    err = np.linalg.norm(np.stack(back, -1) - world, axis=-1)[registered["fixed"] > 0.3]
    assert err.mean() < 0.5, err.mean()

    tx = ants.read_transform(str(out / "affine.mat"))
    pre = registered["res"].pre_affine
    p = _brain_points(registered, 5)[0]
    expect = RAS_TO_LPS[:3, :3] @ (pre[:3, :3] @ p + pre[:3, 3])
    np.testing.assert_allclose(tx.apply_to_point(tuple(RAS_TO_LPS[:3, :3] @ p)), expect, atol=1e-3)
