"""The packaged model as an OpenVINO IR under ``backend="auto"``: when it applies, the build-once cache
(atomic, reused, keyed by the weights), parity with torch, and the fallbacks to torch with a note."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is needed to load checkpoints")
pytest.importorskip("openvino", reason="the OpenVINO path needs the cpu extra (openvino)")

import emorph_deploy.weights as W  # noqa: E402
from emorph_deploy import runtime  # noqa: E402
from emorph_deploy.runners import resolve  # noqa: E402


@pytest.fixture
def packaged(tmp_path, monkeypatch, tiny_checkpoint):
    """A tiny packaged default model and an empty IR cache (``EMORPH_CACHE``)."""
    weights = tiny_checkpoint(tmp_path / "weights")
    monkeypatch.setattr(W, "WEIGHTS_DIR", weights.parent)
    monkeypatch.setenv("EMORPH_CACHE", str(tmp_path / "cache"))
    return weights


def _feed(grid=(16, 16, 16)):
    rng = np.random.default_rng(0)
    return {k: rng.random((1, 1, *grid), dtype=np.float32) for k in ("moving", "fixed")}


def test_is_default_checkpoint(packaged, tmp_path, tiny_checkpoint):
    assert W.is_default_checkpoint(packaged) and W.is_default_checkpoint(packaged.with_suffix(".json"))
    other = tiny_checkpoint(tmp_path / "mine")
    assert not W.is_default_checkpoint(other)


def test_skip_reasons(packaged, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert "aarch64" in W.packaged_ir_skip()
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert "AVX512-BF16" in W.packaged_ir_skip()
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "CUDA" in W.packaged_ir_skip()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert W.packaged_ir_skip() is None


def test_a_network_that_warps_inside_takes_the_ir(packaged, tmp_path, monkeypatch):
    """The exported gather sampler forms its indices in integers, so a packaged network with an inner warp
    (a full-resolution stage fed the warped image) runs as the bf16 IR like any other."""
    import json

    meta = json.loads(packaged.with_suffix(".json").read_text())
    meta["model"]["full_res_input"] = "warped"
    folder = tmp_path / "warps"
    folder.mkdir()
    (folder / "default.json").write_text(json.dumps(meta))
    monkeypatch.setattr(W, "WEIGHTS_DIR", folder)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert W.packaged_ir_skip() is None


def test_ir_is_built_once_and_matches_torch(packaged, monkeypatch):
    """fp32 so that it runs on any CPU: the IR reproduces torch; a second call reuses the folder."""
    from emorph_deploy.engines import openvino as ov_engine
    from emorph_deploy.runners import OpenVinoRunner, TorchRunner

    lines = []
    xml = W.default_openvino_ir("fp32", say=lines.append)
    assert xml.is_file() and xml.with_suffix(".bin").is_file() and len(lines) == 1
    root = W.ir_cache_root()
    assert [p.name for p in root.iterdir()] == [xml.parent.name]  # no temporary folder, no ONNX left
    assert sorted(p.suffix for p in xml.parent.iterdir()) == [".bin", ".json", ".xml"]
    monkeypatch.setattr(ov_engine, "build_ir", lambda *a, **k: pytest.fail("rebuilt a cached IR"))
    assert W.default_openvino_ir("fp32", say=lines.append) == xml and len(lines) == 1
    feed = _feed()
    ref = TorchRunner(packaged).infer(feed)["flow"]
    got = OpenVinoRunner(xml, threads=1).infer(feed)["flow"]
    assert np.abs(ref).max() > 0 and np.abs(got - ref).max() < 1e-3


def test_interrupted_build_leaves_nothing(packaged, monkeypatch):
    from emorph_deploy.engines import openvino as ov_engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ov_engine, "build_ir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        W.default_openvino_ir("fp32")
    assert list(W.ir_cache_root().iterdir()) == []


def test_auto_resolves_the_packaged_model_to_openvino_or_torch_with_a_note(
    packaged, monkeypatch, tiny_checkpoint
):
    real = W.default_openvino_ir
    monkeypatch.setattr(W, "packaged_ir_skip", lambda: None)
    monkeypatch.setattr(W, "default_openvino_ir", lambda precision, **kw: real("fp32", **kw))
    notes: list[str] = []
    assert resolve(packaged, "auto", notes).name == "openvino" and "built" in notes[0]
    assert resolve(packaged, "torch").name == "torch"  # an explicit backend is obeyed
    mine = tiny_checkpoint(packaged.parent.parent / "mine")
    assert resolve(mine, "auto").name == "torch"  # only the packaged checkpoint takes the IR path
    monkeypatch.setattr(W, "packaged_ir_skip", lambda: "no bf16 here")
    notes = []
    assert resolve(packaged, "auto", notes).name == "torch" and "no bf16 here" in notes[0]

    def broken(precision, **kw):
        raise OSError("read-only cache")

    monkeypatch.setattr(W, "packaged_ir_skip", lambda: None)
    monkeypatch.setattr(W, "default_openvino_ir", broken)
    notes = []
    assert resolve(packaged, "auto", notes).name == "torch"
    assert "read-only cache" in notes[0] and "runs in torch" in notes[0]
