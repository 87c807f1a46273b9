"""``emorph register``: outputs, --force, bad input (one line, exit code, nothing partial), batch mode."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch", reason="torch is needed for the model")

from emorph_deploy.cli.app import app  # noqa: E402
from emorph_deploy.data.preprocess import Preprocessing  # noqa: E402

GRID = (16, 16, 16)


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()


def _save(path, data, affine=None):
    affine = np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _blob(shape, seed):
    from scipy.ndimage import gaussian_filter

    v = gaussian_filter(np.random.default_rng(seed).random(shape), 1.5).astype(np.float32)
    return (v - v.min()) / (v.max() - v.min())


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_em):
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("reg_cli")
    save_checkpoint(
        tiny_em(GRID),
        d / "tiny",
        preprocessing=Preprocessing(grid_shape=GRID, spacing_mm=(4.0, 4.0, 4.0)),
    )
    # artifact whose preprocessing grid does not match the model's input grid
    save_checkpoint(tiny_em(GRID), d / "mismatch", preprocessing=Preprocessing(grid_shape=(24, 24, 24)))
    fixed = _save(d / "fixed.nii.gz", _blob((20, 22, 18), 0))
    moving = _save(d / "moving.nii.gz", _blob((18, 20, 22), 1), np.diag([-3.2, 3.0, 2.8, 1.0]))
    labels = _save(
        d / "labels.nii.gz",
        (_blob((18, 20, 22), 1) > 0.5).astype(np.uint8) * 5,
        np.diag([-3.2, 3.0, 2.8, 1.0]),
    )
    return {
        "dir": d,
        "ckpt": d / "tiny.json",
        "mismatch": d / "mismatch.json",
        "fixed": fixed,
        "moving": moving,
        "labels": labels,
    }


def _invoke(args):
    res = _runner().invoke(app, [str(a) for a in args])
    return res, (res.stderr if res.stderr_bytes is not None else "")


def test_register_writes_outputs(files, tmp_path):
    out = tmp_path / "out"
    res, err = _invoke(
        [
            "register",
            files["fixed"],
            files["moving"],
            "--model",
            files["ckpt"],
            "--moving-labels",
            files["labels"],
            "--out",
            out,
            "--voxel-flow",
        ]
    )
    assert res.exit_code == 0, err + res.stdout
    assert "backend: torch" in err
    names = {p.name for p in out.iterdir()}
    assert names == {
        "warped.nii.gz",
        "warped_labels.nii.gz",
        "displacement.nii.gz",
        "inverse_displacement.nii.gz",
        "jacobian.nii.gz",
        "affine.mat",  # the pre-alignment is on by default
        "voxel_flow.nii.gz",
        "qc.json",
        "qc.png",
    }
    fixed = nib.load(files["fixed"])
    warped = nib.load(out / "warped.nii.gz")
    assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine)
    lab = nib.load(out / "warped_labels.nii.gz")
    assert lab.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(lab.dataobj))) <= {0, 5}
    disp = nib.load(out / "displacement.nii.gz")
    assert disp.shape == (*fixed.shape, 1, 3) and disp.header.get_intent()[0] == "vector"
    q = json.loads((out / "qc.json").read_text())
    assert q["backend"] == "torch" and q["precision"] == "fp32"
    assert {"load", "resample", "infer", "resample_back", "write"} <= set(q["times_s"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    # existing outputs: refused without --force (exit 2, untouched), replaced with it
    before = (out / "warped.nii.gz").stat().st_mtime_ns
    res, err = _invoke(["register", files["fixed"], files["moving"], "--model", files["ckpt"], "--out", out])
    assert res.exit_code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "warped.nii.gz").stat().st_mtime_ns == before
    res, err = _invoke(
        [
            "register",
            files["fixed"],
            files["moving"],
            "--model",
            files["ckpt"],
            "--out",
            out,
            "--force",
            "--affine",
            "--no-qc-png",
        ]
    )
    assert res.exit_code == 0, err
    q = json.loads((out / "qc.json").read_text())
    assert q["affine_prealignment"] is True and {"affine_accepted", "affine_metric", "affine_start"} <= set(q)
    # a rejected fit (two unrelated blobs may well be) exits 0, keeps the identity and says so on one line
    assert ("warning: affine pre-alignment rejected" in err) == (q["affine_accepted"] is False)
    if q["affine_accepted"] is False:
        assert np.allclose(q["affine_matrix"], np.eye(4))


def _bad_inputs(d):
    """name → (fixed, moving, labels) paths with one defect each."""
    good = _blob((20, 20, 20), 3)
    cases = {}
    cases["missing"] = d / "does_not_exist.nii.gz"
    (d / "not_nifti.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file at all" * 20))
    cases["not_nifti"] = d / "not_nifti.nii.gz"
    (d / "text.nii").write_text("hello")
    cases["not_nifti_plain"] = d / "text.nii"
    raw = _save(d / "ok.nii.gz", good).read_bytes()
    (d / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])
    cases["corrupt_gzip"] = d / "corrupt.nii.gz"
    cases["4d"] = _save(d / "4d.nii.gz", np.stack([good, good], axis=-1))
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    cases["nan"] = _save(d / "nan.nii.gz", nan)
    inf = good.copy()
    inf[1, 1, 1] = np.inf
    cases["inf"] = _save(d / "inf.nii.gz", inf)
    cases["all_zero"] = _save(d / "zero.nii.gz", np.zeros((20, 20, 20), np.float32))
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(np.diag([3.0, 0.0, 3.0, 1.0]), code=1)  # a zero voxel size: singular voxel-to-world matrix
    hdr.set_qform(None, code=0)
    nib.save(nib.Nifti1Image(good, None, hdr), str(d / "singular.nii.gz"))
    cases["singular_affine"] = d / "singular.nii.gz"
    return cases


BAD = [
    "missing",
    "not_nifti",
    "not_nifti_plain",
    "corrupt_gzip",
    "4d",
    "nan",
    "inf",
    "all_zero",
    "singular_affine",
]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_bad_image_exits_2_with_one_line(files, bad_files, tmp_path, case, role):
    out = tmp_path / "out"
    fixed, moving = files["fixed"], files["moving"]
    if role == "fixed":
        fixed = bad_files[case]
    else:
        moving = bad_files[case]
    res, err = _invoke(["register", fixed, moving, "--model", files["ckpt"], "--out", out])
    assert res.exit_code == 2, (case, err, res.stdout)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []


def test_bad_labels_and_artifacts_exit_2(files, tmp_path):
    d = tmp_path
    float_labels = _save(d / "float_labels.nii.gz", _blob((18, 20, 22), 1) * 4.3)
    out = d / "out"
    cases = [
        (["--model", files["ckpt"], "--moving-labels", float_labels], "integer label"),
        (["--model", files["mismatch"]], "grid"),
        (["--model", d / "nope.json"], "missing"),
        (["--onnx", files["ckpt"]], ".onnx"),
        (["--model", files["ckpt"], "--backend", "onnxruntime"], "onnxruntime"),
        (["--model", files["ckpt"], "--onnx", d / "x.onnx"], "at most one"),
    ]
    for extra, needle in cases:
        res, err = _invoke(["register", files["fixed"], files["moving"], "--out", out, *extra])
        assert res.exit_code == 2, (extra, err)
        assert len(err.strip().splitlines()) == 1 and needle in err, (extra, err)
        assert not out.exists() or list(out.iterdir()) == []


def test_no_model_argument_uses_packaged_default_or_says_none(files, tmp_path):
    from emorph_deploy.errors import InputError
    from emorph_deploy.registration import default_artifact

    try:
        default_artifact()
    except InputError:
        res, err = _invoke(["register", files["fixed"], files["moving"], "--out", tmp_path / "o"])
        assert res.exit_code == 2
        assert "no default model is packaged" in err and "--model" in err
    else:
        pytest.skip("a default model is packaged: covered by the weights tests")


def test_batch_continues_after_a_failing_pair(files, bad_files, tmp_path):
    csv = tmp_path / "pairs.csv"
    d = files["dir"]
    csv.write_text(
        "fixed,moving,moving_labels\n"
        f"{files['fixed']},{files['moving']},{files['labels']}\n"
        f"{files['fixed']},{bad_files['nan']},\n"
        f"{d / 'fixed.nii.gz'},moving.nii.gz,\n".replace("moving.nii.gz,\n", f"{d / 'moving.nii.gz'},\n")
    )
    out = tmp_path / "batch"
    res, err = _invoke(["register", "--pairs", csv, "--model", files["ckpt"], "--out", out, "--no-affine"])
    assert res.exit_code == 1, err + res.stdout
    assert "2/3 pairs registered, 1 failed" in res.stdout
    assert "NaN" in res.stdout
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(dirs) == 2  # the failing pair left no folder behind
    for name in dirs:
        assert (out / name / "warped.nii.gz").exists() and (out / name / "qc.json").exists()
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("id,status") and sum(",failed," in r for r in summary) == 1


def test_refine_similarity_option_reaches_qc(files, tmp_path):
    out = tmp_path / "out"
    args = [
        "register",
        files["fixed"],
        files["moving"],
        "--model",
        files["ckpt"],
        "--out",
        out,
        "--no-qc-png",
        "--no-affine",
        "--refine",
        "2",
        "--refine-grad-sigma",
        "1.2",
        "--refine-fold-weight",
        "3.5",
        "--refine-similarity",
        "mind",
    ]
    res, err = _invoke(args)
    assert res.exit_code == 0, err + res.stdout
    refine = json.loads((out / "qc.json").read_text())["refine"]
    assert refine["steps"] == 2 and refine["similarity"] == refine["similarity_requested"] == "mind"
    assert refine["fold_weight"] == 3.5 and refine["grad_sigma"] == 1.2
    bad, _ = _invoke([*args[:-1], "nmi", "--force"])
    assert bad.exit_code == 2  # Typer rejects a value outside the enum
    bad, err = _invoke([*args[:-3], "-1", *args[-2:], "--force"])
    assert bad.exit_code == 2 and "--refine-fold-weight" in err + bad.stdout  # a negative weight: bad input
    bad, err = _invoke([*args[:-5], "-0.5", *args[-4:], "--force"])
    assert bad.exit_code == 2 and "--refine-grad-sigma" in err + bad.stdout  # a negative sigma: bad input


def test_refine_full_steps_option_reaches_qc(files, tmp_path):
    """``--refine-full-steps K`` adds K full-resolution steps after the --refine N half-resolution ones; 0
    runs none, and without the option the library default applies."""
    out = tmp_path / "out"
    args = ["register", files["fixed"], files["moving"], "--model", files["ckpt"], "--out", out]
    args += ["--no-qc-png", "--no-affine", "--refine", "2"]
    res, err = _invoke([*args, "--refine-full-steps", "1"])
    assert res.exit_code == 0, err + res.stdout
    refine = json.loads((out / "qc.json").read_text())["refine"]
    assert (refine["steps"], refine["levels"], refine["full_steps"]) == (2, 2, 1)
    res, err = _invoke([*args, "--refine-full-steps", "0", "--force"])
    assert res.exit_code == 0, err + res.stdout
    assert json.loads((out / "qc.json").read_text())["refine"]["full_steps"] == 0
    res, err = _invoke([*args, "--force"])
    assert res.exit_code == 0, err + res.stdout
    from emorph_deploy.registration.defaults import DEFAULTS

    assert json.loads((out / "qc.json").read_text())["refine"]["full_steps"] == DEFAULTS.refine_full_steps
    bad, _ = _invoke([*args, "--refine-full-steps", "-1", "--force"])
    assert bad.exit_code == 2
