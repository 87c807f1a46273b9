"""Manifests store paths relative to themselves: a project folder (checkpoint + export) moved elsewhere still
checks and registers; older manifests with absolute paths are still read."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the moved export is run with ONNX Runtime")


GRID = (16, 16, 16)


@pytest.fixture(scope="module")
def moved(tmp_path_factory, tiny_em, cli):
    """``project/{ckpt,export}`` written by the CLI, then the whole folder moved (the original is gone)."""
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("relative")
    project = root / "project"
    save_checkpoint(
        tiny_em(GRID),
        project / "ckpt" / "tiny",
        preprocessing=Preprocessing(grid_shape=GRID, spacing_mm=(4.0,) * 3),
    )
    res, err = cli("export", project / "ckpt" / "tiny.json", "--out", project / "export", "--name", "tiny")
    assert res.exit_code == 0, err
    raw = json.loads((project / "export" / "tiny.json").read_text())
    assert raw["source_checkpoint"] == "../ckpt/tiny.json"
    target = root / "elsewhere" / "project"
    shutil.move(project, target)
    assert not project.exists()
    return target


def _pair(folder):
    from scipy.ndimage import gaussian_filter

    paths = []
    for seed, shape in ((0, (20, 22, 18)), (1, (18, 20, 22))):
        v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
        paths.append(folder / f"img{seed}.nii.gz")
        nib.save(nib.Nifti1Image(v, np.diag([3.0, 3.0, 3.0, 1.0])), paths[-1])
    return paths


def test_moved_export_checks_and_registers(moved, cli, tmp_path):
    onnx = moved / "export" / "tiny.onnx"
    res, err = cli("check", onnx, "--synthetic", "1")  # the reference: the manifest's relative path
    assert res.exit_code == 0, err
    fixed, moving = _pair(tmp_path)
    res, err = cli("register", fixed, moving, "--onnx", onnx, "--out", tmp_path / "out", "--no-qc-png")
    assert res.exit_code == 0, err
    assert (tmp_path / "out" / "warped.nii.gz").is_file()


def test_old_absolute_manifest_is_still_read(moved, cli, tmp_path):
    from emorph_deploy.export import read_manifest

    copy = tmp_path / "copy"
    shutil.copytree(moved / "export", copy)
    raw = json.loads((copy / "tiny.json").read_text())
    raw["source_checkpoint"] = str(moved / "ckpt" / "tiny.json")  # as older versions wrote it
    (copy / "tiny.json").write_text(json.dumps(raw))
    assert read_manifest(copy / "tiny.json")["source_checkpoint"] == raw["source_checkpoint"]
    res, err = cli("check", copy / "tiny.onnx", "--synthetic", "1")
    assert res.exit_code == 0, err
    # relative to the manifest, not to the working directory: the copy's relative path leads nowhere
    raw["source_checkpoint"] = "../ckpt/tiny.json"
    (copy / "tiny.json").write_text(json.dumps(raw))
    res, err = cli("check", copy / "tiny.onnx", "--synthetic", "1")
    assert res.exit_code == 2 and str(tmp_path / "ckpt" / "tiny.json") in err


def test_manifest_paths_follow_the_folder_or_the_files(tmp_path):
    """Relative to the manifest when its folder moved with the files; from where it was written when the
    manifest alone moved (the files stayed)."""
    from emorph_deploy.fileio import read_manifest_json, write_manifest_atomic

    keys = (("data",), ("nested", "file"), ("absent",))
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "a" / "sub" / "x.txt").write_text("x")
    (tmp_path / "y.txt").write_text("y")
    meta = {
        "format": "t/1",
        "data": str(tmp_path / "a" / "sub" / "x.txt"),
        "nested": {"file": tmp_path / "y.txt"},
    }
    write_manifest_atomic(tmp_path / "a" / "m.json", meta, keys)
    raw = json.loads((tmp_path / "a" / "m.json").read_text())
    assert raw["data"] == "sub/x.txt" and raw["nested"]["file"] == "../y.txt" and "absent" not in raw
    assert isinstance(meta["nested"]["file"], type(tmp_path))  # the caller's dict is unchanged

    def read(path):
        return read_manifest_json(path, kind="t", fmt="t/1", required=(), fix="-", path_keys=keys)

    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "m.json", tmp_path / "b" / "m.json")  # the manifest alone
    assert read(tmp_path / "b" / "m.json")["data"] == str(tmp_path / "a" / "sub" / "x.txt")
    (tmp_path / "c").mkdir()
    shutil.move(tmp_path / "a", tmp_path / "c" / "a")  # the folder with its files
    shutil.move(tmp_path / "y.txt", tmp_path / "c" / "y.txt")
    got = read(tmp_path / "c" / "a" / "m.json")
    assert got["data"] == str(tmp_path / "c" / "a" / "sub" / "x.txt")
    assert got["nested"]["file"] == str(tmp_path / "c" / "y.txt")
