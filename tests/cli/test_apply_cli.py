"""``emorph apply``: a real ``emorph register --affine --moving-labels`` run (tiny model) re-applied from its
files reproduces ``warped.nii.gz`` and ``warped_labels.nii.gz``; bad input exits 2 with one line and leaves no
file; no overwrite without --force."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch", reason="torch runs the tiny model of the registration")


GRID = (16, 16, 16)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_em, cli):
    from scipy.ndimage import gaussian_filter

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.data.resample import resample_to_grid
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("apply_cli")
    save_checkpoint(
        tiny_em(GRID), d / "tiny", preprocessing=Preprocessing(grid_shape=GRID, spacing_mm=(4.0,) * 3)
    )
    v = gaussian_filter(np.random.default_rng(0).random((22, 24, 20)), 2.0).astype(np.float32)
    v = (v - v.min()) / (v.max() - v.min())
    f_aff = np.diag([3.0, 3.0, 3.0, 1.0])
    m_aff = np.diag([-3.2, 3.0, 2.8, 1.0])
    m_aff[:3, 3] = [66.0, 2.0, -3.0]
    shift = np.eye(4)
    shift[:3, 3] = [2.5, -1.5, 1.0]  # fixed world -> moving world
    moving = resample_to_grid(v, shift @ f_aff, (20, 22, 24), m_aff, order=1)
    nib.save(nib.Nifti1Image(v, f_aff), d / "fixed.nii.gz")
    nib.save(nib.Nifti1Image(moving, m_aff), d / "moving.nii.gz")
    labels = (np.digitize(moving, [0.35, 0.6]) * 2).astype(np.uint8)  # 0, 2, 4
    nib.save(nib.Nifti1Image(labels, m_aff), d / "labels.nii.gz")
    out = d / "out"
    res, err = cli(
        *[
            *(
                "register",
                d / "fixed.nii.gz",
                d / "moving.nii.gz",
                "--model",
                d / "tiny.json",
                "--affine",
                "--refine",
                "0",
            ),
            *("--moving-labels", d / "labels.nii.gz", "--out", out, "--no-qc-png"),
        ]
    )
    assert res.exit_code == 0, err
    assert (out / "affine.mat").is_file()
    return {"dir": d, "out": out}


def test_apply_reproduces_warped_and_warped_labels(run, cli, tmp_path):
    d, out = run["dir"], run["out"]
    base = ["apply", out / "displacement.nii.gz"]
    res, err = cli(
        *[*base, d / "moving.nii.gz", "--reference", d / "fixed.nii.gz", "--out", tmp_path / "w.nii.gz"]
    )
    assert res.exit_code == 0, err
    got = nib.load(tmp_path / "w.nii.gz").get_fdata()
    want = nib.load(out / "warped.nii.gz").get_fdata()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

    res, err = cli(
        *[
            *base,
            d / "labels.nii.gz",
            "-r",
            d / "fixed.nii.gz",
            "--interp",
            "nearest",
            "-o",
            tmp_path / "l.nii.gz",
        ]
    )
    assert res.exit_code == 0, err
    got_l, want_l = nib.load(tmp_path / "l.nii.gz"), nib.load(out / "warped_labels.nii.gz")
    assert got_l.get_data_dtype() == want_l.get_data_dtype() == np.uint8
    assert np.mean(np.asanyarray(got_l.dataobj) == np.asanyarray(want_l.dataobj)) >= 0.999


def test_inverse_takes_labels_back_to_the_moving_grid(run, cli, tmp_path):
    """Moving labels forward onto the fixed grid, then through inverse_displacement back onto the moving
    grid: they land (mostly) on themselves."""
    d, out = run["dir"], run["out"]
    res, err = cli(
        *[
            *("apply", out / "inverse_displacement.nii.gz", out / "warped_labels.nii.gz"),
            *("-r", d / "moving.nii.gz", "--interp", "label", "-o", tmp_path / "back.nii.gz"),
        ]
    )
    assert res.exit_code == 0, err
    back = nib.load(tmp_path / "back.nii.gz")
    orig = np.asanyarray(nib.load(d / "labels.nii.gz").dataobj)
    np.testing.assert_allclose(back.affine, nib.load(d / "moving.nii.gz").affine, atol=1e-5)
    assert np.mean(np.asanyarray(back.dataobj)[orig > 0] == orig[orig > 0]) > 0.9


def test_no_overwrite_without_force_and_one_line_errors(run, cli, tmp_path):
    d, out = run["dir"], run["out"]
    target = tmp_path / "w.nii.gz"
    args = ["apply", out / "affine.mat", d / "moving.nii.gz", "-r", d / "fixed.nii.gz", "-o", target]
    assert cli(*args)[0].exit_code == 0
    before = target.read_bytes()
    res, err = cli(*args)
    assert res.exit_code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == before
    res, err = cli(*[*args, "--force"])
    assert res.exit_code == 0, err

    bad = [
        (["apply", d / "nope.mat", d / "moving.nii.gz"], "missing path"),
        (["apply", d / "fixed.nii.gz", d / "moving.nii.gz"], "list the transforms first"),
        (["apply", d / "moving.nii.gz"], "at least one transform"),
        (["apply", out / "qc.json", d / "moving.nii.gz"], "displacement field"),
        (["apply", out / "displacement.nii.gz", d / "moving.nii.gz"], "--reference"),
    ]
    far = nib.load(d / "fixed.nii.gz")  # the fixed image 300 mm away: not the field's grid
    nib.save(nib.Nifti1Image(far.get_fdata(), far.affine + _shift(300.0)), tmp_path / "far.nii.gz")
    for i, (cmd, match) in enumerate(bad):
        dest = tmp_path / f"bad{i}.nii.gz"
        ref = tmp_path / "far.nii.gz" if match == "--reference" else d / "fixed.nii.gz"
        res, err = cli(*[*cmd, "-r", ref, "-o", dest])
        assert res.exit_code == 2, (cmd, err)
        assert match in err and len(err.strip().splitlines()) == 1, err
        assert not dest.exists() and not list(tmp_path.glob(f".bad{i}*"))


def _shift(mm: float) -> np.ndarray:
    m = np.zeros((4, 4))
    m[0, 3] = mm
    return m
