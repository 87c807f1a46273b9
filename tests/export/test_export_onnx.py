"""Checkpoint → ONNX: parity with torch, TensorRT op set, opsets, manifest, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emorph_deploy.errors import InputError, OutputExistsError, ProcessingError

onnx = pytest.importorskip("onnx", reason="onnx extra not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime not installed")

GRID = (24, 32, 40)  # the grid of the tiny checkpoint in conftest.py


FP32_MAX_DFLOW = 1e-3  # voxels: the fp32 tolerance of emorph check


def _opset(model) -> int:
    return next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))


@pytest.fixture(scope="module")
def torch_ref(tiny_ckpt, feed):
    from emorph_deploy.runners import TorchRunner

    return TorchRunner(tiny_ckpt).infer(feed)


@pytest.mark.parametrize("mode", ["gather", "native"])
def test_onnxruntime_matches_torch(mode, exports, feed, torch_ref):
    from emorph_deploy.runners import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(exports[mode], threads=1, providers="cpu")
    out = runner.infer(feed)
    ref_norm = np.sqrt((torch_ref["flow"] ** 2).sum(axis=1)).max()
    assert ref_norm > 0.5, "reference flow too small for a meaningful parity test"
    dflow = np.sqrt(((out["flow"].astype(np.float64) - torch_ref["flow"]) ** 2).sum(axis=1))
    assert dflow.max() <= FP32_MAX_DFLOW
    assert np.abs(out["warped"] - torch_ref["warped"]).max() <= 1e-4
    assert out["flow"].shape == (1, 3, *GRID) and out["warped"].shape == (1, 1, *GRID)


def test_gather_graph_is_tensorrt_clean_opset17(exports):
    from emorph_deploy.export import supported_ops

    model = onnx.load(str(exports["gather"]))
    ops = {n.op_type for n in model.graph.node}
    assert "GridSample" not in ops
    assert ops <= supported_ops(), f"not on the TensorRT list: {sorted(ops - supported_ops())}"
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert _opset(model) == 17
    onnx.checker.check_model(model, full_check=True)


def test_native_graph_has_5d_gridsample_at_opset20(exports):
    from emorph_deploy.export import tensorrt_op_report

    model = onnx.load(str(exports["native"]))
    assert "GridSample" in {n.op_type for n in model.graph.node}
    assert _opset(model) == 20
    report = tensorrt_op_report(onnx.shape_inference.infer_shapes(model))
    assert report.unsupported == ("GridSample",)
    assert "11.2" in report.reasons["GridSample"]
    assert tensorrt_op_report(onnx.shape_inference.infer_shapes(model), trt_version="11.2").ok


def test_manifest_content_and_hashes(exports, tiny_ckpt):
    from emorph_deploy import __version__
    from emorph_deploy.export import read_manifest
    from emorph_deploy.fileio import sha256_file

    for mode, path in exports.items():
        meta = read_manifest(path.with_suffix(".json"))
        assert meta["format"] == "emorph-onnx/1"
        assert meta["grid_sample"] == mode
        assert meta["opset"] == {"gather": 17, "native": 20}[mode]
        assert meta["target"] == {"gather": "tensorrt", "native": "onnxruntime"}[mode]
        assert meta["exporter"].startswith("torch.onnx.export(dynamo=False)")
        assert meta["grid_shape"] == list(GRID)
        assert meta["spacing_mm"] == [1.5, 1.0, 2.0]
        assert meta["orientation"] == "RAS"
        assert meta["precision"] == "fp32"
        assert meta["preprocessing"]["grid_shape"] == list(GRID)
        assert meta["model"]["img_size"] == list(GRID)
        assert meta["model"]["warp_sampler"] == {"gather": "gather", "native": "grid_sample"}[mode]
        assert meta["inputs"] == [
            {"name": n, "shape": [1, 1, *GRID], "dtype": "float32"} for n in ("moving", "fixed")
        ]
        assert meta["outputs"] == [
            {"name": "flow", "shape": [1, 3, *GRID], "dtype": "float32"},
            {"name": "warped", "shape": [1, 1, *GRID], "dtype": "float32"},
        ]
        assert meta["sha256_onnx"] == sha256_file(path)
        assert meta["sha256_weights"] == sha256_file(tiny_ckpt)
        assert meta["package_version"] == __version__
        assert Path(meta["source_checkpoint"]) == tiny_ckpt.with_suffix(".json").resolve()
        assert meta["tensorrt_check"]["ok"] is (mode == "gather")


def test_flow_only_output(tiny_ckpt, tmp_path, feed, torch_ref):
    from emorph_deploy.export import onnx_from_checkpoint
    from emorph_deploy.runners import load_runner

    path = onnx_from_checkpoint(tiny_ckpt, tmp_path / "f.onnx", grid_sample="native", outputs="flow")
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output] == ["flow"]
    runner = load_runner(path)
    assert runner.output_names == ("flow",)
    out = runner.infer(feed)
    assert set(out) == {"flow"}
    assert np.abs(out["flow"] - torch_ref["flow"]).max() <= FP32_MAX_DFLOW


def test_trt_check_names_offending_op():
    from onnx import TensorProto, helper

    from emorph_deploy.export import check_tensorrt_ops

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    graph = helper.make_graph([helper.make_node("Unique", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ProcessingError, match="Unique"):
        check_tensorrt_ops(model)


def test_native_for_tensorrt_is_refused_before_work(tiny_ckpt, tmp_path):
    from emorph_deploy.export import onnx_from_checkpoint

    with pytest.raises(InputError, match=r"11\.2"):
        onnx_from_checkpoint(tiny_ckpt, tmp_path / "n.onnx", grid_sample="native", target="tensorrt")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(exports, tiny_ckpt):
    from emorph_deploy.export import onnx_from_checkpoint

    path = exports["gather"]
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        onnx_from_checkpoint(tiny_ckpt, path, grid_sample="gather")
    assert path.read_bytes() == before


def test_failure_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import emorph_deploy.export.loaders as loaders

    def boom(model):
        raise ProcessingError("simulated failure")

    monkeypatch.setattr(loaders, "simplify_onnx", boom)
    with pytest.raises(ProcessingError, match="simulated"):
        loaders.onnx_from_checkpoint(tiny_ckpt, tmp_path / "x.onnx", grid_sample="native")
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint_is_input_error(tmp_path):
    from emorph_deploy.export import onnx_from_checkpoint

    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError):
        onnx_from_checkpoint(tmp_path / "bad.safetensors", tmp_path / "out" / "x.onnx")
    assert not (tmp_path / "out" / "x.onnx").exists()
    with pytest.raises(InputError, match="not found"):
        onnx_from_checkpoint(tmp_path / "missing.safetensors", tmp_path / "out" / "x.onnx")


def test_export_leaves_every_module_mode_as_it_was(tmp_path):
    """torch.onnx.export re-applies the top-level module's mode recursively afterwards; a fresh wrapper is in
    training mode, which used to leave the exported model with DropPath active for the caller's next call."""
    import torch

    from emorph_deploy.export.loaders import ExportWrapper, torch_to_onnx
    from emorph_deploy.models import create_model

    torch.manual_seed(0)
    model = create_model(
        "em-23-hires",
        img_size=(16, 16, 16),
        embed_dims=(8, 16),
        heads=(2, 2),
        patch_dim=4,
        decoder_widths=(8, 8),
        skip_width=4,
        drop_path=0.5,
    ).eval()
    model.stage0[0].train()  # a mixed state must come back exactly, too
    before = {name: m.training for name, m in model.named_modules()}
    wrapper = ExportWrapper(model, ("flow",))
    assert wrapper.training is False  # mirrors the wrapped model's top-level mode
    torch_to_onnx(wrapper, (16, 16, 16), tmp_path / "m.onnx", 17, ("flow",))
    assert {name: m.training for name, m in model.named_modules()} == before
    model.eval()
    m, f = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    with torch.inference_mode():
        a, b = model(m, f)[1], model(m, f)[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("cascade", [{}, {"cascade_width": 4}])
def test_warped_input_full_res_stage_exports_tensorrt_clean(tmp_path, feed, tiny_overrides, cascade):
    """A model whose full-resolution stage sees the moving image warped by the D/2 flow (a second warp in
    the graph), also with a cascade stage after it (a third), exports at opset 17 without GridSample, and
    ONNX Runtime matches torch."""
    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.export import onnx_from_checkpoint, supported_ops
    from emorph_deploy.models import create_model
    from emorph_deploy.runners import OnnxRuntimeRunner, TorchRunner
    from emorph_deploy.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model(
        "em-11-hires", **tiny_overrides, full_res_width=4, full_res_input="warped", **cascade
    )
    with torch.no_grad():
        model.full_res.head.weight.normal_(0, 0.05)  # a stage that changes the flow
        if model.cascade is not None:
            model.cascade.head.weight.normal_(0, 0.05)
    pre = Preprocessing(grid_shape=GRID, spacing_mm=(1.5, 1.0, 2.0))
    ckpt = Path(save_checkpoint(model, tmp_path / "frw", preprocessing=pre).weights)
    onnx_path = onnx_from_checkpoint(ckpt, tmp_path / "export" / "frw.onnx", grid_sample="gather")
    graph = onnx.load(str(onnx_path))
    ops = {n.op_type for n in graph.graph.node}
    assert "GridSample" not in ops and ops <= supported_ops() and _opset(graph) == 17
    ref = TorchRunner(ckpt).infer(feed)
    out = OnnxRuntimeRunner(onnx_path, threads=1, providers="cpu").infer(feed)
    dflow = np.sqrt(((out["flow"].astype(np.float64) - ref["flow"]) ** 2).sum(axis=1))
    assert np.sqrt((ref["flow"] ** 2).sum(axis=1)).max() > 0.5 and dflow.max() <= FP32_MAX_DFLOW
