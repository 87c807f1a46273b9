"""``apply_transforms``: a saved registration applied to other images, in ANTs' transform-list order.

The pair: nilearn's MNI152 template at 4 mm (fixed, sform/qform codes 4/2) and the same template moved by a
known rigid transform onto an oblique 3.5 mm grid (moving, with a 3-class label map); a stub runner returns a
smooth flow of up to ~5 mm, and the pre-alignment is the known rigid transform (the fit itself is
test_affine's subject), so ``affine.mat`` and both fields are written. ANTsPy and SimpleITK apply the same
transform lists as the references.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from emorph_deploy.data.orientation import voxel_to_world
from emorph_deploy.errors import InputError
from emorph_deploy.registration import Registrar
from emorph_deploy.registration.apply import apply_transforms

GRID = (24, 28, 24)


class _KnownAffine(Registrar):
    """The pre-alignment is the pair's true rigid transform (no fit)."""

    def _prealign(self, *args):
        from test_itk_outputs import TRUE_T

        return TRUE_T.copy(), {"affine_matrix": TRUE_T.tolist(), "affine_accepted": True}


@pytest.fixture(scope="module")
def reg(tmp_path_factory, stub_runner):
    from test_itk_outputs import write_mni_pair
    from test_native import smooth_flow

    d = tmp_path_factory.mktemp("apply")
    pair = write_mni_pair(d)
    labels = np.digitize(pair["moving"], [0.2, 0.5]).astype(np.int16) * np.int16(3)  # 0, 3, 6
    nib.save(nib.Nifti1Image(labels, pair["m_aff"]), d / "labels.nii.gz")
    runner = stub_runner(smooth_flow(GRID, amp=0.8), spacing=7.0)
    # refine=0: the tests check how the outputs apply and invert the stub's known smooth flow
    res = _KnownAffine(runner, affine=True, warmup=False).register(
        d / "fixed.nii.gz", d / "moving.nii.gz", d / "labels.nii.gz", refine=0
    )
    res.save(d / "out", qc_png=False)
    data = pair["fixed"]
    return {
        "dir": d,
        "out": d / "out",
        "fixed": data,
        "f_aff": pair["f_aff"],
        "m_aff": pair["m_aff"],
        "brain": data > 0.3,
    }


def _files(reg, *names):
    return [str(reg["out"] / n) for n in names]


def test_displacement_reproduces_warped_and_its_header(reg):
    d, out = reg["dir"], reg["out"]
    img = apply_transforms(_files(reg, "displacement.nii.gz"), d / "moving.nii.gz", d / "fixed.nii.gz")
    ref = nib.load(out / "warped.nii.gz")
    got = np.asanyarray(img.dataobj)
    assert got.dtype == np.float32 and got.shape == ref.shape
    want = ref.get_fdata(dtype=np.float32)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (2, 4)
    assert float(img.header["cal_max"]) == pytest.approx(0.8)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-6)


def test_nearest_reproduces_warped_labels(reg):
    d, out = reg["dir"], reg["out"]
    img = apply_transforms(
        _files(reg, "displacement.nii.gz"), d / "labels.nii.gz", d / "fixed.nii.gz", interp="nearest"
    )
    ref = nib.load(out / "warped_labels.nii.gz")
    got, want = np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj)
    assert img.get_data_dtype() == ref.get_data_dtype() == np.int16
    assert np.mean(got == want) >= 0.999
    assert set(np.unique(got)) == {0, 3, 6}


@pytest.mark.parametrize(
    "names",
    [
        ("displacement.nii.gz",),
        ("affine.mat",),
        ("displacement.nii.gz", "[affine.mat,1]"),  # the deformable part alone: T^-1(T(p + u(p)))
        ("[affine.mat,1]", "displacement.nii.gz"),  # the other order: a different map
    ],
)
def test_lists_match_antspy_and_simpleitk(reg, names):
    d = reg["dir"]
    specs = [n if not n.startswith("[") else f"[{reg['out'] / n[1:]}" for n in names]
    specs = [s if s.startswith("[") else str(reg["out"] / s) for s in specs]
    ours = np.asanyarray(apply_transforms(specs, d / "moving.nii.gz", d / "fixed.nii.gz").dataobj)
    brain = reg["brain"]
    paths = [s.strip("[]").split(",")[0] for s in specs]
    invert = [s.startswith("[") for s in specs]

    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is a reference implementation")
    txs = []
    for p, inv in zip(paths, invert, strict=True):
        if p.endswith(".mat"):
            tx = sitk.ReadTransform(p)
            txs.append(tx.GetInverse() if inv else tx)
        else:
            txs.append(sitk.DisplacementFieldTransform(sitk.ReadImage(p, sitk.sitkVectorFloat64)))
    fixed_s, moving_s = sitk.ReadImage(str(d / "fixed.nii.gz")), sitk.ReadImage(str(d / "moving.nii.gz"))
    # ITK's CompositeTransform applies its last-added transform to the points first: ANTs' list reversed
    ref = sitk.Resample(moving_s, fixed_s, sitk.CompositeTransform(txs[::-1]), sitk.sitkLinear, 0.0)
    ref = sitk.GetArrayFromImage(ref).T  # (k, j, i) -> (i, j, k)
    assert np.abs(ours - ref)[brain].max() < 1e-3, names

    ants = pytest.importorskip("ants", reason="ANTsPy is a reference implementation")
    fixed_a, moving_a = ants.image_read(str(d / "fixed.nii.gz")), ants.image_read(str(d / "moving.nii.gz"))
    warped = ants.apply_transforms(fixed_a, moving_a, paths, whichtoinvert=invert).numpy()
    assert np.abs(ours - warped)[brain].max() < 1e-3, names


def test_order_matters(reg):
    """The two orders of the same pair differ (by the pre-alignment's action on the flow): the list is
    really applied in order, not as a set."""
    d = reg["dir"]
    inv_aff, disp = f"[{reg['out'] / 'affine.mat'},1]", str(reg["out"] / "displacement.nii.gz")
    a = np.asanyarray(apply_transforms([inv_aff, disp], d / "moving.nii.gz", d / "fixed.nii.gz").dataobj)
    b = np.asanyarray(apply_transforms([disp, inv_aff], d / "moving.nii.gz", d / "fixed.nii.gz").dataobj)
    assert np.abs(a - b)[reg["brain"]].mean() > 0.01


def test_label_interp_matches_ants_generic_label(reg):
    ants = pytest.importorskip("ants", reason="ANTsPy's genericLabel is the reference")
    d = reg["dir"]
    disp = _files(reg, "displacement.nii.gz")
    img = apply_transforms(disp, d / "labels.nii.gz", d / "fixed.nii.gz", interp="label")
    got = np.asanyarray(img.dataobj)
    assert img.get_data_dtype() == np.int16 and set(np.unique(got)) == {0, 3, 6}
    fixed_a, labels_a = ants.image_read(str(d / "fixed.nii.gz")), ants.image_read(str(d / "labels.nii.gz"))
    want = ants.apply_transforms(fixed_a, labels_a, disp, interpolator="genericLabel").numpy()
    assert np.mean(got == want) >= 0.999
    nearest = np.asanyarray(
        apply_transforms(disp, d / "labels.nii.gz", d / "fixed.nii.gz", interp="nearest").dataobj
    )
    assert np.mean(got != nearest) > 0.001  # a vote, not nearest under another name


def test_inverse_takes_fixed_images_to_moving_and_round_trips(reg, tmp_path):
    """Coordinate images (world x, y, z of every fixed voxel) through inverse_displacement onto the moving
    grid, then through displacement back onto the fixed grid, return to within 0.5 mm inside the brain."""
    d = reg["dir"]
    f_aff = reg["f_aff"]
    world = voxel_to_world(f_aff, np.indices(reg["fixed"].shape).transpose(1, 2, 3, 0))
    back = []
    for c in range(3):
        coord = (world[..., c].astype(np.float32), f_aff)
        on_moving = apply_transforms(_files(reg, "inverse_displacement.nii.gz"), coord, d / "moving.nii.gz")
        np.testing.assert_allclose(on_moving.affine, reg["m_aff"], atol=1e-4)
        on_fixed = apply_transforms(_files(reg, "displacement.nii.gz"), on_moving, d / "fixed.nii.gz")
        back.append(np.asanyarray(on_fixed.dataobj))
    err = np.linalg.norm(np.stack(back, -1) - world, axis=-1)[reg["brain"]]
    assert err.mean() < 0.5, err.mean()

    # atlas-to-subject: fixed-space labels onto the moving grid, as ANTs' genericLabel puts them there
    atlas = np.digitize(reg["fixed"], [0.2, 0.5]).astype(np.uint8) * np.uint8(3)
    nib.save(nib.Nifti1Image(atlas, f_aff), tmp_path / "atlas.nii.gz")
    inv = _files(reg, "inverse_displacement.nii.gz")
    on_moving = apply_transforms(inv, tmp_path / "atlas.nii.gz", d / "moving.nii.gz", "label")
    got = np.asanyarray(on_moving.dataobj)
    assert on_moving.get_data_dtype() == np.uint8 and set(np.unique(got)) == {0, 3, 6}
    ants = pytest.importorskip("ants", reason="ANTsPy's genericLabel is the reference")
    moving_a, atlas_a = (
        ants.image_read(str(d / "moving.nii.gz")),
        ants.image_read(str(tmp_path / "atlas.nii.gz")),
    )
    want = ants.apply_transforms(moving_a, atlas_a, inv, interpolator="genericLabel").numpy()
    assert np.mean(got == want) >= 0.999


@pytest.mark.parametrize(
    ("names", "match"),
    [
        (("missing.nii.gz",), "missing path"),
        (("warped.nii.gz",), "list the transforms first"),
        (("voxel_flow.nii.gz",), "Learn2Reg"),
        (("qc.json",), "displacement field"),
        (("[displacement.nii.gz,1]",), "only for an affine"),
    ],
)
def test_bad_transforms_are_one_line_input_errors(reg, names, match):
    d = reg["dir"]
    if names == ("voxel_flow.nii.gz",) and not (reg["out"] / "voxel_flow.nii.gz").exists():
        res = nib.load(reg["out"] / "displacement.nii.gz")
        nib.save(nib.Nifti1Image(np.asanyarray(res.dataobj)[:, :, :, 0], res.affine), reg["out"] / names[0])
    specs = [f"[{reg['out'] / n[1:]}" if n.startswith("[") else str(reg["out"] / n) for n in names]
    with pytest.raises(InputError, match=match) as exc:
        apply_transforms(specs, d / "moving.nii.gz", d / "fixed.nii.gz")
    assert "\n" not in str(exc.value)


def test_field_on_the_wrong_reference_grid_is_refused(reg):
    """inverse_displacement.nii.gz lives on the moving grid: the fixed grid as reference is a mistake."""
    d = reg["dir"]
    with pytest.raises(InputError, match="pass as --reference the image the field was written on"):
        apply_transforms(_files(reg, "inverse_displacement.nii.gz"), d / "fixed.nii.gz", d / "fixed.nii.gz")


def test_lps_sign_convention_on_a_pure_shift(tmp_path):
    """A constant field of +5 mm along LPS x (= -5 mm along RAS x) samples the image 5 mm to the right-to-
    left side: the output at p is the input at p + (-5, 0, 0) RAS."""
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    x = np.arange(20, dtype=np.float32)
    img = np.broadcast_to(x[:, None, None], (20, 8, 8)).copy() + 1.0
    field = np.zeros((20, 8, 8, 1, 3), np.float32)
    field[..., 0] = 5.0  # LPS x
    f = nib.Nifti1Image(field, aff)
    f.header.set_intent("vector")
    nib.save(f, tmp_path / "shift.nii.gz")
    out = apply_transforms([tmp_path / "shift.nii.gz"], (img, aff), (img, aff))
    got = np.asanyarray(out.dataobj)
    np.testing.assert_allclose(got[10:, 4, 4], img[5:15, 4, 4], atol=1e-5)
    assert np.all(got[:4, 4, 4] == 0)  # sampled more than half a voxel outside: 0
