"""An exported graph carries its model config and preprocessing in ``metadata_props`` (``emorph.*`` keys), so
the runners still open it when the sidecar manifest ``.json`` is lost."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the export writes ONNX")


def test_export_embeds_model_and_preprocessing(exports):
    for mode, path in exports.items():
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        manifest = json.loads(path.with_suffix(".json").read_text())
        assert props["emorph.format"] == "emorph-onnx/1"
        assert json.loads(props["emorph.model"]) == manifest["model"]
        assert json.loads(props["emorph.preprocessing"]) == manifest["preprocessing"]
        assert props["emorph.grid_sample"] == mode and props["emorph.name"] == path.stem


def test_runner_falls_back_to_metadata_without_the_json(exports, feed, tmp_path):
    from emorph_deploy.export.onnx_io import read_onnx_manifest
    from emorph_deploy.runners.onnxruntime import OnnxRuntimeRunner

    src = exports["gather"]
    lone = tmp_path / "lone.onnx"
    shutil.copy(src, lone)
    manifest = json.loads(src.with_suffix(".json").read_text())
    model = onnx.load(str(lone))
    assert read_onnx_manifest(lone) is None  # nothing beside it and no graph given
    rebuilt = read_onnx_manifest(lone, model)
    for key in ("format", "name", "model", "preprocessing", "grid_shape", "spacing_mm", "orientation"):
        assert rebuilt[key] == manifest[key], key
    assert rebuilt["inputs"] == manifest["inputs"] and rebuilt["outputs"] == manifest["outputs"]
    assert rebuilt["precision"] == "fp32" and rebuilt["manifest"] == "onnx metadata_props"

    with_json = OnnxRuntimeRunner(src, providers="cpu", threads=1)
    without = OnnxRuntimeRunner(lone, providers="cpu", threads=1)
    assert without.meta["preprocessing"] == manifest["preprocessing"]
    assert without.grid_shape == with_json.grid_shape
    a, b = with_json.infer(feed), without.infer(feed)
    np.testing.assert_array_equal(a["flow"], b["flow"])


def test_graph_without_metadata_or_json_is_one_line_input_error(exports, tmp_path):
    from emorph_deploy.errors import InputError
    from emorph_deploy.runners.onnxruntime import OnnxRuntimeRunner

    model = onnx.load(str(exports["gather"]))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(InputError, match="manifest") as exc:
        OnnxRuntimeRunner(bare, providers="cpu")
    assert "\n" not in str(exc.value)


def test_embed_replaces_earlier_emorph_keys_and_keeps_others():
    from emorph_deploy.export.onnx_io import embed_metadata, manifest_from_metadata

    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["moving"], ["flow"])],
            "g",
            [onnx.helper.make_tensor_value_info("moving", onnx.TensorProto.FLOAT, [1, 1, 4, 5, 6])],
            [onnx.helper.make_tensor_value_info("flow", onnx.TensorProto.FLOAT, [1, 1, 4, 5, 6])],
        )
    )
    onnx.helper.set_model_props(model, {"author": "someone", "emorph.name": "old"})
    assert manifest_from_metadata(model) is None  # no emorph.format: not an emorph export
    embed_metadata(
        model, {"format": "emorph-onnx/1", "name": "new", "model": {"a": 1}, "preprocessing": None}
    )
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {
        "author": "someone",
        "emorph.name": "new",
        "emorph.format": "emorph-onnx/1",
        "emorph.model": '{"a": 1}',
    }
    meta = manifest_from_metadata(model)
    assert meta["model"] == {"a": 1} and meta["grid_shape"] == [4, 5, 6] and "preprocessing" not in meta
