"""Validation of NIfTI inputs: every bad input raises InputError with a one-line, useful message."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from emorph_deploy.data import (
    as_image,
    as_label_image,
    label_dtype,
    load_label_map,
    load_volume,
    save_nifti_atomic,
)
from emorph_deploy.errors import InputError, OutputExistsError

RNG = np.random.default_rng(0)
VOL = RNG.random((8, 9, 10)).astype(np.float32)


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def _singular(path: Path) -> Path:
    img = nib.Nifti1Image(VOL, None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    img.header["qform_code"] = 0
    nib.save(img, str(path))
    return path


def _make_bad(tmp: Path, kind: str) -> Path:
    ok = _save(tmp / "ok.nii.gz", VOL)
    raw = ok.read_bytes()
    if kind == "missing":
        return tmp / "nope.nii.gz"
    if kind == "directory":
        return tmp
    if kind == "not_nifti":
        (tmp / "notes.nii").write_text("hello world " * 40)
        return tmp / "notes.nii"
    if kind == "not_gzip":
        (tmp / "plain.nii.gz").write_text("hello")
        return tmp / "plain.nii.gz"
    if kind == "corrupt_gzip":
        bad = bytearray(raw)
        mid = len(bad) // 2
        bad[mid : mid + 40] = b"x" * 40
        (tmp / "corrupt.nii.gz").write_bytes(bytes(bad))
        return tmp / "corrupt.nii.gz"
    if kind == "truncated_gzip":
        (tmp / "trunc.nii.gz").write_bytes(raw[: len(raw) // 2])
        return tmp / "trunc.nii.gz"
    if kind == "truncated_nii":
        p = _save(tmp / "full.nii", VOL)
        (tmp / "trunc.nii").write_bytes(p.read_bytes()[:1000])
        return tmp / "trunc.nii"
    if kind == "4d_multi":
        return _save(tmp / "series.nii.gz", RNG.random((8, 9, 10, 3)).astype(np.float32))
    if kind == "2d":
        return _save(tmp / "slice.nii.gz", VOL[:, :, 0])
    if kind == "single_slice":
        return _save(tmp / "thin.nii.gz", VOL[:, :, :1])
    if kind == "nan":
        v = VOL.copy()
        v[1, 2, 3] = np.nan
        return _save(tmp / "nan.nii.gz", v)
    if kind == "inf":
        v = VOL.copy()
        v[1, 2, 3] = np.inf
        return _save(tmp / "inf.nii.gz", v)
    if kind == "zero":
        return _save(tmp / "zero.nii.gz", np.zeros_like(VOL))
    if kind == "constant":
        return _save(tmp / "const.nii.gz", np.full_like(VOL, 7.0))
    if kind == "singular":
        return _singular(tmp / "sing.nii.gz")
    if kind in ("huge_voxels", "tiny_voxels", "far_origin"):
        aff = {
            "huge_voxels": np.diag([1e30, 1e30, 1e30, 1.0]),  # invertible and finite in float32, absurd
            "tiny_voxels": np.diag([1e-7, 1.0, 1.0, 1.0]),
            "far_origin": np.array([[1.0, 0, 0, 5e9], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
        }[kind]
        return _save(tmp / f"{kind}.nii.gz", VOL, aff)
    raise AssertionError(kind)


BAD_CASES = {
    "missing": "missing",
    "directory": "none of which is DICOM",  # a folder is read as a DICOM series
    "not_nifti": "NIfTI",
    "not_gzip": "NIfTI",
    "corrupt_gzip": "corrupt",
    "truncated_gzip": "truncated",
    "truncated_nii": "truncated",
    "4d_multi": "3 volumes",
    "2d": "3D",
    "single_slice": "at least 2 voxels",
    "nan": "NaN/Inf",
    "inf": "NaN/Inf",
    "zero": "all-zero",
    "constant": "constant",
    "singular": "singular",
    "huge_voxels": "voxel sizes between",
    "tiny_voxels": "voxel sizes between",
    "far_origin": "of the world origin",
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_volume_raises_input_error(tmp_path: Path, kind: str) -> None:
    path = _make_bad(tmp_path, kind)
    with pytest.raises(InputError) as info:
        load_volume(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert BAD_CASES[kind] in msg, msg
    assert "expected" in msg and "fix:" in msg, msg


def test_4d_single_volume_is_squeezed(tmp_path: Path) -> None:
    p = _save(tmp_path / "one.nii.gz", VOL[..., None])
    img = load_volume(p)
    assert img.shape == VOL.shape
    np.testing.assert_allclose(np.asanyarray(img.dataobj), VOL, rtol=0, atol=0)
    assert img.get_data_dtype() == np.float32


def test_load_keeps_affine_and_scaling(tmp_path: Path) -> None:
    aff = np.array([[0, 0, -1.5, 10], [1.2, 0, 0, -3], [0, 0.8, 0, 4], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image((VOL * 1000).astype(np.int16), aff)
    img.header.set_slope_inter(0.5, 2.0)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    out = load_volume(tmp_path / "s.nii.gz")
    np.testing.assert_allclose(out.affine, aff, atol=1e-5)
    np.testing.assert_allclose(
        np.asanyarray(out.dataobj), (VOL * 1000).astype(np.int16) * 0.5 + 2.0, atol=1e-4
    )


def test_label_map_float_non_integer_rejected(tmp_path: Path) -> None:
    p = _save(tmp_path / "prob.nii.gz", VOL * 3)
    with pytest.raises(InputError, match="integer label values"):
        load_label_map(p)


def test_label_map_values_and_dtype_preserved(tmp_path: Path) -> None:
    lab = RNG.choice(np.array([0, 2, 41, 1000], dtype=np.int16), size=VOL.shape)
    p = _save(tmp_path / "lab.nii.gz", lab)
    img = load_label_map(p)
    assert np.array_equal(np.asanyarray(img.dataobj), lab)
    assert label_dtype(img) == np.int16
    # float32 on disk with integer values: int data in memory, float32 recorded for writing back
    pf = _save(tmp_path / "labf.nii.gz", lab.astype(np.float32))
    imgf = load_label_map(pf)
    assert np.asanyarray(imgf.dataobj).dtype.kind == "i"
    assert np.array_equal(np.asanyarray(imgf.dataobj), lab)
    assert label_dtype(imgf) == np.float32


def test_label_map_all_zero_rejected(tmp_path: Path) -> None:
    p = _save(tmp_path / "empty.nii.gz", np.zeros(VOL.shape, np.uint8))
    with pytest.raises(InputError, match="all-zero label map"):
        load_label_map(p)


def test_as_image_accepts_pairs_and_images() -> None:
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    a = as_image((VOL, aff))
    b = as_image(nib.Nifti1Image(VOL, aff))
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    np.testing.assert_allclose(a.affine, aff, atol=0)
    torch = pytest.importorskip("torch", reason="torch tensors as input need torch")
    c = as_image((torch.from_numpy(VOL), aff))
    np.testing.assert_array_equal(np.asanyarray(c.dataobj), VOL)
    with pytest.raises(InputError, match="singular"):
        as_image((VOL, np.diag([1.0, 1.0, 0.0, 1.0])))
    with pytest.raises(InputError, match="4x4"):
        as_image((VOL, np.eye(3)))
    with pytest.raises(InputError, match="NaN/Inf"):
        as_image((np.where(VOL > 0.5, np.nan, VOL), aff))
    with pytest.raises(InputError, match="finite affine"):
        as_image((VOL, np.full((4, 4), np.nan)))
    with pytest.raises(InputError, match="path, a nibabel image"):
        as_image(42)
    with pytest.raises(InputError, match="integer label values"):
        as_label_image((VOL, aff))


def test_save_nifti_atomic(tmp_path: Path) -> None:
    img = as_image((VOL, np.eye(4)))
    out = tmp_path / "sub" / "out.nii.gz"
    save_nifti_atomic(img, out)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), VOL)
    with pytest.raises(OutputExistsError):
        save_nifti_atomic(img, out)
    save_nifti_atomic(as_image((VOL * 2, np.eye(4))), out, force=True)
    np.testing.assert_allclose(np.asanyarray(nib.load(str(out)).dataobj), VOL * 2, atol=1e-6)
    assert sorted(os.listdir(out.parent)) == ["out.nii.gz"]  # no temp files left


@pytest.mark.parametrize(
    "kind", ["float32", "int16_scaled", "uint8", "float64_big_endian", "nifti2", "multi_member_gzip"]
)
def test_fast_gz_reader_matches_nibabel(tmp_path: Path, monkeypatch, kind: str) -> None:
    """``.nii.gz`` files are decoded in one call (not through nib.load) with nib.load's values, affine and
    header dtype; a file written by our parallel gzip writer (several gzip members) reads back whole."""
    from emorph_deploy.registration.niftiio import save_nifti_gz

    aff = np.array([[0, 0, -1.5, 10], [1.2, 0, 0, -3], [0, 0.8, 0, 4], [0, 0, 0, 1.0]])
    data: np.ndarray = (VOL * 1000).astype(np.int16)
    p = tmp_path / f"{kind}.nii.gz"
    if kind == "float32":
        img = nib.Nifti1Image(VOL, aff)
    elif kind == "int16_scaled":
        img = nib.Nifti1Image(data, aff)
        img.header.set_slope_inter(0.5, 2.0)
    elif kind == "uint8":
        img = nib.Nifti1Image((VOL * 200).astype(np.uint8), aff)
    elif kind == "float64_big_endian":
        img = nib.Nifti1Image(VOL.astype(">f8"), aff)
    elif kind == "nifti2":
        img = nib.Nifti2Image(VOL, aff)
    else:
        img = nib.Nifti1Image(RNG.random((64, 64, 40)).astype(np.float32), aff)  # ~640 kB raw
    if kind == "multi_member_gzip":
        monkeypatch.setattr("emorph_deploy.registration.niftiio._CHUNK", 100_000)
        save_nifti_gz(img, p)
    else:
        nib.save(img, str(p))
    ref = nib.load(str(p))
    ref_data = np.asanyarray(ref.dataobj)
    proxy_img = nib.load(str(p))  # what API users pass: an image whose data is still on disk

    def no_nibabel_read(*a, **k):
        raise AssertionError("the fast reader should not fall back to nibabel's gzip reader")

    import gzip

    monkeypatch.setattr(nib, "load", no_nibabel_read)
    monkeypatch.setattr(gzip.GzipFile, "__init__", no_nibabel_read)  # nibabel's streamed .gz reader
    for out in (load_volume(p), as_image(proxy_img)):
        np.testing.assert_allclose(out.affine, ref.affine, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asanyarray(out.dataobj), ref_data.astype(np.float32), rtol=0, atol=0)
    if kind == "uint8":
        lab = load_label_map(p)
        assert lab.header.get_data_dtype() == np.uint8
        assert np.array_equal(np.asanyarray(lab.dataobj), ref_data)


def test_big_gz_volumes_stream_through_nibabel(tmp_path: Path, monkeypatch) -> None:
    """Above FAST_READ_MAX_BYTES of voxel data the one-call decoder (~3x the data in memory) steps aside."""
    import emorph_deploy.data.nifti as nifti_mod

    p = _save(tmp_path / "big.nii.gz", VOL)
    monkeypatch.setattr(nifti_mod, "FAST_READ_MAX_BYTES", VOL.nbytes - 1)
    calls: list[str] = []
    real_load = nib.load

    def spy(path, *a, **k):
        calls.append(str(path))
        return real_load(path, *a, **k)

    monkeypatch.setattr(nib, "load", spy)
    out = load_volume(p)
    assert calls == [str(p)]
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), VOL)
    monkeypatch.setattr(nifti_mod, "FAST_READ_MAX_BYTES", VOL.nbytes)
    calls.clear()
    load_volume(p)
    assert calls == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_loaded_volumes_keep_the_on_disk_order(tmp_path: Path, suffix: str) -> None:
    """Loading does not transpose: intensities and labels come back in NIfTI's Fortran order (one
    contiguous block), with the same values; float label maps are rounded to int32 in that order."""
    rng = np.random.default_rng(7)
    data = rng.random((9, 8, 7)).astype(np.float32) + 0.1
    labels = np.round(rng.random((9, 8, 7)) * 4).astype(np.float32)
    labels[0, 0, 0] = 2.0004  # within the 1e-3 tolerance of an integer
    p_img, p_lab = tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(p_img))
    nib.save(nib.Nifti1Image(labels, np.eye(4)), str(p_lab))
    img = np.asanyarray(load_volume(p_img).dataobj)
    lab = np.asanyarray(load_label_map(p_lab).dataobj)
    assert img.flags.f_contiguous and lab.flags.f_contiguous
    np.testing.assert_array_equal(img, data)
    assert lab.dtype == np.int32
    np.testing.assert_array_equal(lab, np.round(labels).astype(np.int32))
    strided = as_image((data[:, ::2], np.eye(4)))  # a non-contiguous array becomes one block
    assert np.asanyarray(strided.dataobj).flags.c_contiguous
