"""Non-NIfTI inputs (MGH/MGZ, NRRD/NHDR, MHA/MHD, a DICOM series folder): the same voxels and RAS affine as
the NIfTI of the same image, one-line InputErrors for bad files without large allocations, and the same
``emorph register`` result as the NIfTI inputs.

The other formats are written from the NIfTI by SimpleITK (its own NIfTI reader and LPS conventions) and
nibabel (MGH), so the reader here is checked against independent conversions, on an anisotropic, oblique
grid with an asymmetric pattern (a flip or axis swap would show)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from locale_guard import restoring_locale

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK reads NRRD/MetaImage/DICOM")

from emorph_deploy.data.nifti import load_label_map, load_volume  # noqa: E402
from emorph_deploy.data.orientation import reorient_to_ras  # noqa: E402
from emorph_deploy.errors import InputError  # noqa: E402

#: Voxel-to-world tolerance (mm): formats storing float64 text (NRRD/MetaImage) or float32 (MGH).
AFFINE_ATOL = 1e-4
#: DICOM stores positions and orientations as decimal strings of at most 16 characters.
DICOM_ATOL = 1e-3
#: Largest traced allocation (bytes) while refusing a bad file: far below what the headers declare.
REFUSE_ALLOC = 4 << 20


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()


def _oblique_affine(shape, spacing, angles, centre, flip_x: bool = False) -> np.ndarray:
    """A rotated grid of ``shape`` voxels at ``spacing`` mm whose field of view is centred on ``centre``."""
    aff = np.eye(4)
    aff[:3, :3] = _rotation(angles) @ np.diag(spacing)
    if flip_x:  # a left-handed grid (det < 0), as radiological-order NIfTI files have
        aff[:3, 0] *= -1
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return aff


def _pattern(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """int16: a smooth blob plus a ramp along every axis (asymmetric: flips and swaps change it)."""
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5)
    v = (v - v.min()) / (v.max() - v.min())
    i, j, k = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    return np.round(1000 * v + 300 * i + 150 * j + 60 * k - 200).astype(np.int16)


def _fmt(v: float) -> str:
    return f"{v:.10g}"  # a DICOM decimal string holds at most 16 characters


def write_dicom_series(image, folder: Path, uid: str) -> Path:
    """Write the SimpleITK 3D ``image`` as a DICOM series, one file per slice, with the geometry tags
    (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness, InstanceNumber)."""
    folder.mkdir(parents=True, exist_ok=True)
    with restoring_locale():  # GDCM's writer leaves the C locale at "C"
        _write_dicom_slices(image, folder, uid)
    return folder


def _write_dicom_slices(image, folder: Path, uid: str) -> None:
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    sx, sy, sz = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetSize()[2]):
        sl = image[:, :, z]
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{uid}.{z + 1}",
            "0020|000d": f"{uid}.0",
            "0020|000e": uid,
            "0020|0037": "\\".join(_fmt(v) for v in (*d[:, 0], *d[:, 1])),
            "0020|0032": "\\".join(_fmt(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))),
            "0028|0030": f"{_fmt(sy)}\\{_fmt(sx)}",  # row spacing (y), then column spacing (x)
            "0018|0050": _fmt(sz),
            "0020|0013": str(z + 1),
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


def write_all_formats(folder: Path, data: np.ndarray, affine: np.ndarray, uid: str) -> dict[str, Path]:
    """The image as NIfTI-1 and NIfTI-2, then converted: MGZ (nibabel), NRRD/NHDR/MHA/MHD and a DICOM series
    (SimpleITK reading the NIfTI)."""
    folder.mkdir(parents=True, exist_ok=True)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # MetaImage notes on NIfTI-only header fields
    paths = {"nii": folder / "img.nii.gz", "nii2": folder / "img2.nii", "mgz": folder / "img.mgz"}
    nib.save(nib.Nifti1Image(data, affine), str(paths["nii"]))
    nib.save(nib.Nifti2Image(data, affine), str(paths["nii2"]))
    nib.save(nib.MGHImage(data, affine), str(paths["mgz"]))
    image = sitk.ReadImage(str(paths["nii"]))
    for key, name, compress in (
        ("nrrd", "img.nrrd", True),
        ("nhdr", "img.nhdr", False),
        ("mha", "img.mha", True),
        ("mhd", "img.mhd", False),
    ):
        paths[key] = folder / name
        sitk.WriteImage(image, str(paths[key]), compress)
    paths["dicom"] = write_dicom_series(image, folder / "dicom", uid)
    return paths


FORMATS = ("nii2", "mgz", "nrrd", "nhdr", "mha", "mhd", "dicom")
FIXED_SHAPE = (20, 18, 14)
MOVING_SHAPE = (18, 20, 16)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Fixed and moving images (oblique, anisotropic, int16) in every format."""
    root = tmp_path_factory.mktemp("formats")
    fixed_aff = _oblique_affine(FIXED_SHAPE, (3.0, 2.5, 3.5), (20.0, -10.0, 35.0), (4.0, -6.0, 10.0))
    moving_aff = _oblique_affine(MOVING_SHAPE, (2.8, 3.2, 3.0), (-8.0, 12.0, -25.0), (1.0, -3.0, 12.0))
    return {
        "fixed": write_all_formats(
            root / "fixed", _pattern(FIXED_SHAPE, 0), fixed_aff, "1.2.826.0.1.3680043.9.7"
        ),
        "moving": write_all_formats(
            root / "moving", _pattern(MOVING_SHAPE, 1), moving_aff, "1.2.826.0.1.3680043.9.8"
        ),
        "root": root,
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_voxels_and_affine_as_the_nifti(images, fmt: str) -> None:
    for role in ("fixed", "moving"):
        ref = load_volume(images[role]["nii"])
        img = load_volume(images[role][fmt], name=f"{role} {fmt}")
        assert isinstance(img, nib.Nifti1Image) and img.shape == ref.shape
        np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
        atol = DICOM_ATOL if fmt == "dicom" else AFFINE_ATOL
        np.testing.assert_allclose(img.affine, ref.affine, rtol=0, atol=atol)
        assert np.asanyarray(img.dataobj).dtype == np.float32
        codes = (int(img.header["sform_code"]), int(img.header["qform_code"]))
        if fmt == "nii2":  # NIfTI keeps the meaning of its world (nibabel writes sform "aligned", 2)
            assert codes == (int(ref.header["sform_code"]), int(ref.header["qform_code"]))
        else:  # a fresh NIfTI header for outputs: world = scanner coordinates, units mm
            assert codes == (1, 1) and img.header.get_xyzt_units()[0] == "mm"


@pytest.mark.parametrize("fmt", ["nrrd", "dicom"])
def test_left_handed_grid_is_the_same_world_image(tmp_path, fmt: str) -> None:
    """A left-handed (x-flipped) grid: DICOM slices are stacked along row x column, so the reader may return
    the slices in the other order; after RAS reorientation voxels and affine equal the NIfTI's."""
    aff = _oblique_affine((12, 10, 8), (2.0, 2.5, 3.0), (5.0, 15.0, -20.0), (10.0, -5.0, 3.0), flip_x=True)
    paths = write_all_formats(tmp_path, _pattern((12, 10, 8), 3), aff, "1.2.826.0.1.3680043.9.9")
    ref = reorient_to_ras(load_volume(paths["nii"]))
    img = reorient_to_ras(load_volume(paths[fmt]))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.affine, ref.affine, rtol=0, atol=DICOM_ATOL)


@pytest.mark.parametrize("fmt", ["mgz", "nrrd", "dicom"])
def test_label_maps_keep_their_values(images, fmt: str) -> None:
    labels = load_label_map(images["fixed"][fmt])
    ref = load_label_map(images["fixed"]["nii"])
    assert np.asanyarray(labels.dataobj).dtype == np.int16 and labels.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(labels.dataobj), np.asanyarray(ref.dataobj))


def test_datasets_list_other_formats_and_dicom_folders(images, tmp_path) -> None:
    """``train``/``evaluate`` data: a folder picks up MGZ/NRRD/MHA files; a CSV may name a DICOM folder."""
    from emorph_deploy.data.datasets import discover

    for key in ("mgz", "nrrd", "mha"):
        (tmp_path / images["fixed"][key].name).write_bytes(images["fixed"][key].read_bytes())
    subjects, _ = discover(tmp_path)
    assert sorted(s.image.name for s in subjects) == ["img.mgz", "img.mha", "img.nrrd"]
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"fixed,moving\n{images['fixed']['dicom']},{images['moving']['mgz']}\n")
    _, pairs = discover(csv)
    assert pairs[0].fixed.image == images["fixed"]["dicom"]
    np.testing.assert_array_equal(
        np.asanyarray(load_volume(pairs[0].fixed.image).dataobj),
        np.asanyarray(load_volume(images["fixed"]["nii"]).dataobj),
    )


# ------------------------------------------------------------------------------------------------ bad inputs
def _refused(path: Path, *needles: str) -> str:
    """load_volume(path) raises a one-line InputError containing ``needles``, within REFUSE_ALLOC."""
    tracemalloc.start()
    try:
        with pytest.raises(InputError) as info:
            load_volume(path, name="img")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert "\n" not in msg and "fix:" in msg, msg
    for needle in needles:
        assert needle in msg, msg
    assert peak <= REFUSE_ALLOC, f"refusing {path.name} allocated {peak} bytes"
    return msg


def _two_series(images, root: Path) -> Path:
    folder = root / "two_series"
    if not folder.exists():
        folder.mkdir()
        for role in ("fixed", "moving"):
            for f in images[role]["dicom"].iterdir():
                (folder / f"{role}_{f.name}").write_bytes(f.read_bytes())
    return folder


def test_a_folder_with_two_series_names_them(images) -> None:
    folder = _two_series(images, images["root"])
    msg = _refused(
        folder, "2 series", "1.2.826.0.1.3680043.9.7 (14 files)", "1.2.826.0.1.3680043.9.8 (16 files)"
    )
    assert "folder per series" in msg


def test_itk_messages_on_stderr_become_the_reason(tmp_path, capfd) -> None:
    """ITK's MetaImage layer prints its parse errors to std::cerr (file descriptor 2), around the CLI's
    one-line error: they are captured and the cause is named in the InputError."""
    p = tmp_path / "no_type.mha"
    p.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementDataFile = LOCAL\n" + bytes(8))
    capfd.readouterr()
    msg = _refused(p, "corrupt")
    assert "ElementType required" in msg
    assert capfd.readouterr().err == ""


def test_a_series_with_a_missing_slice_is_refused(images, tmp_path) -> None:
    """ITK would stack the slices at the first gap's spacing: a silently distorted volume."""
    files = sorted(images["fixed"]["dicom"].iterdir())
    for f in files[:5] + files[6:]:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    _refused(tmp_path, "evenly spaced", "missing or duplicate slices")


def _huge_nrrd(p: Path) -> None:
    p.write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4000 3000 2000\nendian: little\nencoding: gzip\n\n"
        + b"\x1f\x8b" * 40
    )


def _huge_mha(p: Path) -> None:
    p.write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 1000 1000 1000\nElementType = MET_FLOAT\n"
        b"ElementDataFile = LOCAL\n" + bytes(4096)
    )


def _mha_ndims(p: Path, ndims: bytes) -> None:
    p.write_bytes(
        b"ObjectType = Image\nNDims = " + ndims + b"\nDimSize = 2 4 4\nElementType = MET_FLOAT\n"
        b"ElementDataFile = LOCAL\n" + bytes(128)
    )


def _truncated(src: str, keep: float):
    def make(p: Path, images) -> None:
        raw = images["fixed"][src].read_bytes()
        p.write_bytes(raw[: int(len(raw) * keep)])

    return make


BAD = {
    "empty-folder": ("", lambda p, _: p.mkdir(), ("empty folder",)),
    "non-dicom-folder": (
        "",
        lambda p, _: (
            p.mkdir(),
            (p / "notes.txt").write_text("hello"),
            (p / "x.dcm").write_bytes(b"\0" * 300),
        ),
        ("2 files none of which is DICOM",),
    ),
    "truncated-mgz": (".mgz", _truncated("mgz", 0.5), ("corrupt or truncated",)),
    "truncated-mgh-header": (".mgh", lambda p, _: p.write_bytes(b"\0\0\0\1" + bytes(100)), ("MGH header",)),
    "huge-mgh": (
        ".mgh",
        lambda p, _: p.write_bytes(np.array([1, 600, 600, 600, 1, 3], ">i4").tobytes() + bytes(400)),
        ("truncated file", "600"),
    ),
    "huge-nrrd": (".nrrd", lambda p, _: _huge_nrrd(p), ("at most 4 GiB", "4000")),
    "huge-mha": (".mha", lambda p, _: _huge_mha(p), ("truncated file",)),
    # ITK's MetaIO hangs on a negative NDims and corrupts its heap on a large one: refused before it reads
    "mha-negative-ndims": (".mha", lambda p, _: _mha_ndims(p, b"-5"), ("NDims between 1 and 5", "'-5'")),
    "mha-large-ndims": (".mha", lambda p, _: _mha_ndims(p, b"100"), ("NDims between 1 and 5",)),
    "truncated-nrrd": (".nhdr", None, ("truncated file",)),
    "single-dicom-file": (".dcm", None, ("single DICOM file",)),
    "bzip2-nrrd": (
        ".nrrd",
        lambda p, _: p.write_bytes(
            b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: bz2\n\nBZh"
        ),
        ("encoding 'bz2'",),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_are_one_line_input_errors(images, tmp_path, case: str) -> None:
    suffix, make, needles = BAD[case]
    p = tmp_path / f"bad{suffix}"
    if case == "truncated-nrrd":  # a detached header whose data file lost its second half
        p.write_bytes(images["fixed"]["nhdr"].read_bytes())
        raw_name = next(f for f in images["fixed"]["nhdr"].parent.iterdir() if f.name.startswith("img.raw"))
        raw = raw_name.read_bytes()
        (tmp_path / raw_name.name).write_bytes(raw[: len(raw) // 2])
    elif case == "single-dicom-file":
        p.write_bytes(next(images["fixed"]["dicom"].iterdir()).read_bytes())
    else:
        make(p, images)
    _refused(p, *needles)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_em):
    pytest.importorskip("torch", reason="torch is needed for the model")
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("formats_ckpt")
    grid = (16, 16, 16)
    save_checkpoint(
        tiny_em(grid), d / "tiny", preprocessing=Preprocessing(grid_shape=grid, spacing_mm=(4.0,) * 3)
    )
    return d / "tiny.json"


@pytest.mark.slow
def test_register_gives_the_nifti_result_for_every_format(images, ckpt, tmp_path, cli) -> None:
    """``emorph register`` on MGZ/NRRD/MHA/DICOM inputs, one pair at a time and in a pairs CSV, writes the
    same warped.nii.gz, on the same grid, as on the NIfTI inputs (the moving image is resampled through
    both images' world geometry, so a wrong orientation shows)."""
    # no refinement and no affine fit: their optimisations would amplify the readers' last-bit differences
    # (the two patterns are unrelated, so the affine optimum is ill-posed), and the affine's multi-start
    # could even undo a wrong orientation that this test must see
    options = ["--model", ckpt, "--no-qc-png", "--refine", "0", "--no-affine"]
    results = {}
    for fixed_fmt, moving_fmt in (("nii", "nii"), ("mgz", "nrrd")):
        out = tmp_path / f"{fixed_fmt}_{moving_fmt}"
        res, err = cli(
            *["register", images["fixed"][fixed_fmt], images["moving"][moving_fmt], *options, "--out", out]
        )
        assert res.exit_code == 0, err + res.stdout
        results[(fixed_fmt, moving_fmt)] = nib.load(out / "warped.nii.gz")
    batch = (("dicom", "mha"), ("nhdr", "dicom"), ("mhd", "mgz"))
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "fixed,moving,id\n"
        + "".join(f"{images['fixed'][f]},{images['moving'][m]},{f}_{m}\n" for f, m in batch)
    )
    res, err = cli("register", "--pairs", csv, *options, "--out", tmp_path / "batch")
    assert res.exit_code == 0, err + res.stdout
    results.update({(f, m): nib.load(tmp_path / "batch" / f"{f}_{m}" / "warped.nii.gz") for f, m in batch})
    ref = results.pop(("nii", "nii"))
    ref_data = np.asanyarray(ref.dataobj)
    scale = float(np.abs(ref_data).max())
    assert scale > 0
    for key, img in results.items():
        atol = DICOM_ATOL if "dicom" in key else AFFINE_ATOL
        np.testing.assert_allclose(img.affine, ref.affine, rtol=0, atol=atol, err_msg=str(key))
        diff = float(np.abs(np.asanyarray(img.dataobj) - ref_data).max())
        assert diff <= 1e-4 * scale, f"{key}: warped differs by {diff} ({diff / scale:.2e} relative)"
        assert int(img.header["sform_code"]) == 1  # a fresh NIfTI header: scanner coordinates


def test_cli_two_series_folder_is_exit_2_naming_both(images, ckpt, tmp_path, cli) -> None:
    folder = _two_series(images, images["root"])
    res, err = cli("register", folder, images["moving"]["nii"], "--model", ckpt, "--out", tmp_path / "o")
    assert res.exit_code == 2, err + res.stdout
    assert len(err.strip().splitlines()) == 1
    assert "1.2.826.0.1.3680043.9.7" in err and "1.2.826.0.1.3680043.9.8" in err
    assert not (tmp_path / "o").exists()
