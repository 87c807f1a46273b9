"""Calibration reads its source ONNX once; ``emorph check`` and calibration share the pair preprocessing."""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np


def _nifti(path, shape=(10, 9, 8), seed=0, labels=False):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    data = (
        rng.integers(0, 4, shape).astype(np.int16) if labels else rng.random(shape).astype(np.float32) * 100
    )
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.0, 1.1, 1.0])), str(path))
    return path


def test_source_onnx_is_read_once(tiny_onnx, tmp_path, monkeypatch):
    """Load, quantize and the manifest's source hash all use one read of the source graph (the quantizer
    only sees a temporary copy)."""
    from emorph_deploy.calibration import calibrate
    from emorph_deploy.fileio import sha256_file

    src = tmp_path / "tiny.onnx"
    shutil.copy(tiny_onnx, src)
    shutil.copy(tiny_onnx.with_suffix(".json"), src.with_suffix(".json"))
    target = os.path.realpath(src)
    real_open = builtins.open
    opened: list[str] = []

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)  # pathlib.Path.open
    res = calibrate(src, synthetic=2, synthetic_kind="synth", out_dir=tmp_path / "cal", progress=False)
    monkeypatch.undo()
    assert len(opened) == 1, opened
    meta = json.loads(res.manifest_path.read_text())
    assert meta["derived_from"]["sha256"] == res.report["source_sha256"] == sha256_file(src)


def test_quantize_qdq_from_model_equals_from_path(tiny_onnx):
    from emorph_deploy.calibration import CalibrationSet, QuantizeOptions, make_reader, quantize_qdq
    from emorph_deploy.export.onnx_io import load_onnx

    model = load_onnx(Path(tiny_onnx))
    before = model.SerializeToString()
    calib = CalibrationSet.synthetic(2, (8, 8, 8), kind="synth", progress=False)
    q_path, r_path = quantize_qdq(tiny_onnx, make_reader(calib, progress=False), QuantizeOptions())
    q_model, r_model = quantize_qdq(model, make_reader(calib, progress=False), QuantizeOptions())
    assert q_model.SerializeToString() == q_path.SerializeToString() and r_model == r_path
    assert model.SerializeToString() == before  # the caller's model is not modified (nodes not renamed)


def test_check_and_calibration_preprocess_pairs_identically(tiny_onnx, tmp_path):
    from emorph_deploy.calibration import CalibrationSet
    from emorph_deploy.check import csv_pairs
    from emorph_deploy.data.preprocess import Preprocessing

    for i in range(2):
        _nifti(tmp_path / f"m{i}.nii.gz", seed=i)
        _nifti(tmp_path / f"f{i}.nii.gz", shape=(9, 11, 7), seed=10 + i)
        _nifti(tmp_path / f"ml{i}.nii.gz", seed=20 + i, labels=True)
        _nifti(tmp_path / f"fl{i}.nii.gz", shape=(9, 11, 7), seed=30 + i, labels=True)
    (tmp_path / "check.csv").write_text(
        "moving,fixed,moving_label,fixed_label\n"
        + "".join(f"m{i}.nii.gz,f{i}.nii.gz,ml{i}.nii.gz,fl{i}.nii.gz\n" for i in range(2))
    )
    (tmp_path / "calib.csv").write_text("".join(f"m{i}.nii.gz,f{i}.nii.gz\n" for i in range(2)))
    pre_dict = json.loads(tiny_onnx.with_suffix(".json").read_text())["preprocessing"]
    grid = tuple(pre_dict["grid_shape"])
    checked = list(csv_pairs(tmp_path / "check.csv", pre_dict, grid))
    calib = CalibrationSet.from_csv(
        tmp_path / "calib.csv", Preprocessing.from_dict(pre_dict), grid, progress=False
    )
    assert len(checked) == len(calib) == 2
    for pair, feed in zip(checked, calib.feeds, strict=True):
        assert pair.moving.shape == pair.fixed.shape == grid
        np.testing.assert_array_equal(feed["moving"][0, 0], pair.moving)
        np.testing.assert_array_equal(feed["fixed"][0, 0], pair.fixed)
        assert pair.moving_labels is not None and pair.moving_labels.dtype == np.int32
        assert pair.fixed_labels is not None and pair.fixed_labels.shape == grid
