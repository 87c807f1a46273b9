"""``emorph export`` / ``emorph check`` through Typer's CliRunner: exit codes 0 / 1 / 2, nothing partial."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx", reason="onnx extra not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

from emorph_deploy.cli.app import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _stderr(res) -> str:
    return res.stderr if res.stderr_bytes is not None else res.output


@pytest.mark.slow
def test_export_cli_writes_pair_and_refuses_overwrite(tiny_ckpt, tmp_path):
    out = tmp_path / "export"
    res = _run(
        "export", tiny_ckpt, "--out", out, "--name", "m", "--grid-sample", "native", "--outputs", "flow"
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.onnx"]
    meta = json.loads((out / "m.json").read_text())
    assert meta["grid_sample"] == "native" and [o["name"] for o in meta["outputs"]] == ["flow"]
    before = (out / "m.onnx").read_bytes()
    res = _run("export", tiny_ckpt, "--out", out, "--name", "m", "--grid-sample", "native")
    assert res.exit_code == 2
    assert "--force" in _stderr(res) and len(_stderr(res).strip().splitlines()) == 1
    assert (out / "m.onnx").read_bytes() == before
    res = _run("export", tiny_ckpt, "--out", out, "--name", "m", "--grid-sample", "native", "--force")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["m.json", "m.onnx"]


def test_export_cli_bad_inputs(tmp_path, tiny_ckpt):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    (tmp_path / "bad.json").write_text("{not json")
    out = tmp_path / "out"
    res = _run("export", bad, "--out", out)
    assert res.exit_code == 2 and "error:" in _stderr(res)
    assert not out.exists() or list(out.iterdir()) == []
    # unwritable output folder: its parent is a regular file (works as root too)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = _run("export", tiny_ckpt, "--out", blocker / "sub", "--grid-sample", "native")
    assert res.exit_code == 2 and "output folder" in _stderr(res)
    # native 5D GridSample for TensorRT 10.x is refused up front
    res = _run("export", tiny_ckpt, "--out", out, "--grid-sample", "native", "--target", "tensorrt")
    assert res.exit_code == 2 and "GridSample" in _stderr(res)
    assert not out.exists() or list(out.iterdir()) == []


def test_check_cli_passes_on_faithful_export(exports, tmp_path):
    report = tmp_path / "report.json"
    res = _run("check", exports["gather"], "--synthetic", "1", "--json", report)
    assert res.exit_code == 0, res.output
    assert "PASS" in res.stdout and "max_flow_voxel" in res.stdout
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["precision"] == "fp32"
    assert data["summary"]["max_flow_voxel"] <= 1e-3
    assert data["pairs"][0]["dice_agreement"] >= 0.999
    # existing --json without --force: bad input, report untouched
    before = report.read_text()
    res = _run("check", exports["gather"], "--synthetic", "1", "--json", report)
    assert res.exit_code == 2 and report.read_text() == before


def test_check_cli_fails_on_perturbed_weights(exports, perturb, tmp_path):
    bad = perturb(exports["native"], tmp_path / "perturbed.onnx", rel=0.05)
    res = _run("check", bad, "--synthetic", "1")
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.stdout and "max_flow_voxel" in _stderr(res)


def test_check_cli_rejects_modified_graph_with_stale_manifest(exports, perturb, tmp_path):
    bad = perturb(exports["native"], tmp_path / "p.onnx")
    shutil.copy(exports["native"].with_suffix(".json"), bad.with_suffix(".json"))  # stale sha256_onnx
    res = _run("check", bad, "--synthetic", "1")
    assert res.exit_code == 2 and "sha256" in _stderr(res)


def test_check_cli_rejects_onnx_failing_checker(exports, tmp_path):
    import onnx

    model = onnx.load(str(exports["native"]))
    del model.graph.initializer[0]  # a node input is now undefined
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    shutil.copy(exports["native"].with_suffix(".json"), broken.with_suffix(".json"))
    res = _run("check", broken, "--synthetic", "1")
    assert res.exit_code == 2 and "onnx.checker" in _stderr(res)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not protobuf")
    shutil.copy(exports["native"].with_suffix(".json"), garbage.with_suffix(".json"))
    assert _run("check", garbage, "--synthetic", "1").exit_code == 2


def test_check_cli_grid_mismatch(exports, make_ckpt, tmp_path):
    other = make_ckpt(tmp_path / "other", grid=(16, 32, 40))
    res = _run("check", exports["native"], "--reference", other, "--synthetic", "1")
    assert res.exit_code == 2 and "grid mismatch" in _stderr(res)


def test_check_cli_missing_artifact_and_manifest(exports, tiny_ckpt, tmp_path):
    import onnx

    assert _run("check", tmp_path / "nope.onnx", "--synthetic", "1").exit_code == 2
    # without its .json an export still runs from its metadata_props, but names no reference checkpoint
    lone = tmp_path / "lone.onnx"
    shutil.copy(exports["native"], lone)
    res = _run("check", lone, "--synthetic", "1")
    assert res.exit_code == 2 and "--reference" in _stderr(res)
    assert _run("check", lone, "--synthetic", "1", "--reference", tiny_ckpt).exit_code == 0
    model = onnx.load(str(lone))
    del model.metadata_props[:]  # neither a manifest nor emorph metadata
    onnx.save(model, str(tmp_path / "bare.onnx"))
    res = _run("check", tmp_path / "bare.onnx", "--synthetic", "1")
    assert res.exit_code == 2 and "manifest" in _stderr(res)
