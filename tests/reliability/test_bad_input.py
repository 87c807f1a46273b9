"""Bad input ends cleanly: one line, the documented exit code, nothing allocated for sizes the data cannot
hold, nothing left on disk (docs/reliability.md lists each class and its test here)."""

from __future__ import annotations

import errno
import gzip
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from emorph_deploy.cli.app import app
from emorph_deploy.data.nifti import load_volume
from emorph_deploy.errors import InputError

GRID = (16, 16, 16)


def _one_line_error(res, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.output, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def _header_only(shape: tuple[int, ...], dtype=np.uint8) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    return hdr.binaryblock + b"\0" * 4


# ------------------------------------------------------------------------------------------------ headers
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_declaring_more_than_the_file_holds_allocates_nothing(tmp_path: Path, suffix: str) -> None:
    raw = _header_only((1600, 1600, 1600))  # 4 GB declared in a few bytes
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="truncated") as info:
            load_volume(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert "\n" not in str(info.value)


def test_header_beyond_the_size_limit_is_refused(tmp_path: Path, monkeypatch) -> None:
    import emorph_deploy.data.nifti as nifti

    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    monkeypatch.setattr(nifti, "MAX_VOXEL_BYTES", data.nbytes - 1)
    with pytest.raises(InputError, match="at most"):
        load_volume(path)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_zero_pixdim_without_sform_is_refused(tmp_path: Path, suffix: str) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((6, 6, 6))
    hdr.set_data_dtype(np.float32)
    hdr["pixdim"][1:4] = [0.0, 1.0, 0.0]
    hdr["qform_code"], hdr["sform_code"], hdr["vox_offset"] = 0, 0, 352
    raw = hdr.binaryblock + b"\0" * 4 + np.random.default_rng(0).random(216).astype(np.float32).tobytes()
    path = tmp_path / f"pix0{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else raw)
    with pytest.raises(InputError, match=r"pixdim.*0 on axis 0, 0 on axis 2"):
        load_volume(path)


def test_cli_header_only_inputs_exit_2_quickly(tmp_path: Path, runner) -> None:
    path = tmp_path / "big.nii.gz"
    path.write_bytes(gzip.compress(_header_only((1600, 1600, 1600))))
    res = runner.invoke(app, ["register", str(path), str(path), "--out", str(tmp_path / "o")])
    assert "truncated" in _one_line_error(res, 2)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--threads", "100000"], "--threads: expected 1.."),
        (["--threads", "20000"], "--threads: expected 1.."),
        (["--threads", "0"], "--threads: expected 1.."),
        (["--refine", "1000000000"], "refine: expected 0..10000"),
    ],
)
def test_register_option_bounds(tmp_path: Path, runner, blob, args: list[str], expected: str) -> None:
    fixed = tmp_path / "f.nii.gz"
    nib.save(nib.Nifti1Image(blob((8, 8, 8), 0), np.eye(4)), str(fixed))
    res = runner.invoke(app, ["register", str(fixed), str(fixed), "--out", str(tmp_path / "o"), *args])
    assert expected in _one_line_error(res, 2)
    assert not (tmp_path / "o").exists()


def test_evaluate_max_pairs_zero_is_refused(tmp_path: Path) -> None:
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.train.evaluate import build_eval_pairs

    pre = Preprocessing(grid_shape=(8, 8, 8))
    with pytest.raises(InputError, match="--max-pairs: expected a number of pairs >= 1, got 0"):
        build_eval_pairs(pre, synthetic=2, max_pairs=0)
    names, _ = build_eval_pairs(pre, synthetic=3, max_pairs=1)
    assert len(names) == 1  # honoured for synthetic pairs too


def test_bom_csv_reads_alike_in_every_command(tmp_path: Path) -> None:
    from emorph_deploy.check import read_check_pairs
    from emorph_deploy.data.datasets import discover

    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    csv = tmp_path / "pairs.csv"
    csv.write_bytes(b"\xef\xbb\xbffixed,moving\na.nii.gz,b.nii.gz\n")
    assert [r.fixed.name for r in read_check_pairs(csv)] == ["a.nii.gz"]  # check
    _, pairs = discover(csv)  # evaluate/train
    assert [p.fixed.image.name for p in pairs] == ["a.nii.gz"]


def test_check_json_into_a_folder_is_one_line(tmp_path: Path) -> None:
    from emorph_deploy.fileio import check_writable

    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="expected a file path, got an existing folder"):
        check_writable(tmp_path / "d", force=True)


# ----------------------------------------------------------------------------------------------- outputs
def test_read_only_or_impossible_out_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    import os

    from emorph_deploy.registration.pipeline import refuse_existing

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        refuse_existing(tmp_path / "file" / "out", [], force=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m))
    with pytest.raises(InputError, match="not writable"):
        refuse_existing(ro / "out", [], force=False)


def test_failed_export_leaves_no_folder(tmp_path: Path, runner) -> None:
    (tmp_path / "bad.json").write_text("{}")
    out = tmp_path / "new" / "sub"
    res = runner.invoke(app, ["export", str(tmp_path / "bad.json"), "--out", str(out)])
    _one_line_error(res, 2)
    assert not (tmp_path / "new").exists()


def test_atomic_write_on_a_full_disk_leaves_no_folder(tmp_path: Path, monkeypatch) -> None:
    from emorph_deploy.fileio import write_bytes_atomic

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match="No space"):
        write_bytes_atomic(tmp_path / "a" / "b" / "x.bin", b"123")
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_are_one_line_in_every_command(monkeypatch) -> None:
    import typer

    from emorph_deploy.cli._common import handle_errors

    @handle_errors
    def command() -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/x/engine.plan")

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 1
