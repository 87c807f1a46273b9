"""emorph build: engines from TensorRT-RTX ahead of time (CPU only), manifests, refusals."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emorph_deploy.engines import BuildOptions, build_engine, read_engine_manifest
from emorph_deploy.errors import InputError, MissingDependencyError, OutputExistsError
from emorph_deploy.fileio import sha256_file


def _has_modelopt() -> bool:
    try:
        import modelopt.onnx.autocast  # noqa: F401
    except ImportError:
        return False
    return True


needs_modelopt = pytest.mark.skipif(
    not _has_modelopt(),
    reason="nvidia-modelopt (AutoCast) not installed: pip "
    "install nvidia-modelopt onnx-graphsurgeon lief polygraphy",
)


def test_build_fp32_engine_and_manifest(tiny_onnx, rtx, tmp_path):
    res = build_engine(
        tiny_onnx, BuildOptions(precision="fp32", out_dir=str(tmp_path), workspace_mb=256), trt=rtx
    )
    assert res.engine.name == f"tiny-fp32-aot-tensorrt-rtx{rtx.version}.plan"
    assert res.engine.stat().st_size > 10_000
    m = read_engine_manifest(res.manifest_path)
    raw = json.loads(res.manifest_path.read_text())
    # paths are stored relative to the manifest's folder and read back absolute
    assert (
        raw["onnx"]["source"] == raw["onnx"]["path"] == Path(os.path.relpath(tiny_onnx, tmp_path)).as_posix()
    )
    assert raw["out_dir"] == "." and m["out_dir"] == str(tmp_path)
    assert m["onnx"]["source"] == m["onnx"]["path"] == str(tiny_onnx.resolve())
    assert {k: v for k, v in m.items() if k not in ("onnx", "out_dir")} == {
        k: v for k, v in raw.items() if k not in ("onnx", "out_dir")
    }
    assert m["precision"] == "fp32"
    assert m["tensorrt"] == {"flavour": "tensorrt-rtx", "module": "tensorrt_rtx", "version": rtx.version}
    assert m["gpu"]["name"] == "AOT/CPU"
    assert m["gpu"]["target_compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"]
    assert m["onnx"]["sha256"] == sha256_file(tiny_onnx)
    assert m["engine_sha256"] == sha256_file(res.engine)
    assert m["builder_options"]["workspace_mb"] == 256
    assert m["builder_options"]["strongly_typed"] is True
    assert m["build_seconds"] > 0.0
    assert m["grid_shape"] == [8, 8, 8]
    assert [o["name"] for o in m["outputs"]] == ["warped", "flow"]
    assert "emorph build" in m["rebuild_command"] and "--precision fp32" in m["rebuild_command"]
    # no overwrite without --force, nothing else appears
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputExistsError):
        build_engine(tiny_onnx, BuildOptions(precision="fp32", out_dir=str(tmp_path)), trt=rtx)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    build_engine(tiny_onnx, BuildOptions(precision="fp32", out_dir=str(tmp_path), force=True), trt=rtx)


@needs_modelopt
def test_build_fp16_mixed_graph(tiny_onnx, rtx, tmp_path):
    import onnxruntime as ort

    from emorph_deploy.engines.fp16 import node_precisions
    from emorph_deploy.engines.graph import find_regions

    res = build_engine(tiny_onnx, BuildOptions(precision="fp16", out_dir=str(tmp_path)), trt=rtx)
    m = res.manifest
    assert m["precision"] == "fp16" and m["onnx"]["graph_precision"] == "fp16"
    fp16_onnx = tmp_path / "tiny-fp16.onnx"
    assert res.graph == fp16_onnx and fp16_onnx.is_file()
    assert json.loads(fp16_onnx.with_suffix(".json").read_text())["precision"] == "fp16"
    import onnx

    model = onnx.load(str(fp16_onnx))
    prec = node_precisions(model)
    regions = find_regions(model)
    ops = regions.op_types
    assert {prec[n] for n in ops if ops[n] in ("LayerNormalization", "Softmax") and n in prec} == {"fp32"}
    assert {prec[n] for n in regions.warp if n in prec} == {"fp32"}
    assert {prec[n] for n in regions.flow_head if n in prec} == {"fp32"}
    assert "fp16" in {prec[n] for n in ops if ops[n] in ("MatMul", "Conv") and n not in regions.flow_head}
    for io in [*model.graph.input, *model.graph.output]:
        assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    rng = np.random.default_rng(0)
    feed = {k: rng.random((1, 1, 8, 8, 8), dtype=np.float32) for k in ("moving", "fixed")}
    ref = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"]).run(["flow"], feed)[0]
    got = ort.InferenceSession(str(fp16_onnx), providers=["CPUExecutionProvider"]).run(["flow"], feed)[0]
    assert np.abs(got - ref).max() < 5e-3  # voxels


def test_build_int8_from_qdq(tiny_onnx, rtx, tmp_path):
    from emorph_deploy.calibration import calibrate

    cal = calibrate(tiny_onnx, synthetic=2, out_dir=tmp_path / "cal", progress=False, synthetic_kind="synth")
    res = build_engine(cal.qdq_onnx, BuildOptions(precision="int8", out_dir=str(tmp_path / "eng")), trt=rtx)
    m = res.manifest
    assert res.engine.name == f"tiny-int8-aot-tensorrt-rtx{rtx.version}.plan"
    assert m["precision"] == "int8" and m["onnx"]["graph_precision"] == "int8"
    assert m["calibration"]["method"] == "minmax" and m["calibration"]["n_pairs"] == 2
    # the FP32 export is refused for int8 with the fix named
    with pytest.raises(InputError, match="emorph calibrate"):
        build_engine(tiny_onnx, BuildOptions(precision="int8", out_dir=str(tmp_path / "eng2")), trt=rtx)


def test_unsupported_op_is_one_line_and_writes_nothing(rtx, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Unique", ["x"], ["y"], name="uniq")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    out = tmp_path / "engines"
    with pytest.raises(InputError) as err:
        build_engine(path, BuildOptions(out_dir=str(out)), trt=rtx)
    msg = str(err.value)
    assert "\n" not in msg and "node 0 'uniq' (Unique)" in msg and "fix:" in msg
    assert not out.exists() or list(out.iterdir()) == []


def test_grid_sample_5d_refused_on_old_tensorrt(rtx, tmp_path):
    import torch

    from emorph_deploy.engines.trt import TensorRT

    class GS(torch.nn.Module):
        def forward(self, moving, fixed):
            grid = fixed.permute(0, 2, 3, 4, 1).repeat(1, 1, 1, 1, 3) * 2 - 1
            return torch.nn.functional.grid_sample(moving, grid, align_corners=True)

    path = tmp_path / "gs.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            GS(),
            (torch.rand(1, 1, 4, 4, 4), torch.rand(1, 1, 4, 4, 4)),
            str(path),
            opset_version=20,
            dynamo=False,
            input_names=["moving", "fixed"],
            output_names=["warped"],
        )
    jetson = TensorRT(module=rtx.module, flavour="tensorrt", version="10.3.0.30")
    with pytest.raises(InputError, match="--grid-sample gather"):
        build_engine(path, BuildOptions(out_dir=str(tmp_path / "e")), trt=jetson)
    assert not (tmp_path / "e").exists()
    assert TensorRT(module=rtx.module, flavour="tensorrt", version="11.2.1").supports_grid_sample_5d


def test_missing_tensorrt_is_one_line(monkeypatch, tiny_onnx, tmp_path):
    from emorph_deploy.cli.app import app
    from emorph_deploy.engines import trt as trt_mod

    def fail(name):
        raise ImportError(f"No module named '{trt_mod.MODULES[name]}'")

    monkeypatch.setattr(trt_mod, "_import", fail)
    with pytest.raises(MissingDependencyError):
        trt_mod.load_tensorrt("auto")
    r = CliRunner().invoke(app, ["build", str(tiny_onnx), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: TensorRT is not installed") and "fix:" in lines[0]
    assert not (tmp_path / "e").exists()


def test_cli_build_fp32(tiny_onnx, rtx, tmp_path):
    from emorph_deploy.cli.app import app

    r = CliRunner().invoke(
        app,
        [
            "build",
            str(tiny_onnx),
            "--precision",
            "fp32",
            "--out",
            str(tmp_path),
            "--flavour",
            "tensorrt-rtx",
            "--workspace-mb",
            "128",
        ],
    )
    assert r.exit_code == 0, r.output
    plans = list(tmp_path.glob("*.plan"))
    assert len(plans) == 1 and re.fullmatch(r"tiny-fp32-aot-tensorrt-rtx[\d.]+\.plan", plans[0].name)
    r2 = CliRunner().invoke(app, ["build", str(tiny_onnx), "--out", str(tmp_path)])
    assert r2.exit_code == 2 and "--force" in r2.output
    r3 = CliRunner().invoke(app, ["build", str(tmp_path / "missing.onnx"), "--out", str(tmp_path)])
    assert r3.exit_code == 2 and r3.output.startswith("error: ONNX")


def test_cli_int8_with_synthetic_calibration(tiny_onnx, rtx, tmp_path):
    from emorph_deploy.cli.app import app

    eng, cal = tmp_path / "engines", tmp_path / "calibration"
    args = ["build", str(tiny_onnx), "--precision", "int8", "--out", str(eng), "--calibration-out", str(cal)]
    r = CliRunner().invoke(app, [*args, "--calibrate-synthetic", "2"])
    assert r.exit_code == 0, r.output
    assert (cal / "tiny-int8.onnx").is_file() and len(list(eng.glob("tiny-int8-aot-*.plan"))) == 1
    meta = json.loads(next(eng.glob("tiny-int8-aot-*.json")).read_text())
    assert meta["calibration"]["n_pairs"] == 2
    assert meta["onnx"]["source"] == "../calibration/tiny-int8.onnx"  # relative to the engine manifest
    # --calibration given a QDQ graph of another export is refused
    qmeta = json.loads((cal / "tiny-int8.json").read_text())
    qmeta["derived_from"]["sha256"] = "0" * 64
    (cal / "tiny-int8.json").write_text(json.dumps(qmeta))
    r2 = CliRunner().invoke(app, [*args, "--calibration", str(cal / "tiny-int8.onnx"), "--force"])
    assert r2.exit_code == 2 and "expected a QDQ graph calibrated from" in r2.output
    # ... and one calibrated from this export (the source's hash from the same read as its precision) is built
    qmeta["derived_from"]["sha256"] = sha256_file(tiny_onnx)
    (cal / "tiny-int8.json").write_text(json.dumps(qmeta))
    r4 = CliRunner().invoke(app, [*args, "--calibration", str(cal / "tiny-int8.onnx"), "--force"])
    assert r4.exit_code == 0, r4.output
    r3 = CliRunner().invoke(app, ["build", str(tiny_onnx), "-p", "fp32", "--calibrate-synthetic", "2"])
    assert r3.exit_code == 2 and "--precision int8" in r3.output


def test_fp16_flag_mode_pins_fp32_layers_and_is_refused_on_strongly_typed(tiny_onnx, rtx, tmp_path):
    """TensorRT 10.x path (BuilderFlag.FP16 + per-layer FP32), checked against a stand-in network."""
    from types import SimpleNamespace

    from emorph_deploy.engines.builder import _apply_fp16_flag
    from emorph_deploy.engines.trt import TensorRT

    with pytest.raises(InputError, match="--fp16-mode graph"):
        build_engine(
            tiny_onnx, BuildOptions(precision="fp16", fp16_mode="flag", out_dir=str(tmp_path)), trt=rtx
        )
    f32, f16, i64 = "f32", "f16", "i64"

    class Layer:
        def __init__(self, name, out, dtype):
            self.name, self.num_outputs, self.precision, self.types = name, 1, None, {}
            self._out = SimpleNamespace(name=out, dtype=dtype)

        def get_output(self, k):
            return self._out

        def set_output_type(self, k, t):
            self.types[k] = t

    layers = [
        Layer("/norm/LayerNormalization", "ln", f32),
        Layer("/qkv/MatMul", "qkv", f32),
        Layer("Floor_3", "fl", f32),
        Layer("Cast_7", "idx", i64),
        Layer("/Softmax", "sm", f32),
    ]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: layers[i])
    flags = []
    config = SimpleNamespace(set_flag=flags.append)
    mod = SimpleNamespace(
        BuilderFlag=SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY"), float32=f32, float16=f16
    )
    fake = TensorRT(module=mod, flavour="tensorrt", version="10.3.0.30")
    keep = {"/norm/LayerNormalization", "Floor_3", "Cast_7", "/Softmax"}
    assert _apply_fp16_flag(fake, network, config, keep, set()) == 3
    assert flags == ["FP16", "OBEY"]
    assert [ly.precision for ly in layers] == [f32, None, f32, None, f32]
    assert layers[0].types == {0: f32} and layers[3].types == {}


def test_moved_folder_keeps_engine_manifest_paths(tiny_onnx, rtx, tmp_path):
    """The ONNX and the engine built from it, moved together to another place: the engine manifest's paths
    (stored relative to it) lead to the moved files; an older manifest's absolute paths are still read."""
    project = tmp_path / "project"
    shutil.copytree(tiny_onnx.parent, project / "export")
    onnx_path = project / "export" / tiny_onnx.name
    res = build_engine(onnx_path, BuildOptions(precision="fp32", out_dir=str(project / "engines")), trt=rtx)
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(project, moved)
    manifest = moved / "engines" / res.manifest_path.name
    m = read_engine_manifest(manifest)
    assert (
        m["onnx"]["source"] == str(moved / "export" / tiny_onnx.name) and Path(m["onnx"]["source"]).is_file()
    )
    assert m["out_dir"] == str(moved / "engines")
    assert sha256_file(m["onnx"]["path"]) == m["onnx"]["sha256"]
    from emorph_deploy.engines.manifest import rebuild_command

    assert str(moved / "export" / tiny_onnx.name) in rebuild_command(m)
    raw = json.loads(manifest.read_text())
    raw["onnx"]["source"] = str(moved / "export" / tiny_onnx.name)  # as older versions wrote it
    manifest.write_text(json.dumps(raw))
    assert read_engine_manifest(manifest)["onnx"]["source"] == raw["onnx"]["source"]
