"""ONNX graphs read back for build and calibration: one read per graph, precision, I/O, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emorph_deploy.errors import InputError

onnx = pytest.importorskip("onnx", reason="onnx extra not installed")


def _graph(nodes, inputs, outputs, initializers=()):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape, elem=None):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, elem or TensorProto.FLOAT, shape)


def test_load_onnx_hashed_matches_onnx_load(tiny_onnx, tmp_path):
    """Same model as ``onnx.load``, same hash as ``sha256_file``, one-line errors; external-data graphs load
    their tensors as ``onnx.load`` does."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from emorph_deploy.export.onnx_io import load_onnx, load_onnx_hashed
    from emorph_deploy.fileio import sha256_file

    model, sha = load_onnx_hashed(Path(tiny_onnx))
    assert sha == sha256_file(tiny_onnx)
    assert model.SerializeToString() == onnx.load(str(tiny_onnx)).SerializeToString()
    assert load_onnx(Path(tiny_onnx)).SerializeToString() == model.SerializeToString()
    ext = tmp_path / "ext" / "tiny.onnx"
    ext.parent.mkdir()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    onnx.save(model, str(ext), save_as_external_data=True, location="tiny.onnx.data", size_threshold=0)
    ext_model, ext_sha = load_onnx_hashed(ext)
    assert ext_sha == sha256_file(ext)
    assert ext_model.SerializeToString() == onnx.load(str(ext)).SerializeToString()
    assert not any(uses_external_data(t) for t in ext_model.graph.initializer)
    assert {t.name for t in ext_model.graph.initializer} == set(weights)
    for t in ext_model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), weights[t.name])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx graph")
    for bad, msg in ((tmp_path / "missing.onnx", "not found"), (corrupt, "cannot be read")):
        with pytest.raises(InputError, match=msg) as err:
            load_onnx(bad)
        assert "fix:" in str(err.value) and "\n" not in str(err.value)


def test_graph_precision_from_qdq_nodes_fp16_initializers_and_casts(tiny_onnx):
    from onnx import TensorProto, helper, numpy_helper

    from emorph_deploy.export.onnx_io import graph_precision, load_onnx

    assert graph_precision(load_onnx(Path(tiny_onnx))) == "fp32"
    x, y = [_vi("x", [4])], [_vi("y", [4])]
    scale = numpy_helper.from_array(np.float32(0.1), "s")
    qdq = _graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
        ],
        x,
        y,
        [scale],
    )
    assert graph_precision(qdq) == "int8"
    half = numpy_helper.from_array(np.ones(4, np.float16), "w")
    fp16_init = _graph([helper.make_node("Add", ["x", "w"], ["y"])], x, y, [half])
    assert graph_precision(fp16_init) == "fp16"
    cast = _graph(
        [
            helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT),
        ],
        x,
        y,
    )
    assert graph_precision(cast) == "fp16"


def test_io_spec_skips_initializers_and_keeps_symbolic_dims():
    from onnx import TensorProto, helper, numpy_helper

    from emorph_deploy.export.onnx_io import io_spec

    w = numpy_helper.from_array(np.ones((1, 1, 2, 2, 2), np.float32), "w")
    model = _graph(
        [helper.make_node("Add", ["moving", "w"], ["flow"])],
        [_vi("moving", ["batch", 1, 2, 2, 2]), _vi("w", [1, 1, 2, 2, 2])],
        [_vi("flow", [None, 1, 2, 2, 2], TensorProto.FLOAT)],
        [w],
    )
    inputs, outputs = io_spec(model)
    assert inputs == [{"name": "moving", "shape": ["batch", 1, 2, 2, 2], "dtype": "float32"}]
    assert outputs == [{"name": "flow", "shape": [-1, 1, 2, 2, 2], "dtype": "float32"}]


def test_read_onnx_manifest_beside_the_graph(tiny_onnx, tmp_path):
    from emorph_deploy.export.onnx_io import read_onnx_manifest

    meta = read_onnx_manifest(Path(tiny_onnx))
    assert meta == json.loads(Path(tiny_onnx).with_suffix(".json").read_text())
    assert read_onnx_manifest(tmp_path / "no-manifest.onnx") is None
    foreign = tmp_path / "foreign.onnx"
    foreign.with_suffix(".json").write_text(json.dumps({"format": "emorph-engine/1"}))
    with pytest.raises(InputError, match="ONNX manifest") as err:
        read_onnx_manifest(foreign)
    assert "fix:" in str(err.value)


def test_derived_onnx_manifest_keeps_the_source_and_records_provenance(tiny_onnx):
    from emorph_deploy.export.onnx_io import (
        derived_onnx_manifest,
        io_spec,
        load_onnx_hashed,
        read_onnx_manifest,
    )

    src = Path(tiny_onnx)
    model, sha = load_onnx_hashed(src)
    meta = read_onnx_manifest(src)
    out = derived_onnx_manifest(
        meta,
        model,
        name="other",
        precision="int8",
        graph_sha="ab" * 32,
        source=src,
        source_sha=sha,
        extra={"k": 1},
    )
    assert out["name"] == meta["name"] and out["preprocessing"] == meta["preprocessing"]
    assert out["precision"] == "int8" and out["sha256_onnx"] == "ab" * 32 and out["extra"] == {"k": 1}
    assert out["derived_from"] == {"onnx": str(src.resolve()), "sha256": sha}
    assert meta["precision"] == "fp32"  # the source manifest is not modified
    bare = derived_onnx_manifest(
        None, model, name="tiny", precision="fp16", graph_sha="cd" * 32, source=src, source_sha=sha
    )
    assert bare["format"] == "emorph-onnx/1" and bare["name"] == "tiny" and bare["model"] is None
    assert (bare["inputs"], bare["outputs"]) == io_spec(model)
    assert bare["grid_shape"] == [8, 8, 8]
