"""Checkpoint format: round trip, path forms, and every bad-input case gives one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from emorph_deploy.data.preprocess import Preprocessing
from emorph_deploy.errors import ConfigMismatchError, InputError, OutputExistsError
from emorph_deploy.models import create_model
from emorph_deploy.train.checkpoint import (
    FORMAT,
    load_checkpoint,
    load_training_state,
    load_weights_partial,
    save_checkpoint,
    save_training_state,
)


@pytest.fixture
def tiny(tiny_overrides):
    torch.manual_seed(0)
    return create_model("em-23-hires", img_size=(32, 32, 32), **tiny_overrides).eval()


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_roundtrip_identical_output(tmp_path, tiny):
    pre = Preprocessing(grid_shape=(32, 32, 32), spacing_mm=(2.0, 2.0, 2.0))
    # make the flow head non-trivial so the comparison is meaningful
    with torch.no_grad():
        tiny.flow_head.weight.normal_(0, 1e-2)
    paths = save_checkpoint(tiny, tmp_path / "ck", pre, training={"lr": 5e-4}, metrics={"val_dice": 0.5})
    meta = json.loads(paths.meta.read_text())
    assert meta["format"] == FORMAT
    assert meta["model"] == tiny.config.to_dict()
    assert meta["preprocessing"]["grid_shape"] == [32, 32, 32]
    assert meta["training"] == {"lr": 5e-4} and meta["metrics"] == {"val_dice": 0.5}
    assert meta["code_version"]["package"]
    assert len(meta["sha256_weights"]) == 64
    g = torch.Generator().manual_seed(1)
    mov, fix = torch.rand(1, 1, 32, 32, 32, generator=g), torch.rand(1, 1, 32, 32, 32, generator=g)
    with torch.no_grad():
        w0, f0 = tiny(mov, fix)
    for form in (paths.weights, paths.meta, paths.stem, tmp_path):
        model, meta2 = load_checkpoint(form, expect_model=tiny.config)
        with torch.no_grad():
            w1, f1 = model(mov, fix)
        assert torch.equal(f0, f1) and torch.equal(w0, w1)  # bit-identical, tolerance 0
        assert Preprocessing.from_dict(meta2["preprocessing"]) == pre
    assert float(f0.abs().max()) > 1e-4  # the compared output is not trivially zero


def test_overwrite_needs_force_and_nothing_partial(tmp_path, tiny):
    save_checkpoint(tiny, tmp_path / "ck", None)
    with pytest.raises(OutputExistsError):
        save_checkpoint(tiny, tmp_path / "ck", None)
    save_checkpoint(tiny, tmp_path / "ck", None, force=True)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_bad_checkpoints(tmp_path, tiny, tiny_overrides):
    paths = save_checkpoint(tiny, tmp_path / "ck", None)
    # requested model differs (name and full config)
    with pytest.raises(ConfigMismatchError) as e:
        load_checkpoint(paths.weights, expect_model="em-11-hires")
    assert "em-11-hires" in _one_line(e.value)
    with pytest.raises(ConfigMismatchError) as e:
        load_checkpoint(paths.weights, expect_model=tiny.config.replace(depths=(2, 3)))
    assert "depths" in _one_line(e.value)
    # missing files
    with pytest.raises(InputError) as e:
        load_checkpoint(tmp_path / "nope.safetensors")
    _one_line(e.value)
    # weights that do not fit the config: other model's weights, hash check off
    other = create_model("em-23-hires", img_size=(32, 32, 32), **{**tiny_overrides, "depths": [2, 2]})
    p2 = save_checkpoint(other, tmp_path / "other", None)
    paths.weights.write_bytes(p2.weights.read_bytes())
    with pytest.raises(InputError) as e:  # sha256 no longer matches
        load_checkpoint(paths.meta)
    assert "sha256" in _one_line(e.value)
    with pytest.raises(ConfigMismatchError) as e:
        load_checkpoint(paths.meta, verify_hash=False)
    assert "do not match" in _one_line(e.value)
    # corrupt weights / metadata
    paths.weights.write_bytes(b"garbage" * 10)
    with pytest.raises(InputError) as e:
        load_checkpoint(paths.meta, verify_hash=False)
    _one_line(e.value)
    paths.meta.write_text("{not json")
    with pytest.raises(InputError) as e:
        load_checkpoint(paths.meta)
    _one_line(e.value)
    paths.meta.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InputError) as e:
        load_checkpoint(paths.meta)
    _one_line(e.value)


def test_training_state_weights_only(tmp_path, tiny):
    opt = torch.optim.Adam(tiny.parameters(), lr=5e-4, amsgrad=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20, eta_min=5e-5)
    tiny.train()
    x = torch.rand(1, 1, 32, 32, 32)
    tiny(x, x)[1].pow(2).mean().backward()
    opt.step()
    sched.step()
    save_training_state(
        tmp_path / "ck",
        {
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": 7,
            "rng": torch.get_rng_state(),
        },
    )
    state = load_training_state(tmp_path / "ck.safetensors")
    assert state["step"] == 7
    assert state["scheduler"]["last_epoch"] == 1
    (tmp_path / "bad.state.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError) as e:
        load_training_state(tmp_path / "bad")
    _one_line(e.value)


def test_warm_start_copies_shared_tensors_and_keeps_new_layers(tmp_path, tiny, tiny_overrides):
    """--init-from: every checkpoint tensor is copied; layers the checkpoint lacks keep their init."""
    paths = save_checkpoint(tiny, tmp_path / "ck", None)
    torch.manual_seed(5)
    wide = create_model("em-23-hires", img_size=(32, 32, 32), full_res_width=4, **tiny_overrides)
    head_before = wide.full_res.head.weight.detach().clone()
    loaded, kept = load_weights_partial(wide, paths.meta)
    assert set(loaded) == set(tiny.state_dict())
    assert kept and all(k.startswith("full_res.") for k in kept)
    for k, v in tiny.state_dict().items():
        assert torch.equal(wide.state_dict()[k], v), k
    assert torch.equal(wide.full_res.head.weight, head_before)
    # the other way round (a checkpoint with tensors the model lacks) and other widths: one clear line
    wide_paths = save_checkpoint(wide, tmp_path / "wide", None)
    with pytest.raises(ConfigMismatchError) as exc:
        load_weights_partial(
            create_model("em-23-hires", img_size=(32, 32, 32), **tiny_overrides), wide_paths.meta
        )
    assert "the model lacks" in _one_line(exc.value)
    narrow = create_model("em-23-hires", img_size=(32, 32, 32), **{**tiny_overrides, "embed_dims": [8, 16]})
    with pytest.raises(ConfigMismatchError) as exc:
        load_weights_partial(narrow, paths.meta)
    assert "another shape" in _one_line(exc.value)


def test_checkpoint_from_before_a_new_config_field_still_matches(tmp_path, tiny):
    """A checkpoint written before ``full_res_width`` existed loads and matches its config (the field's
    default keeps the old architecture)."""
    paths = save_checkpoint(tiny, tmp_path / "ck", None)
    meta = json.loads(paths.meta.read_text())
    del meta["model"]["full_res_width"]
    paths.meta.write_text(json.dumps(meta))
    model, _ = load_checkpoint(paths.meta, expect_model=tiny.config, verify_hash=False)
    assert model.full_res is None
