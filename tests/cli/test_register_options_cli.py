"""``emorph register`` options of issues 15/20 through the CLI: shared defaults, ``--affine/--no-affine``,
``--initial-affine`` (round trip through ``affine.mat``), masks, QC Dice, ``--prefix``, batch columns, ``-h``
and shell completion."""

from __future__ import annotations

import inspect
import json

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from emorph_deploy.cli.app import COMMAND_MODULES, app
from emorph_deploy.registration.defaults import DEFAULTS

GRID = (16, 16, 16)


def _invoke(runner: CliRunner, *args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


# ------------------------------------------------------------------------------------------------ no model
def test_cli_defaults_are_the_registrar_defaults(runner):
    from emorph_deploy.cli.demo import demo_command
    from emorph_deploy.cli.register import register_command
    from emorph_deploy.registration.pipeline import Registrar

    reg = inspect.signature(register_command).parameters
    demo = inspect.signature(demo_command).parameters
    api = inspect.signature(Registrar).parameters
    assert reg["affine"].default is DEFAULTS.affine is demo["affine"].default is api["affine"].default
    assert reg["refine"].default == DEFAULTS.refine_steps == demo["refine"].default
    assert reg["refine_similarity"].default is DEFAULTS.refine_similarity
    assert reg["qc_png"].default is DEFAULTS.qc_png is demo["qc_png"].default
    assert reg["voxel_flow"].default is DEFAULTS.voxel_flow
    assert reg["passes"].default == DEFAULTS.passes == demo["passes"].default == api["passes"].default
    # what --help shows is that default; --affine stays accepted next to --no-affine
    command = typer.main.get_command(app).commands["register"]
    params = {p.name: p for p in command.params}
    assert params["affine"].default is DEFAULTS.affine and params["affine"].show_default is not False
    assert set(params["affine"].opts) == {"--affine"} and set(params["affine"].secondary_opts) == {
        "--no-affine"
    }
    res = _invoke(runner, "register", "--help", env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "[default: affine]" in res.output


def test_dash_h_is_help_on_every_command(runner):
    root = _invoke(runner, "-h")
    assert root.exit_code == 0 and "Usage:" in root.output
    names = [c.name for c in app.registered_commands]
    assert len(names) >= len(COMMAND_MODULES) and "register" in names
    for name in names:
        res = _invoke(runner, name, "-h")
        assert res.exit_code == 0, (name, res.output)
        assert "Usage:" in res.output and f" {name} " in res.output, name


def test_shell_completion_is_on(runner, tmp_path, monkeypatch):
    # Typer makes --show-completion/--install-completion flags that detect the shell from the process tree
    # (shellingham) unless this is set when the command is built; with it they take the shell's name, so
    # the test does not depend on whether pytest happens to run under a detectable shell
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    shown = _invoke(runner, "--show-completion", "bash")
    assert shown.exit_code == 0 and "_EMORPH_COMPLETE=complete_bash" in shown.output, (
        shown.output,
        shown.exception,
    )
    installed = _invoke(
        runner, "--install-completion", "bash", env={"HOME": str(tmp_path), "SHELL": "/bin/bash"}
    )
    assert installed.exit_code == 0 and (tmp_path / ".bash_completions" / "emorph.sh").is_file()

    def complete(words: str, cword: int) -> list[str]:
        env = {"_EMORPH_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        res = _invoke(runner, prog_name="emorph", env=env)
        assert res.exit_code == 0
        return res.output.split()

    assert complete("emorph regi", 1) == ["register"]
    assert complete("emorph register --no-a", 2) == ["--no-affine"]


# ------------------------------------------------------------------------------------------- with a model
@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_em):
    """A tiny 16³ (4 mm) checkpoint; MNI152 at 3 mm as the fixed image and a copy moved by a known affine onto
    an oblique grid as the moving one, with threshold label maps and masks on their grids."""
    pytest.importorskip("torch", reason="torch is needed for the model")
    pytest.importorskip("nilearn", reason="nilearn ships the MNI152 template")
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.data.resample import resample_to_grid
    from emorph_deploy.data.synthetic import mni152_images
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("reg_opts")
    save_checkpoint(
        tiny_em(GRID), d / "tiny", preprocessing=Preprocessing(grid_shape=GRID, spacing_mm=(4.0,) * 3)
    )
    img = mni152_images(3)[0]
    fixed = np.asarray(img.dataobj, dtype=np.float32)
    a_f = np.asarray(img.affine, dtype=np.float64)
    t = np.eye(4)
    c, s = np.cos(0.08), np.sin(0.08)
    t[:2, :2] = [[c, -s], [s, c]]
    t[:3, 3] = [5.0, -3.0, 2.0]
    shape = (56, 64, 58)
    a_m = np.diag([3.2, 3.2, 3.4, 1.0])
    a_m[:3, 3] = np.array([2.0, -18.0, 12.0]) - a_m[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    moving = resample_to_grid(fixed, np.linalg.inv(t) @ a_f, shape, a_m, order=1).astype(np.float32)
    out = {"dir": d, "ckpt": d / "tiny.json"}
    for name, data, aff in (
        ("fixed", fixed, a_f),
        ("moving", moving, a_m),
        ("fixed_labels", (fixed > 0.25 * fixed.max()).astype(np.uint8) * 3, a_f),
        ("moving_labels", (moving > 0.25 * moving.max()).astype(np.uint8) * 3, a_m),
        ("fixed_mask", (fixed > 0.05 * fixed.max()).astype(np.uint8), a_f),
        ("moving_mask", (moving > 0.05 * moving.max()).astype(np.uint8), a_m),
        ("small_mask", np.ones((8, 8, 8), np.uint8), a_f),
    ):
        nib.save(nib.Nifti1Image(data, aff), str(d / f"{name}.nii.gz"))
        out[name] = d / f"{name}.nii.gz"
    return out


def _register(runner, files, out, *extra):
    return _invoke(
        runner,
        "register", files["fixed"], files["moving"], "--model", files["ckpt"], "--backend", "torch",
        "--out", out, "--no-qc-png", "--threads", "1", *extra,
    )  # fmt: skip


def test_initial_affine_round_trip_and_no_affine(runner, files, tmp_path):
    """The affine.mat of a default run, passed back with --initial-affine --no-affine, reproduces its warped
    image; --no-affine alone writes no affine.mat."""
    first = _register(runner, files, tmp_path / "a")
    assert first.exit_code == 0, first.stderr
    q1 = json.loads((tmp_path / "a" / "qc.json").read_text())
    assert (
        q1["affine_prealignment"] is True and q1["affine_accepted"] is True and q1["affine_source"] == "fit"
    )
    assert not np.allclose(q1["affine_matrix"], np.eye(4), atol=1e-3)  # a real fit, not the identity
    mat = tmp_path / "a" / "affine.mat"
    again = _register(runner, files, tmp_path / "b", "--no-affine", "--initial-affine", mat)
    assert again.exit_code == 0, again.stderr
    q2 = json.loads((tmp_path / "b" / "qc.json").read_text())
    assert q2["affine_source"] == "initial" and "affine_accepted" not in q2
    np.testing.assert_allclose(q2["affine_matrix"], q1["affine_matrix"], atol=1e-9)
    w1 = np.asanyarray(nib.load(tmp_path / "a" / "warped.nii.gz").dataobj)
    w2 = np.asanyarray(nib.load(tmp_path / "b" / "warped.nii.gz").dataobj)
    np.testing.assert_allclose(w2, w1, atol=1e-4 * float(np.abs(w1).max()), rtol=0)
    assert (tmp_path / "b" / "affine.mat").is_file()  # the pre-alignment used, written like a fitted one

    none = _register(runner, files, tmp_path / "c", "--no-affine")
    assert none.exit_code == 0, none.stderr
    q3 = json.loads((tmp_path / "c" / "qc.json").read_text())
    assert q3["affine_prealignment"] is False and "affine_matrix" not in q3
    assert not (tmp_path / "c" / "affine.mat").exists() and "affine" not in q3["outputs"]

    start = _register(runner, files, tmp_path / "d", "--initial-affine", mat)  # the fit starts from it
    assert start.exit_code == 0, start.stderr
    q4 = json.loads((tmp_path / "d" / "qc.json").read_text())
    assert q4["affine_source"] == "initial+fit" and q4["affine_start"] == "initial"

    bad = _register(runner, files, tmp_path / "e", "--initial-affine", files["fixed"])
    assert (
        bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--initial-affine" in bad.stderr
    )
    assert not (tmp_path / "e").exists()


def test_masks_labels_and_qc_region(runner, files, tmp_path):
    from emorph_deploy.metrics import dice_per_label

    out = tmp_path / "o"
    res = _register(
        runner, files, out, "--fixed-mask", files["fixed_mask"], "--moving-mask", files["moving_mask"],
        "--moving-labels", files["moving_labels"], "--fixed-labels", files["fixed_labels"],
    )  # fmt: skip
    assert res.exit_code == 0, res.stderr
    q = json.loads((out / "qc.json").read_text())
    assert q["qc_region"] == "fixed-mask" and q["masks"] == {"fixed": True, "moving": True}
    fixed_labels = np.asanyarray(nib.load(files["fixed_labels"]).dataobj)
    warped = np.asanyarray(nib.load(out / "warped_labels.nii.gz").dataobj)
    after = dice_per_label(fixed_labels, warped)
    assert set(after) == {3} and q["dice_per_label_after"] == {"3": pytest.approx(after[3], abs=1e-12)}
    assert q["dice_after"] == pytest.approx(after[3], abs=1e-12)
    assert q["dice_after"] > q["dice_before"]  # the known affine is undone
    assert "Dice" in res.stdout and "(fixed-mask)" in res.stdout

    plain = _register(runner, files, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "qc.json").read_text())["qc_region"] == "fixed-foreground"
    assert plain.exit_code == 0

    lone = _register(runner, files, tmp_path / "bad", "--fixed-labels", files["fixed_labels"])
    assert lone.exit_code == 2 and "expected --moving-labels too" in lone.stderr
    for extra, needle in (
        (["--fixed-mask", files["small_mask"]], "fixed mask: expected the fixed image's grid"),
        (["--moving-mask", files["fixed_mask"]], "moving mask: expected the moving image's grid"),
        (
            ["--fixed-labels", files["moving_labels"], "--moving-labels", files["moving_labels"]],
            "fixed labels: expected the fixed image's grid",
        ),
    ):
        bad = _register(runner, files, tmp_path / "bad", *extra)
        assert bad.exit_code == 2, (extra, bad.stderr)
        assert len(bad.stderr.strip().splitlines()) == 1 and needle in bad.stderr, bad.stderr
        assert not (tmp_path / "bad").exists()


def test_prefix_names_the_outputs_and_force_replaces_only_its_set(runner, files, tmp_path):
    out = tmp_path / "o"
    assert _register(runner, files, out, "--no-affine", "--prefix", "sub01_", "--qc-png").exit_code == 0
    assert _register(runner, files, out, "--no-affine", "--prefix", "sub02_").exit_code == 0
    names = {p.name for p in out.iterdir()}
    assert {"sub01_warped.nii.gz", "sub01_qc.png", "sub02_warped.nii.gz", "sub02_qc.json"} <= names
    assert all(n.startswith(("sub01_", "sub02_")) for n in names)
    again = _register(runner, files, out, "--no-affine", "--prefix", "sub01_")
    assert again.exit_code == 2 and "sub01_" in again.stderr and "--force" in again.stderr
    keep = {n: (out / n).stat().st_mtime_ns for n in names if n.startswith("sub02_")}
    assert _register(runner, files, out, "--no-affine", "--prefix", "sub01_", "--force").exit_code == 0
    after = {p.name for p in out.iterdir()}
    assert "sub01_qc.png" not in after and "sub01_warped.nii.gz" in after  # the whole sub01_ set replaced
    assert {n: (out / n).stat().st_mtime_ns for n in keep} == keep
    bad = _register(runner, files, tmp_path / "x", "--prefix", "a/b")
    assert bad.exit_code == 2 and "--prefix" in bad.stderr and not (tmp_path / "x").exists()


def test_batch_reads_mask_and_label_columns(runner, files, tmp_path):
    d = files["dir"]
    csv = tmp_path / "pairs.csv"
    csv.write_text(
        "id,fixed,moving,moving_labels,fixed_labels,fixed_mask,moving_mask\n"
        f"m,{d / 'fixed.nii.gz'},{d / 'moving.nii.gz'},{d / 'moving_labels.nii.gz'},"
        f"{d / 'fixed_labels.nii.gz'},{d / 'fixed_mask.nii.gz'},{d / 'moving_mask.nii.gz'}\n"
        f"p,{d / 'fixed.nii.gz'},{d / 'moving.nii.gz'},,,,\n"
    )
    out = tmp_path / "batch"
    args = ["--model", files["ckpt"], "--out", out, "--no-qc-png", "--no-affine", "--threads", "1"]
    res = _invoke(runner, "register", "--pairs", csv, *args)
    assert res.exit_code == 0, res.stderr + res.stdout
    qm = json.loads((out / "m" / "qc.json").read_text())
    qp = json.loads((out / "p" / "qc.json").read_text())
    assert qm["masks"] == {"fixed": True, "moving": True} and qm["qc_region"] == "fixed-mask"
    assert qm["affine_prealignment"] is False
    assert "dice_after" in qm and "fixed_mask" in qm["inputs"]
    assert qp["masks"] == {"fixed": False, "moving": False} and "dice_after" not in qp
    assert "fixed_mask" not in qp["inputs"]  # input records of pairs without extras are unchanged
    mixed = _invoke(
        runner, "register", "--pairs", csv, "--fixed-mask", files["fixed_mask"], "--out", tmp_path / "y"
    )
    assert mixed.exit_code == 2 and "--fixed-mask" in mixed.stderr


def test_passes_reach_qc_json_and_bad_values_exit_2(runner, files, tmp_path):
    """--passes 2 runs the network twice (qc.json says so); --passes 0 / 5 are usage errors, exit 2, with
    nothing written."""
    two = _register(runner, files, tmp_path / "a", "--passes", "2", "--refine", "0")
    assert two.exit_code == 0, two.stderr
    assert json.loads((tmp_path / "a" / "qc.json").read_text())["passes"] == 2
    for bad in ("0", "5"):
        res = _register(runner, files, tmp_path / f"bad{bad}", "--passes", bad)
        assert res.exit_code == 2 and "--passes" in res.output + res.stderr
        assert not (tmp_path / f"bad{bad}").exists()
