"""emorph calibrate: QDQ graphs in the form TensorRT accepts, saved records, bad calibration lists."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from emorph_deploy.calibration import QuantizeOptions, calibrate, inspect_qdq
from emorph_deploy.errors import InputError


def _nifti(path, shape=(10, 9, 8), seed=0):
    import nibabel as nib

    rng = np.random.default_rng(seed)
    data = rng.random(shape).astype(np.float32) * 100
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.0, 1.1, 1.0])), str(path))
    return path


def _onnx_facts(path):
    import onnx
    from onnx import numpy_helper

    from emorph_deploy.engines.graph import find_regions, name_nodes

    model = name_nodes(onnx.load(str(path)))
    return model, find_regions(model), numpy_helper


@pytest.fixture(scope="module")
def qdq_default(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal")
    return calibrate(tiny_onnx, synthetic=3, synthetic_kind="synth", out_dir=out, progress=False)


def test_qdq_graph_properties(qdq_default):
    import onnx

    model, regions, numpy_helper = _onnx_facts(qdq_default.qdq_onnx)
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}
    values = {**inits, **consts}
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    for n in q + dq:  # signed int8, symmetric
        zp = values[n.input[2]]
        assert zp.dtype == np.int8 and not np.any(zp)
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    quantized = set()
    for n in dq:
        for c in consumers.get(n.output[0], []):
            quantized.add(c.name)
            idx = list(c.input).index(n.output[0])
            assert idx in (0, 1), f"{c.name}: bias input {idx} is quantized"
        if n.input[0] in inits:  # weight: int8, per output channel
            w = inits[n.input[0]]
            assert w.dtype == np.int8
            assert values[n.input[1]].size > 1
    ops = {n.name: n.op_type for n in g.node}
    assert {ops[n] for n in quantized} <= {"Conv", "MatMul", "Gemm"}
    assert not quantized & regions.warp
    assert not quantized & regions.input_convs and regions.input_convs  # first conv found and unquantized
    assert any(ops[n] == "Conv" for n in quantized) and any(ops[n] == "MatMul" for n in quantized)
    for n in q:  # the raw images are never rounded
        assert n.input[0] not in ("moving", "fixed")
    # the moving image reaches the warp's gathers through FP32 ops only
    prod = {o: n for n in g.node for o in n.output}

    def upstream_has_q(t, seen=None):
        seen = seen if seen is not None else set()
        if t in seen or t not in prod:
            return False
        seen.add(t)
        node = prod[t]
        return node.op_type in ("QuantizeLinear", "DequantizeLinear") or any(
            upstream_has_q(i, seen) for i in node.input
        )

    gathers = [n for n in g.node if n.op_type == "GatherElements" and n.name in regions.warp]
    assert gathers and not any(upstream_has_q(n.input[0]) for n in gathers)
    report = inspect_qdq(model)
    assert report["problems"] == []
    assert onnx.TensorProto.UINT8 not in {t.data_type for t in g.initializer}


def test_saved_records(qdq_default, tiny_onnx):
    paths = {p.name: p for p in qdq_default.files}
    assert set(paths) == {
        "tiny-int8.onnx",
        "tiny-int8.json",
        "tiny-int8-pairs.csv",
        "tiny-int8-stats.json",
        "tiny-int8.cache",
    }
    rows = list(csv.reader(paths["tiny-int8-pairs.csv"].read_text().splitlines()))
    assert (
        rows[0] == ["moving", "fixed"]
        and len(rows) == 4
        and rows[1][0].startswith("synthetic:synth:seed=0:0")
    )
    stats = json.loads(paths["tiny-int8-stats.json"].read_text())
    assert stats["n_pairs"] == 3 and stats["options"]["method"] == "minmax"
    assert stats["activations"] and all(
        v["scale"] > 0 and abs(v["amax"] - 127 * v["scale"]) < 1e-6 for v in stats["activations"].values()
    )
    meta = json.loads(paths["tiny-int8.json"].read_text())
    assert meta["format"] == "emorph-onnx/1" and meta["precision"] == "int8" and meta["name"] == "tiny"
    assert meta["preprocessing"]["grid_shape"] == [8, 8, 8]
    from emorph_deploy.fileio import sha256_file

    assert meta["sha256_onnx"] == sha256_file(qdq_default.qdq_onnx)
    assert meta["derived_from"]["sha256"] == sha256_file(tiny_onnx)
    assert paths["tiny-int8.cache"].read_text().splitlines()[0].startswith("TRT-")
    # the QDQ graph runs in ONNX Runtime (Q/DQ semantics: basic optimisation, no fused int8 kernels) close to
    # FP32
    import onnxruntime as ort

    from emorph_deploy.calibration.pairs import synthetic_pair

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    feed = synthetic_pair((8, 8, 8), seed=99, index=0, kind="synth")
    ref = ort.InferenceSession(str(tiny_onnx), so, providers=["CPUExecutionProvider"]).run(["flow"], feed)[0]
    got = ort.InferenceSession(str(qdq_default.qdq_onnx), so, providers=["CPUExecutionProvider"]).run(
        ["flow"], feed
    )[0]
    assert np.abs(got - ref).mean() < 0.03 * np.abs(ref).mean()  # measured 0.6 % (flow relative mean abs)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_other_methods_and_linear_only(tiny_onnx, tmp_path, method):
    opts = QuantizeOptions(method=method, op_types=("Conv", "LinearMatMul"))
    res = calibrate(
        tiny_onnx, synthetic=2, synthetic_kind="synth", options=opts, out_dir=tmp_path, progress=False
    )
    _, regions, _ = _onnx_facts(res.qdq_onnx)
    ops = regions.op_types
    attn = [n for n in res.report["quantized_nodes"] if ops.get(n) == "MatMul"]
    assert attn and all(n.endswith(("qkv/MatMul", "proj/MatMul")) for n in attn)  # weights only, no q@k, a@v
    assert res.report["options"]["method"] == method


def test_csv_pairs_cli(tiny_onnx, tmp_path):
    from emorph_deploy.cli.app import app

    for i in range(2):
        _nifti(tmp_path / f"m{i}.nii.gz", seed=i)
        _nifti(tmp_path / f"f{i}.nii.gz", seed=10 + i)
    lst = tmp_path / "pairs.csv"
    lst.write_text("moving,fixed\nm0.nii.gz,f0.nii.gz\nm1.nii.gz,f1.nii.gz\n")
    out = tmp_path / "calibration"
    r = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(tiny_onnx),
            "--pairs",
            str(lst),
            "--out",
            str(out),
            "--no-progress",
            "--method",
            "minmax",
        ],
    )
    assert r.exit_code == 0, r.output
    stats = json.loads((out / "tiny-int8-stats.json").read_text())
    assert stats["n_pairs"] == 2 and stats["pairs_source"].endswith("pairs.csv")
    rows = (out / "tiny-int8-pairs.csv").read_text().splitlines()
    assert rows[1].split(",")[0].endswith("m0.nii.gz")


def test_bad_calibration_lists(tiny_onnx, tmp_path):
    from emorph_deploy.cli.app import app

    _nifti(tmp_path / "ok.nii.gz")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ones((5, 5), np.float32), np.eye(4)), str(tmp_path / "flat2d.nii.gz"))
    out = tmp_path / "calibration"
    cases = {
        "unreadable": "ok.nii.gz,corrupt.nii.gz\n",
        "missing": "ok.nii.gz,nowhere.nii.gz\n",
        "mismatched": "ok.nii.gz,ok.nii.gz\nflat2d.nii.gz,ok.nii.gz\n",
        "columns": "ok.nii.gz\n",
    }
    for key, text in cases.items():
        lst = tmp_path / f"{key}.csv"
        lst.write_text(text)
        r = CliRunner().invoke(
            app, ["calibrate", str(tiny_onnx), "--pairs", str(lst), "--out", str(out), "--no-progress"]
        )
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2, (key, r.output)
        assert lines[-1].startswith(("error: calibration list", "error: CSV")), (key, lines)
        assert f"{lst} line " in lines[-1], (key, lines)
        assert not out.exists() or list(out.iterdir()) == [], key
    with pytest.raises(InputError, match="exactly one of"):
        calibrate(tiny_onnx, out_dir=out)


def test_grid_mismatch_between_manifest_and_graph(tiny_onnx, tmp_path):
    import shutil

    from emorph_deploy.errors import ConfigMismatchError

    onnx_copy = tmp_path / "tiny.onnx"
    shutil.copy(tiny_onnx, onnx_copy)
    meta = json.loads(tiny_onnx.with_suffix(".json").read_text())
    meta["preprocessing"]["grid_shape"] = [16, 16, 16]
    onnx_copy.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ConfigMismatchError, match="preprocessing grid"):
        calibrate(onnx_copy, synthetic=1, out_dir=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists() or list((tmp_path / "c").iterdir()) == []


def test_modelopt_quantizer(tiny_onnx, tmp_path):
    pytest.importorskip(
        "modelopt.onnx.quantization",
        reason="nvidia-modelopt not installed: pip install nvidia-modelopt onnx-graphsurgeon lief",
    )
    opts = QuantizeOptions(quantizer="modelopt")
    res = calibrate(
        tiny_onnx, synthetic=2, synthetic_kind="synth", options=opts, out_dir=tmp_path, progress=False
    )
    model, regions, _ = _onnx_facts(res.qdq_onnx)
    assert res.report["quantizer"] == "modelopt"
    assert inspect_qdq(model)["problems"] == []
    assert not set(res.report["quantized_nodes"]) & (regions.warp | regions.input_convs)


def test_qdq_graph_carries_the_source_metadata(qdq_default, tiny_onnx):
    """The QDQ graph embeds the source manifest's model config and preprocessing (its own manifest may be
    lost): the manifest rebuilt from the graph alone matches them."""
    import onnx

    from emorph_deploy.export.onnx_io import manifest_from_metadata

    source = json.loads(tiny_onnx.with_suffix(".json").read_text())
    meta = manifest_from_metadata(onnx.load(str(qdq_default.qdq_onnx)))
    assert meta is not None and meta["precision"] == "int8"
    assert meta["model"] == source["model"] and meta["preprocessing"] == source["preprocessing"]
