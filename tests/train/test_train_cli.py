"""`emorph train` / `emorph evaluate` through the CLI; bad input gives one clear line, exit 2, nothing
written."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emorph_deploy.cli.app import app

runner = CliRunner()


def _invoke(args):
    res = runner.invoke(app, [str(a) for a in args])
    return res, (res.stdout or ""), (res.stderr or "")


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _write_subjects(folder, n=3, bad=None):
    """n smooth 32³ volumes with integer label maps (``<stem>_seg``); ``bad`` poisons one file."""
    from scipy.ndimage import gaussian_filter

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(n):
        img = gaussian_filter(rng.random((32, 32, 32)), 2).astype(np.float32)
        lab = (img > np.median(img)).astype(np.int16) + (img > np.percentile(img, 80)).astype(np.int16)
        if bad == "nan" and i == 1:
            img[5, 5, 5] = np.nan
        if bad == "fractional" and i == 1:
            lab = lab.astype(np.float32) + 0.5
        nib.save(nib.Nifti1Image(img, aff), folder / f"s{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, aff), folder / f"s{i}_seg.nii.gz")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLI run (1 epoch × 2 iterations) shared by the CLI tests."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "run"
    tiny = [
        "--grid-shape",
        "32x32x32",
        "--embed-dims",
        "16,32",
        "--patch-dim",
        "12",
        "--decoder-widths",
        "16,8",
        "--skip-width",
        "8",
        "--heads",
        "2,4",
        "--depths",
        "1,1",
        "--no-progress",
        "--no-tensorboard",
    ]
    res, out_txt, err = _invoke(
        [
            "train",
            "-o",
            out,
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--val-pairs",
            "1",
            "--synthetic-kind",
            "synth",
            *tiny,
        ]
    )
    assert res.exit_code == 0, err
    assert "done: 2 iterations" in out_txt
    return out, tiny


@pytest.mark.slow
def test_cli_train_resume_and_guards(trained, tmp_path):
    out, tiny = trained
    # same folder again without --resume/--force: refused, nothing changed
    before = (out / "last.json").read_bytes()
    res, _, err = _invoke(["train", "-o", out, *tiny])
    assert res.exit_code == 2 and "--resume" in _error_line(err)
    assert (out / "last.json").read_bytes() == before
    # resume with a changed structural option: refused
    res, _, err = _invoke(["train", "-o", out, "--resume", "--batch-size", "2"])
    assert res.exit_code == 2 and "batch_size" in _error_line(err)
    # resume for one more epoch continues at iteration 2
    res, _, err = _invoke(["train", "-o", out, "--resume", "--epochs", "2", "--no-progress"])
    assert res.exit_code == 0, err
    assert "resumed" in err and "at iteration 2" in err
    meta = json.loads((out / "last.json").read_text())
    assert meta["training"]["step"] == 4 and meta["training"]["epoch"] == 2
    # a best metric the run's validation cannot measure: refused before anything is written
    before = (out / "last.json").read_bytes()
    res, _, err = _invoke(["train", "-o", out, "--resume", "--best-metric", "dice_aligned"])
    assert res.exit_code == 2 and "dice_aligned needs" in _error_line(err)
    assert (out / "last.json").read_bytes() == before
    # --resume where there is no run
    res, _, err = _invoke(["train", "-o", tmp_path / "none", "--resume"])
    assert res.exit_code == 2 and "not found" in _error_line(err)
    # a resumed run continues its own weights: --init-from is refused
    res, _, err = _invoke(["train", "-o", out, "--resume", "--init-from", out / "last.json"])
    assert res.exit_code == 2 and "--init-from" in _error_line(err)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_train_init_from_default_is_the_packaged_model(trained, tmp_path, monkeypatch):
    """``--init-from default`` warm-starts from the packaged checkpoint (here the tiny run stands in)."""
    import emorph_deploy.weights as weights

    src, tiny = trained
    monkeypatch.setattr(weights, "default_checkpoint_path", lambda: src / "last.safetensors")
    args = ["train", "-o", tmp_path / "d", "--epochs", "1", "--steps-per-epoch", "1", "--val-pairs", "1"]
    res, _, err = _invoke([*args, *tiny, "--synthetic-kind", "synth", "--init-from", "default"])
    assert res.exit_code == 0, err
    assert f"from {src / 'last.safetensors'}" in err


@pytest.mark.slow
def test_cli_train_init_from_adds_a_full_resolution_stage(trained, tmp_path):
    """A new run warm-started from the tiny run, with a full-resolution stage the checkpoint lacks."""
    src, tiny = trained
    out = tmp_path / "fr"
    args = ["train", "-o", out, "--epochs", "1", "--steps-per-epoch", "1", "--val-pairs", "1", *tiny]
    fr = ["--synthetic-kind", "synth", "--model-set", "full_res_width=4", "--init-from", src / "last.json"]
    res, _, err = _invoke([*args, *fr, "--train-only", "full_res."])
    assert res.exit_code == 0, err
    assert "initialised" in err and "keep their initialisation (e.g. full_res." in err
    meta = json.loads((out / "last.json").read_text())
    assert meta["model"]["full_res_width"] == 4
    # --train-only: the warm-started tensors stayed frozen, the new stage trained
    before, after = load_file(src / "last.safetensors"), load_file(out / "last.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(after["full_res.head.weight"].abs().max()) > 1e-4  # moved off its ~1e-5 initialisation
    # a prefix that matches nothing: one clear line, exit 2
    res, _, err = _invoke([*args, "-o", tmp_path / "none", *fr, "--train-only", "decoder."])
    assert res.exit_code == 2 and "matches no parameter" in _error_line(err)
    assert not (tmp_path / "none").exists()
    # a checkpoint of other widths: one clear line, exit 2, no run folder left behind
    res, _, err = _invoke([*args, "-o", tmp_path / "bad", "--embed-dims", "8,16", "--init-from", src])
    assert res.exit_code == 2 and "--init-from" in _error_line(err)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_cli_evaluate_table_and_json(trained, tmp_path):
    out, _ = trained
    res, out_txt, err = _invoke(
        [
            "evaluate",
            out / "best.safetensors",
            "--synthetic",
            "2",
            "--synthetic-kind",
            "synth",
            "--csv",
            tmp_path / "ev.csv",
            "--json",
            tmp_path / "ev.json",
        ]
    )
    assert res.exit_code == 0, err
    for col in ("Dice", "HD95 mm", "SDlogJ", "SDlogJ(L2R)", "J<=0", "NCC", "EPE vox", "mean"):
        assert col in out_txt
    report = json.loads((tmp_path / "ev.json").read_text())
    assert len(report["pairs"]) == 2 and 0.0 <= report["mean"]["dice"] <= 1.0
    assert (tmp_path / "ev.csv").read_text().count("\n") == 4  # header + 2 pairs + mean
    # OASIS mode names the protocol and the paper's number
    res, out_txt, err = _invoke(["evaluate", out, "--synthetic", "1", "--oasis", "--synthetic-kind", "synth"])
    assert res.exit_code == 0, err
    assert "0.867" in out_txt and "labels 1-35" in out_txt
    # requested model differs from the checkpoint
    res, _, err = _invoke(["evaluate", out, "--synthetic", "1", "--model", "em-11-hires"])
    assert res.exit_code == 2 and "em-11-hires" in _error_line(err)
    # existing output without --force
    res, _, err = _invoke(["evaluate", out, "--synthetic", "1", "--csv", tmp_path / "ev.csv"])
    assert res.exit_code == 2 and "--force" in _error_line(err)


def test_cli_evaluate_heldout_brain_pairs(trained, tmp_path):
    out, _ = trained
    res, _, err = _invoke(
        [
            "evaluate",
            out / "best.json",
            "--synthetic",
            "3",
            "--synthetic-kind",
            "brains",
            "--json",
            tmp_path / "b.json",
        ]
    )
    assert res.exit_code == 0, err
    report = json.loads((tmp_path / "b.json").read_text())
    names = [p["pair"] for p in report["pairs"]]
    # two same-contrast pairs first, then one pair of different contrasts; labels give a Dice per pair
    assert len(names) == 3 and all(n.startswith("brains-") for n in names)
    a, b = names[0].split("-")[2:], names[2].split("-")[2:]
    assert a[0] == a[1] and b != ["t1", "t1"]
    assert all(0.0 < p["dice"] <= 1.0 for p in report["pairs"])


@pytest.mark.slow
def test_cli_train_and_evaluate_on_nifti_folder(tmp_path, tiny_cli):
    data = _write_subjects(tmp_path / "data", n=3)
    out = tmp_path / "run"
    res, out_txt, err = _invoke(
        [
            "train",
            "-o",
            out,
            "--data",
            data,
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--val-fraction",
            "0.34",
            "--grid",
            "2mm",
            *tiny_cli,
        ]
    )
    assert res.exit_code == 0, err
    assert "dice" in out_txt  # validation on held-out subjects with label maps
    res, out_txt, err = _invoke(["evaluate", out / "last.json", data])
    assert res.exit_code == 0, err
    assert out_txt.count("->") == 2  # pairs s0->s1, s1->s2


@pytest.mark.parametrize("case", ["missing", "empty", "nan", "fractional", "corrupt"])
def test_cli_train_bad_data(tmp_path, tiny_cli, case):
    out = tmp_path / "run"
    if case == "missing":
        data = tmp_path / "nope"
    elif case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "corrupt":
        data = _write_subjects(tmp_path / "data", n=3)
        (data / "s0.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    else:
        data = _write_subjects(tmp_path / "data", n=3, bad=case)
    res, _, err = _invoke(
        [
            "train",
            "-o",
            out,
            "--data",
            data,
            "--epochs",
            "1",
            "--steps-per-epoch",
            "3",
            "--val-fraction",
            "0",
            "--val-pairs",
            "0",
            *tiny_cli,
        ]
    )
    assert res.exit_code == 2, (res.exit_code, err, res.exception)
    _error_line(err)
    assert not (out / "last.json").exists() and not (out / "best.json").exists()


def test_cli_evaluate_bad_checkpoint(tmp_path):
    res, _, err = _invoke(["evaluate", tmp_path / "missing.safetensors", "--synthetic", "1"])
    assert res.exit_code == 2 and "not found" in _error_line(err)
    (tmp_path / "x.json").write_text("{broken")
    (tmp_path / "x.safetensors").write_bytes(b"")
    res, _, err = _invoke(["evaluate", tmp_path / "x.json", "--synthetic", "1"])
    assert res.exit_code == 2
    _error_line(err)


@pytest.mark.slow  # a fresh interpreter trains for a few seconds
def test_cli_train_sigterm_to_the_process_group_saves_last(tmp_path, tiny_cli):
    """A scheduler's SIGTERM (or Ctrl-C) reaches the DataLoader workers too: the run still ends with one
    line, exit 143 and a consistent `last` (its JSON as new as its optimizer state)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "emorph_deploy", "train", "-o", str(out), "--synthetic-kind", "synth"]
    cmd += ["--workers", "1", "--epochs", "100", "--steps-per-epoch", "1000", "--val-pairs", "0"]
    cmd += ["--checkpoint-every", "0", *tiny_cli]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("training "):  # the loop has started; let a few iterations run
            break
    time.sleep(4.0)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group: main process and its worker
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest
    assert "interrupted at iteration" in rest and "Traceback" not in rest and "killed by signal" not in rest
    meta = json.loads((out / "last.json").read_text())
    state = torch.load(out / "last.state.pt", map_location="cpu", weights_only=False)
    assert meta["training"]["step"] == state["step"] > 0
