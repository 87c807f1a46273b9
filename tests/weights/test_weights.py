"""The packaged default model (``emorph_deploy.weights``): lookup, the "none packaged" error, package data."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is needed to load checkpoints")

import emorph_deploy.weights as W  # noqa: E402
from emorph_deploy.errors import InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_none_packaged_raises_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(InputError, match=r"^no default model is packaged; pass --model CHECKPOINT") as ei:
        W.default_checkpoint_path()
    assert "\n" not in str(ei.value)
    with pytest.raises(InputError, match="no default model is packaged"):
        W.load_default()
    # the registration API asks this module first and reports the same error
    from emorph_deploy.registration import default_artifact

    with pytest.raises(InputError, match="no default model is packaged"):
        default_artifact()


def test_half_packaged_is_not_a_model(tmp_path, monkeypatch, tiny_checkpoint):
    weights = tiny_checkpoint(tmp_path)
    weights.with_suffix(".json").unlink()
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(InputError, match=r"default\.json"):
        W.default_checkpoint_path()


def test_packaged_checkpoint_is_found_and_loads(tmp_path, monkeypatch, tiny_checkpoint):
    weights = tiny_checkpoint(tmp_path)
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path)
    assert W.default_checkpoint_path() == weights
    assert W.default_checkpoint is W.default_checkpoint_path
    model, meta = W.load_default()
    assert not model.training
    assert meta["format"] == "emorph-checkpoint/1"
    assert tuple(meta["preprocessing"]["grid_shape"]) == tuple(model.config.img_size)
    from emorph_deploy.registration import default_artifact

    assert default_artifact() == weights


def test_package_data_declared():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="tomllib/tomli is needed to read pyproject.toml")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = cfg["tool"]["setuptools"]["package-data"]["emorph_deploy"]
    assert "weights/*.safetensors" in data and "weights/*.json" in data
    assert (Path(W.__file__).parent / "__init__.py").is_file()


def test_shipped_default_model_if_present():
    try:
        path = W.default_checkpoint_path()
    except InputError:
        pytest.skip("no default model is packaged in this tree yet (the lead copies the trained files)")
    size = path.stat().st_size + path.with_suffix(".json").stat().st_size
    assert size <= 20 * 1024 * 1024, size
    model, meta = W.load_default()
    pre = meta["preprocessing"]
    assert tuple(pre["grid_shape"]) == tuple(model.config.img_size)
