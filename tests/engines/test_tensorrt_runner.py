"""TensorRT runner: manifest checks (no GPU needed) and GPU execution (marked gpu, skipped without one)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emorph_deploy.engines import BuildOptions, build_engine, check_compatible, read_engine_manifest
from emorph_deploy.engines.manifest import rebuild_command
from emorph_deploy.engines.trt import GpuInfo, detect_gpu
from emorph_deploy.errors import ConfigMismatchError, MissingDependencyError


@pytest.fixture(scope="module")
def tiny_engine(tiny_onnx, rtx, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng")
    return build_engine(tiny_onnx, BuildOptions(precision="fp32", out_dir=str(out)), trt=rtx)


def test_engine_from_other_tensorrt_version_is_refused_with_rebuild_command(tiny_engine, tmp_path):
    from emorph_deploy.runners.tensorrt import TensorRTRunner

    plan = tmp_path / "old.plan"
    plan.write_bytes(tiny_engine.engine.read_bytes())
    meta = json.loads(tiny_engine.manifest_path.read_text())
    meta["tensorrt"]["version"] = "1.0.0.21"
    plan.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ConfigMismatchError) as err:
        TensorRTRunner(plan)
    msg = str(err.value)
    assert "\n" not in msg and "1.0.0.21" in msg
    # the manifest moved alone: its relative ONNX path is found from where it was written, and the rebuild
    # command writes into the engine's folder now
    rebuild = rebuild_command(read_engine_manifest(plan.with_suffix(".json")))
    assert f"'{rebuild}'" in msg
    assert rebuild.startswith("emorph build ") and "--force" in rebuild and f"--out {tmp_path}" in rebuild
    assert str(tiny_engine.manifest["onnx"]["source"]) in rebuild


def test_engine_for_other_gpu_is_refused(tiny_engine):
    meta = tiny_engine.manifest
    t = meta["tensorrt"]
    check_compatible(meta, t["flavour"], t["version"], GpuInfo("NVIDIA GeForce RTX 4090", "8.9"))
    with pytest.raises(ConfigMismatchError, match="compute capability"):
        check_compatible(meta, t["flavour"], t["version"], GpuInfo("NVIDIA GeForce GTX 1080", "6.1"))
    full = dict(
        meta,
        tensorrt={"flavour": "tensorrt", "module": "tensorrt", "version": "10.3.0.30"},
        gpu={"name": "Orin", "compute_capability": "8.7"},
    )
    check_compatible(full, "tensorrt", "10.3.0.30", GpuInfo("Orin", "8.7"))
    with pytest.raises(ConfigMismatchError, match="emorph build"):
        check_compatible(full, "tensorrt", "10.3.0.30", GpuInfo("NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(ConfigMismatchError, match=r"10\.3\.0\.30"):
        check_compatible(full, "tensorrt", "10.8.0.43", GpuInfo("Orin", "8.7"))


def test_corrupt_engine_and_missing_gpu(tiny_engine, tmp_path):
    from emorph_deploy.runners import load_runner
    from emorph_deploy.runners.tensorrt import TensorRTRunner

    plan = tmp_path / "x.plan"
    plan.write_bytes(tiny_engine.engine.read_bytes()[:-10] + b"0123456789")
    plan.with_suffix(".json").write_text(tiny_engine.manifest_path.read_text())
    with pytest.raises(ConfigMismatchError, match="sha256"):
        TensorRTRunner(plan)
    if detect_gpu() is None:
        with pytest.raises(MissingDependencyError, match="expected a CUDA GPU"):
            load_runner(tiny_engine.engine)


@pytest.mark.gpu
def test_runner_executes_on_gpu(tiny_engine, tiny_onnx):
    if detect_gpu() is None:
        pytest.skip("no CUDA GPU on this machine: TensorRT engines can be built ahead of time but not run")
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (pip install pycuda)")
    import onnxruntime as ort

    from emorph_deploy.runners.tensorrt import TensorRTRunner

    rng = np.random.default_rng(0)
    feed = {k: rng.random((1, 1, 8, 8, 8), dtype=np.float32) for k in ("moving", "fixed")}
    with TensorRTRunner(tiny_engine.engine, warmup=3) as runner:
        assert runner.grid_shape == (8, 8, 8) and set(runner.output_names) == {"flow", "warped"}
        out = runner.infer(feed)
        assert runner.last_gpu_latency_s > 0.0 and runner.last_latency_s >= runner.last_gpu_latency_s
        times = runner.benchmark(5)
        assert len(times) == 5 and min(times) > 0.0
    ref = dict(
        zip(
            ["warped", "flow"],
            ort.InferenceSession(str(tiny_onnx)).run(["warped", "flow"], feed),
            strict=True,
        )
    )
    assert np.abs(out["flow"] - ref["flow"]).max() < 1e-3  # voxels (TF32 convs)
    assert np.abs(out["warped"] - ref["warped"]).max() < 1e-3
