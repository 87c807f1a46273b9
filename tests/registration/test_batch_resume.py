"""Batch registration from a pairs CSV: ``--resume`` keeps only complete, valid output sets (in process)."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from typer.testing import CliRunner

pytest.importorskip("torch", reason="torch is needed for the model")

from emorph_deploy.cli.app import app
from emorph_deploy.registration.batch import PairOptions, completed_row, read_pairs
from emorph_deploy.registration.defaults import DEFAULTS


def _invoke(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, (res.stderr if res.stderr_bytes is not None else "")


def _summary(out):
    with open(out / "summary.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


@pytest.fixture()
def cohort(tiny_cohort, tmp_path):
    """A private copy of the tiny cohort (the tests change its files)."""
    d = tmp_path / "cohort"
    shutil.copytree(tiny_cohort["dir"], d)
    return {"dir": d, "csv": d / "cohort.csv", "ckpt": d / "tiny.json"}


def test_resume_skips_complete_pairs_and_redoes_broken_ones(cohort, tmp_path):
    out = tmp_path / "out"
    base = ["register", "--pairs", cohort["csv"], "--model", cohort["ckpt"], "--out", out, "--threads", "1"]
    base.append("--no-affine")  # the cohort shares one space
    res, err = _invoke(base)
    assert res.exit_code == 0, err + res.stdout
    first = _summary(out)
    assert [r["status"] for r in first.values()] == ["ok"] * 3
    assert json.loads((out / "p0" / "qc.json").read_text())["inputs"]["moving_labels"]["bytes"] > 0

    res, err = _invoke(base)  # a second run neither overwrites nor resumes without being asked
    assert res.exit_code == 2 and "--force" in err

    # p0: a label map cut off mid-write; p1: the qc.json never renamed into place
    labels = out / "p0" / "warped_labels.nii.gz"
    labels.write_bytes(labels.read_bytes()[: labels.stat().st_size // 2])
    (out / "p1" / "qc.json").unlink()
    res, err = _invoke([*base, "--resume"])
    assert res.exit_code == 0, err + res.stdout
    assert "2/3 pairs registered, 0 failed, 1 skipped" in res.stdout
    second = _summary(out)
    assert {k: r["status"] for k, r in second.items()} == {"p0": "ok", "p1": "ok", "p2": "skipped"}
    assert second["p2"]["ncc_after"] == first["p2"]["ncc_after"]  # the kept pair's QC, from its qc.json
    assert float(second["p2"]["seconds"]) > 0
    import nibabel as nib

    assert nib.load(str(labels)).get_fdata().max() == 5  # redone in full

    res, err = _invoke([*base, "--resume"])
    assert res.exit_code == 0 and "0/3 pairs registered, 0 failed, 3 skipped" in res.stdout


def test_completed_row_checks_inputs_outputs_and_qc(cohort, tmp_path):
    from emorph_deploy.registration import Registrar
    from emorph_deploy.registration.batch import run_batch

    out = tmp_path / "out"
    pairs = read_pairs(cohort["csv"])[1:2]
    reg = Registrar.load(cohort["ckpt"], backend="torch", affine=False)
    rows = run_batch(reg, pairs, out, qc_png=False, progress=False)
    assert rows[0]["status"] == "ok"
    pair, opts = pairs[0], PairOptions(qc_png=False)
    done = completed_row(pair, out, opts)
    assert done is not None and done["status"] == "skipped" and done["ncc_after"] == rows[0]["ncc_after"]
    assert completed_row(pair, out, PairOptions(qc_png=False, voxel_flow=True)) is None  # asks for more
    assert completed_row(pair, out, PairOptions()) is None  # qc.png was not written

    qc_path = out / pair.id / "qc.json"
    qc_text = qc_path.read_text()
    qc_path.write_text(qc_text[:-20])  # not JSON
    assert completed_row(pair, out, opts) is None
    qc_path.write_text(qc_text)
    pair.moving.write_bytes(pair.moving.read_bytes() + b"\0")  # the input changed since
    assert completed_row(pair, out, opts) is None


def test_resume_refuses_other_settings(cohort, tmp_path):
    """``batch.json`` keeps the first run's settings; ``--resume`` with other settings or another model is one
    line, exit 2, naming what changed, and touches nothing; the same model under another path resumes."""
    import torch

    from emorph_deploy.train.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "out"
    args = ["register", "--pairs", cohort["csv"], "--out", out, "--threads", "1", "--no-qc-png"]
    res, err = _invoke([*args, "--model", cohort["ckpt"]])
    assert res.exit_code == 0, err + res.stdout
    manifest = json.loads((out / "batch.json").read_text())
    s = manifest["settings"]
    assert manifest["format"] == "emorph-batch/1"
    assert (s["backend"], s["precision"], s["affine"], s["voxel_flow"], s["qc_png"]) == (
        "torch",
        "fp32",
        DEFAULTS.affine,
        False,
        False,
    )
    assert s["refine"]["steps"] == DEFAULTS.refine_steps and len(s["artifact_sha256"]) == 64
    assert s["artifact"] == str(cohort["ckpt"].resolve())
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    steps = DEFAULTS.refine_steps + 2
    res, err = _invoke([*args, "--model", cohort["ckpt"], "--resume", "--refine", str(steps), "--voxel-flow"])
    assert res.exit_code == 2, err + res.stdout
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: --resume"), err
    line = errors[0]
    assert f"refine.steps {DEFAULTS.refine_steps} -> {steps}" in line and "voxel_flow False -> True" in line
    assert "affine" not in line and "model" not in line  # only what changed is listed
    assert "new --out" in line and "--force" in line

    # another model: same architecture, other weights
    model, meta = load_checkpoint(cohort["ckpt"])
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    other = save_checkpoint(model, tmp_path / "other" / "tiny", preprocessing=meta["preprocessing"])
    res, err = _invoke([*args, "--model", other.meta, "--resume"])
    assert res.exit_code == 2 and "model tiny.json (" in err and "-> tiny.json (" in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # refused before any work

    # a plain re-run of an interrupted batch (no summary.csv yet) is refused with the way forward
    (out / "summary.csv").unlink()
    res, err = _invoke([*args, "--model", cohort["ckpt"]])
    assert res.exit_code == 2 and "--resume to continue it" in err, err

    copy = tmp_path / "copy"
    shutil.copytree(cohort["ckpt"].parent, copy)  # the same model under another path
    res, err = _invoke([*args, "--model", copy / "tiny.json", "--resume"])
    assert res.exit_code == 0 and "0/3 pairs registered, 0 failed, 3 skipped" in res.stdout, err
