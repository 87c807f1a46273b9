"""Runner protocol: suffix dispatch, one validation in the base class, torch and onnxruntime backends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emorph_deploy.errors import InputError, MissingDependencyError, ProcessingError
from emorph_deploy.runners import Runner, artifact_for, backend_for, is_artifact_of, load_runner, resolve

GRID = (16, 24, 32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    import torch

    from emorph_deploy.data.preprocess import Preprocessing
    from emorph_deploy.models import create_model
    from emorph_deploy.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model(
        "em-11-hires", img_size=GRID, patch_dim=12, embed_dims=(16, 32), heads=(2, 4),
        decoder_widths=(8, 8), skip_width=8, flow_init_std=0.1,
    )  # fmt: skip
    stem = tmp_path_factory.mktemp("rckpt") / "r"
    return Path(save_checkpoint(model, stem, preprocessing=Preprocessing(grid_shape=GRID)).weights)


@pytest.fixture(scope="module")
def onnx_path(ckpt, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    from emorph_deploy.export import onnx_from_checkpoint

    return onnx_from_checkpoint(ckpt, tmp_path_factory.mktemp("rexp") / "r.onnx", grid_sample="native")


def _feed(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.random((1, 1, *GRID), dtype=np.float32) for k in ("moving", "fixed")}


def test_backend_by_suffix(tmp_path):
    assert backend_for("a.safetensors") == "torch"
    assert backend_for("a.json") == "torch"
    assert backend_for("a.onnx") == "onnxruntime"
    assert backend_for("a.plan") == "tensorrt" and backend_for("a.engine") == "tensorrt"
    assert backend_for("a.onnx", "torch") == "torch"
    with pytest.raises(InputError, match="backend"):
        backend_for(tmp_path / "a.bin")
    with pytest.raises(InputError, match="unknown backend"):
        backend_for("a.onnx", "tflite")


def test_artifact_kinds_and_siblings(tmp_path):
    import json

    m = tmp_path / "m"
    assert is_artifact_of("a.onnx", "onnxruntime") and not is_artifact_of("a.onnx", "torch")
    assert not is_artifact_of(m, "torch")
    m.with_suffix(".safetensors").write_bytes(b"")
    assert is_artifact_of(m, "torch")  # a checkpoint named by its stem
    m.with_suffix(".onnx").write_bytes(b"")
    assert artifact_for(m.with_suffix(".plan"), "onnxruntime") == m.with_suffix(".onnx")
    assert artifact_for(m.with_suffix(".plan"), "tensorrt") == m.with_suffix(".plan")
    assert artifact_for(m.with_suffix(".bin"), "onnxruntime") is None  # not an artifact at all
    m.with_suffix(".json").write_text(json.dumps({"format": "emorph-onnx/1"}))  # the ONNX manifest
    assert artifact_for(m.with_suffix(".onnx"), "torch") == m.with_suffix(".safetensors")
    m.with_suffix(".json").write_text(json.dumps({"format": "emorph-checkpoint/1"}))
    assert artifact_for(m.with_suffix(".onnx"), "torch") == m.with_suffix(".json")


def test_resolve_explicit_backend_needs_its_artifact(ckpt):
    with pytest.raises(InputError, match=r"--onnx FILE \(.onnx\) or --backend auto"):
        resolve(ckpt, "onnxruntime")
    with pytest.raises(InputError, match="expected one of auto, tensorrt, openvino, onnxruntime, torch"):
        resolve(ckpt, "tflite")
    assert resolve(ckpt, "torch").name == "torch"


def test_resolve_auto_falls_back_with_notes(ckpt):
    notes: list[str] = []
    runner = resolve(ckpt.with_suffix(".plan"), "auto", notes)  # no such engine: on to the checkpoint
    assert runner.name == "torch" and runner.providers == []
    assert len(notes) == 1 and notes[0].startswith("tensorrt skipped: ")


def test_torch_runner(ckpt):
    r = load_runner(ckpt)
    assert r.name == "torch" and r.grid_shape == GRID
    assert r.input_spec == {
        "moving": ((1, 1, *GRID), np.dtype(np.float32)),
        "fixed": ((1, 1, *GRID), np.dtype(np.float32)),
    }
    assert r.output_names == ("flow", "warped")
    out = r.infer(_feed())
    assert out["flow"].shape == (1, 3, *GRID) and out["flow"].dtype == np.float32
    assert out["warped"].shape == (1, 1, *GRID)
    assert r.last_latency_s > 0
    assert r.meta["precision"] == "fp32" and r.meta["model"]["img_size"] == list(GRID)
    assert r.meta["preprocessing"]["grid_shape"] == list(GRID)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda f: f.pop("fixed"), "expected inputs"),
        (lambda f: f.update(extra=f["moving"]), "expected inputs"),
        (lambda f: f.update(moving=f["moving"][:, :, :-1]), "expected shape"),
        (lambda f: f.update(moving=f["moving"].astype(np.float64)), "expected dtype float32, got float64"),
        (lambda f: f.update(moving=f["moving"].tolist()), "numpy array"),
    ],
)
def test_feed_validation_is_one_clear_error(ckpt, onnx_path, mutate, pattern):
    for r in (load_runner(ckpt), load_runner(onnx_path, providers="cpu")):
        feed = _feed()
        mutate(feed)
        with pytest.raises(InputError, match=pattern) as err:
            r.infer(feed)
        assert "fix:" in str(err.value) or "expected" in str(err.value)


def test_onnxruntime_runner_matches_torch(ckpt, onnx_path):
    r = load_runner(onnx_path, threads=1, providers="cpu")
    assert r.name == "onnxruntime" and r.grid_shape == GRID
    assert r.providers == ["CPUExecutionProvider"]
    assert r.meta["intra_op_threads"] == 1 and r.meta["grid_sample"] == "native"
    feed = _feed(1)
    out = r.infer(feed)
    ref = load_runner(ckpt).infer(feed)
    assert np.abs(out["flow"] - ref["flow"]).max() <= 1e-3
    assert r.last_latency_s > 0


def test_select_providers():
    from emorph_deploy.runners.onnxruntime import select_providers

    cpu = ["CPUExecutionProvider"]
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers("auto", cpu) == cpu
    assert select_providers("auto", gpu) == gpu
    assert select_providers("cpu", gpu) == cpu
    assert select_providers(None, gpu) == cpu
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        select_providers(["CUDAExecutionProvider"], cpu)


def test_missing_backend_names_the_extra(monkeypatch):
    import emorph_deploy.runners as runners

    monkeypatch.setitem(runners.BACKENDS, "tensorrt", ("emorph_deploy.runners._absent_", "X", "tensorrt"))
    with pytest.raises(MissingDependencyError, match=r"emorph-deploy\[tensorrt\]"):
        load_runner("model.plan")


def test_base_class_checks_backend_outputs():
    class Bad(Runner):
        name = "bad"

        def __init__(self):
            super().__init__()
            self._grid_shape = GRID
            self._output_names = ("flow",)

        def _infer(self, feed):
            return {"flow": np.zeros((1, 2, *GRID), np.float32)}

    with pytest.raises(ProcessingError, match="shape"):
        Bad().infer(_feed())


def test_import_is_lazy():
    code = (
        "import sys, emorph_deploy.runners, emorph_deploy.export, emorph_deploy.check; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
