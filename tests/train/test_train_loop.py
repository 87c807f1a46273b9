"""Training loop: the loss goes down, --resume is exact (same step, learning rate and weights)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from emorph_deploy.train.config import TrainConfig
from emorph_deploy.train.loop import Trainer, resolve_resume_config, weights_digest


def _cfg(tmp_path, tiny_overrides, name: str, **kw) -> TrainConfig:
    base = dict(
        model_overrides=tiny_overrides,
        grid_shape=(32, 32, 32),
        val_pairs=1,
        out=str(tmp_path / name),
        log_every=1,
        progress=False,
        tensorboard=False,
        device="cpu",
        synthetic_kind="synth",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_short_synthetic_run_lowers_loss(tmp_path, tiny_overrides):
    cfg = _cfg(tmp_path, tiny_overrides, "run", epochs=1, steps_per_epoch=12, val_pairs=2)
    trainer = Trainer(cfg, force=True)
    before = trainer.validation_loss()
    result = trainer.fit()
    after = trainer.validation_loss()
    assert result.step == 12 and result.epoch == 1
    assert after < before - 0.03, (before, after)  # a clear drop on 2 fixed validation pairs
    # run folder: both checkpoints, logs, validation metrics incl. endpoint error vs the true flow
    out = tmp_path / "run"
    for name in (
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "last.state.pt",
        "train_log.csv",
        "val_log.csv",
        "config.json",
    ):
        assert (out / name).is_file(), name
    val = result.history[-1]
    assert 0.0 <= val["dice"] <= 1.0 and 0.0 <= val["frac_jac_nonpos"] <= 1.0
    assert math.isfinite(val["epe_vox"]) and val["epe_vox"] > 0.0
    meta = json.loads((out / "last.json").read_text())
    assert meta["training"]["step"] == 12 and meta["metrics"]["epoch"] == 1


@pytest.mark.slow
def test_resume_mid_epoch_is_exact(tmp_path, tiny_overrides):
    common = dict(epochs=2, steps_per_epoch=2)
    straight = Trainer(_cfg(tmp_path, tiny_overrides, "a", **common), force=True)
    res_a = straight.fit()
    # same run, stopped after 3 iterations (mid-epoch 2), then resumed
    first = Trainer(_cfg(tmp_path, tiny_overrides, "b", max_steps=3, **common), force=True)
    res_b1 = first.fit()
    assert res_b1.step == 3 and res_b1.epoch == 1
    lr_saved = res_b1.lr
    cfg_b = resolve_resume_config(tmp_path / "b", {"epochs": None})
    assert cfg_b.max_steps is None
    resumed = Trainer(cfg_b, resume=True)
    resumed.load_resume()
    assert resumed.step == 3 and resumed.epoch == 1 and resumed.step_in_epoch == 1
    assert resumed.opt.param_groups[0]["lr"] == pytest.approx(lr_saved, rel=0, abs=0)
    resumed2 = Trainer(cfg_b, resume=True)
    res_b2 = resumed2.fit()
    assert res_b2.step == res_a.step == 4
    assert res_b2.lr == pytest.approx(res_a.lr, rel=1e-12)
    # bit-identical weights to the uninterrupted run (data, dropout RNG and optimizer state restored)
    assert res_b2.weights_sha256 == res_a.weights_sha256
    assert weights_digest(resumed2.core) == res_a.weights_sha256


def test_resume_config_mismatch(tmp_path, tiny_overrides):
    from emorph_deploy.errors import ConfigMismatchError, InputError

    with pytest.raises(InputError):
        resolve_resume_config(tmp_path / "empty", {})
    cfg = _cfg(tmp_path, tiny_overrides, "c", epochs=1, steps_per_epoch=1, val_pairs=0)
    Trainer(cfg, force=True).fit()
    with pytest.raises(ConfigMismatchError) as e:
        resolve_resume_config(tmp_path / "c", {"ncc_window": 5})
    assert "ncc_window" in str(e.value) and "\n" not in str(e.value)
    ok = resolve_resume_config(tmp_path / "c", {"epochs": 3, "ncc_window": cfg.ncc_window})
    assert ok.epochs == 3
    assert torch.get_num_threads() == 1


def test_resume_with_new_schedule_starts_a_cosine_phase(tmp_path, tiny_overrides):
    cfg = _cfg(tmp_path, tiny_overrides, "p", epochs=2, steps_per_epoch=1, val_pairs=0, lr=1e-3, t_max=100)
    Trainer(cfg, force=True).fit()
    # a decay phase: cosine from 4e-4 to 1e-5 over 2 epochs, starting at the resumed epoch (2)
    cfg_p = resolve_resume_config(tmp_path / "p", {"epochs": 4, "lr": 4e-4, "lr_min": 1e-5, "t_max": 2})
    phase = Trainer(cfg_p, resume=True)
    phase.load_resume()
    assert phase.opt.param_groups[0]["lr"] == pytest.approx(4e-4, rel=1e-12)
    res = phase.fit()
    assert res.epoch == 4 and res.lr == pytest.approx(1e-5, rel=1e-9)  # the end of the new cosine
    # a later plain resume keeps the new schedule (no second restart)
    again = Trainer(resolve_resume_config(tmp_path / "p", {"epochs": 5}), resume=True)
    again.load_resume()
    assert again.opt.param_groups[0]["lr"] == pytest.approx(1e-5, rel=1e-9)
    assert again.sched.T_max == 2 and again.sched.base_lrs == [pytest.approx(4e-4)]


def test_resume_may_add_fine_deformations_to_brain_pairs(tmp_path, tiny_overrides):
    from types import SimpleNamespace

    from emorph_deploy.errors import InputError
    from emorph_deploy.train.loop import _brain_datasets

    cfg = _cfg(tmp_path, tiny_overrides, "f", epochs=1, steps_per_epoch=1, val_pairs=2)
    Trainer(cfg, force=True).fit()
    changes = {"synth_fine_disp_mm": 8.0, "synth_affine_fraction": 0.25, "reg_weight": 0.5}
    changes.update(synth_known_flow=True, flow_weight=0.2, synth_same_subject=0.25, synth_shapes=0.3)
    resumed = resolve_resume_config(tmp_path / "f", changes)
    assert resumed.synth_fine_disp_mm == 8.0 and resumed.reg_weight == 0.5  # a new loss balance may start
    assert resumed.synth_known_flow and resumed.flow_weight == 0.2
    pre = SimpleNamespace(grid_shape=(16, 16, 16), spacing_mm=(2.0, 2.0, 2.0))
    train_ds, val = _brain_datasets(resumed, pre, 1)
    assert train_ds.config.fine_disp_mm == 8.0 and train_ds.config.affine_fraction == 0.25
    assert train_ds.config.p_same_subject == 0.25 and train_ds.config.p_shapes == 0.3
    assert train_ds.config.known_flow and not any("flow" in item for item in val)  # validation unchanged
    with pytest.raises(InputError, match="synth-same-subject"):
        resolve_resume_config(tmp_path / "f", {"synth_same_subject": 1.5})
    with pytest.raises(InputError, match="synth-shapes"):
        resolve_resume_config(tmp_path / "f", {"synth_shapes": -0.1})
    # the held-out validation pairs are those of a run without fine deformations (one comparable curve)
    _, val_before = _brain_datasets(cfg, pre, 1)
    assert all(torch.equal(a["moving"], b["moving"]) for a, b in zip(val, val_before, strict=True))


def test_resume_may_change_stochastic_depth_only(tmp_path, tiny_overrides):
    from emorph_deploy.errors import ConfigMismatchError, InputError
    from emorph_deploy.models.layers import DropPath
    from emorph_deploy.train.checkpoint import load_checkpoint

    cfg = _cfg(tmp_path, tiny_overrides, "dp", epochs=1, steps_per_epoch=1, val_pairs=0, drop_path=0.2)
    Trainer(cfg, force=True).fit()
    resumed_cfg = resolve_resume_config(tmp_path / "dp", {"epochs": 2, "drop_path": 0.0})
    assert resumed_cfg.drop_path == 0.0 and resumed_cfg.model_config().drop_path == 0.0
    resumed = Trainer(resumed_cfg, resume=True)
    resumed.load_resume()  # the saved model (drop_path 0.2) is the same model: no mismatch
    rates = [m.p for m in resumed.core.modules() if isinstance(m, DropPath)]
    assert rates and all(r == 0.0 for r in rates)
    resumed.fit()
    _, meta = load_checkpoint(tmp_path / "dp" / "last", expect_model=cfg.model_config())
    assert meta["model"]["drop_path"] == 0.0  # the checkpoint records the latest phase's stochastic depth
    # an architecture change is still refused, and the range is checked
    with pytest.raises(ConfigMismatchError):
        load_checkpoint(tmp_path / "dp" / "last", expect_model=replace(cfg.model_config(), mlp_ratio=2.0))
    with pytest.raises(InputError, match="drop-path"):
        resolve_resume_config(tmp_path / "dp", {"drop_path": 1.0})


def test_batch_of_two_and_label_union(tmp_path, tiny_overrides):
    # batch 2 mixes a SynthMorph pair (16 labels) and a template pair (4 labels): Dice over the label union
    cfg = _cfg(
        tmp_path,
        tiny_overrides,
        "bs2",
        epochs=1,
        steps_per_epoch=1,
        batch_size=2,
        val_pairs=0,
        synthetic_kind="mix",
    )
    trainer = Trainer(cfg, force=True)
    res = trainer.fit()
    assert res.step == 1
    row = trainer.train_rows[-1]
    assert math.isfinite(row["loss"]) and 0.0 < row["dice_loss"] < 1.0


def test_max_minutes_stops_and_saves_for_resume(tmp_path, tiny_overrides):
    cfg = _cfg(tmp_path, tiny_overrides, "mm", epochs=1, steps_per_epoch=50, val_pairs=0, max_minutes=1e-6)
    res = Trainer(cfg, force=True).fit()
    assert res.step == 1 and res.epoch == 0  # stopped after the first iteration, mid-epoch
    meta = json.loads((tmp_path / "mm" / "last.json").read_text())
    assert meta["training"]["step"] == 1 and meta["training"]["step_in_epoch"] == 1
    assert resolve_resume_config(tmp_path / "mm", {}).max_minutes is None  # not inherited by --resume


def _brains_cfg(tmp_path, tiny_overrides, name: str, **kw) -> TrainConfig:
    """A one-epoch brains run, one direction per iteration, fp32, two held-out pairs."""
    base = dict(epochs=1, val_pairs=2, synthetic_kind="brains", bidirectional=False, amp="none")
    return _cfg(tmp_path, tiny_overrides, name, **{**base, **kw})


def test_brains_one_direction_run_logs_contrast_groups(tmp_path, tiny_overrides):
    cfg = _brains_cfg(tmp_path, tiny_overrides, "brains", steps_per_epoch=2)
    trainer = Trainer(cfg, force=True)
    res = trainer.fit()
    assert res.step == 2
    val = res.history[-1]
    # one held-out pair per contrast relation, each reported on its own
    assert 0.0 < val["dice_same"] <= 1.0 and 0.0 < val["dice_diff"] <= 1.0
    assert val["dice"] == pytest.approx((val["dice_same"] + val["dice_diff"]) / 2)
    assert all(math.isfinite(r["dice_loss"]) for r in trainer.train_rows)
    # the same pairs without residual affines, reported apart: closer to begin with
    assert 0.0 < val["dice_aligned"] <= 1.0 and val["dice_aligned_init"] > val["dice_init"]
    logged = (tmp_path / "brains" / "val_log.csv").read_text().splitlines()[0].split(",")
    assert {"dice_aligned", "dice_aligned_init"} <= set(logged)


def test_best_metric_change_on_resume_restarts_best(tmp_path, tiny_overrides):
    from emorph_deploy.errors import InputError

    cfg = _brains_cfg(tmp_path, tiny_overrides, "bm", steps_per_epoch=1)
    Trainer(cfg, force=True).fit()
    first = json.loads((tmp_path / "bm" / "best.json").read_text())["training"]
    assert first["best_metric"] == "auto" and first["best_score"] < 0.6  # dice of pairs with affines
    # a phase that selects by the pre-aligned pairs: the old score (another column) does not carry over
    resumed = Trainer(
        resolve_resume_config(tmp_path / "bm", {"epochs": 2, "best_metric": "dice_aligned"}), resume=True
    )
    resumed.load_resume()
    assert resumed.best_score == -math.inf
    res = resumed.fit()
    best = json.loads((tmp_path / "bm" / "best.json").read_text())["training"]
    assert best["step"] == 2 and best["best_metric"] == "dice_aligned"
    assert best["best_score"] == pytest.approx(res.history[-1]["dice_aligned"])
    # the same metric on a later resume keeps the score
    again = Trainer(resolve_resume_config(tmp_path / "bm", {"epochs": 3}), resume=True)
    again.load_resume()
    assert again.best_score == pytest.approx(best["best_score"])
    with pytest.raises(InputError, match="dice_aligned needs"):
        _cfg(tmp_path, tiny_overrides, "x", synthetic_kind="synth", best_metric="dice_aligned")
    with pytest.raises(InputError, match="--best-metric must be one of"):
        _cfg(tmp_path, tiny_overrides, "x", best_metric="loss")


def test_ncc_is_gated_by_same_contrast(tmp_path, tiny_overrides):
    cfg = _cfg(
        tmp_path,
        tiny_overrides,
        "gate",
        epochs=1,
        steps_per_epoch=1,
        val_pairs=0,
        synthetic_kind="brains",
        ncc_weight=1.0,
        dice_weight=0.0,
        reg_weight=0.0,
    )
    trainer = Trainer(cfg, force=True)
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    loss_diff, parts_diff = trainer._direction_loss(x, y, None, None, torch.tensor([0.0]))
    loss_same, _ = trainer._direction_loss(x, y, None, None, torch.tensor([1.0]))
    loss_none, _ = trainer._direction_loss(x, y, None, None, None)
    assert float(loss_diff.detach()) == 0.0 and parts_diff["ncc"] == 0.0
    assert float(loss_same.detach()) > 0.5
    assert float(loss_same.detach()) == pytest.approx(float(loss_none.detach()), rel=1e-6)
    # a batch of two: only the same-contrast pair contributes (mean over the batch)
    xx, yy = torch.cat([x, x]), torch.cat([y, y])
    both, _ = trainer._direction_loss(xx, yy, None, None, torch.tensor([1.0, 0.0]))
    assert float(both.detach()) == pytest.approx(float(loss_same.detach()) / 2, rel=1e-4)


@pytest.mark.parametrize(
    ("flags", "device", "amp", "want"),
    [
        ({"avx2"}, "cpu", "auto", "none"),
        ({"avx512f", "avx512_bf16"}, "cpu", "auto", "bf16"),
        ({"amx_bf16", "amx_tile"}, "cpu", "auto", "bf16"),
        ({"avx2"}, "cpu", "bf16", "bf16"),
        ({"avx2"}, "cpu", "fp16", "none"),
        ({"avx2"}, "cpu", "none", "none"),
    ],
)
def test_resolve_amp_from_cpu_flags(monkeypatch, flags, device, amp, want):
    from emorph_deploy.train import config as C

    monkeypatch.setattr(C, "cpu_has_native_bf16", lambda: bool(set(flags) & {"avx512_bf16", "amx_bf16"}))
    assert C.resolve_amp(amp, device) == want


def test_cpu_flag_reader_matches_proc_cpuinfo():
    from emorph_deploy.train.config import cpu_has_native_bf16

    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_known_flow_pairs_add_the_endpoint_loss_forward_only(tmp_path, tiny_overrides):
    cfg = _brains_cfg(
        tmp_path, tiny_overrides, "epe", steps_per_epoch=2, synth_known_flow=True, flow_weight=0.5
    )
    trainer = Trainer(cfg, force=True)
    res = trainer.fit()
    assert res.step == 2 and all(math.isfinite(r["epe"]) and r["epe"] > 0 for r in trainer.train_rows)
    logged = (tmp_path / "epe" / "train_log.csv").read_text().splitlines()[0].split(",")
    assert "epe" in logged
    # the loss term: flow_weight × mean endpoint error inside the fixed labels; none without a true flow
    x, y = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    lab = torch.ones(1, 1, 32, 32, 32, dtype=torch.int64)
    far = torch.full((1, 3, 32, 32, 32), 10.0)
    with_flow, parts = trainer._direction_loss(x, y, lab, lab, None, far)
    without, parts0 = trainer._direction_loss(x, y, lab, lab, None, None)
    assert "epe" in parts and "epe" not in parts0
    expected = 0.5 * parts["epe"]
    assert float(with_flow - without) == pytest.approx(expected, rel=1e-3)
    assert parts["epe"] == pytest.approx(float(torch.tensor(300.0).sqrt()), abs=1.0)  # |(10,10,10)| ± flow
    # a weight without true flows would do nothing: refused, with the fix
    from emorph_deploy.errors import InputError

    with pytest.raises(InputError, match="--flow-weight needs pairs that carry their true flow"):
        _brains_cfg(tmp_path, tiny_overrides, "x", flow_weight=0.5)
    with pytest.raises(InputError, match="--flow-weight needs"):
        _cfg(tmp_path, tiny_overrides, "x", data=str(tmp_path), flow_weight=0.5)


def test_workers_stay_quiet_when_the_main_process_drops_an_fd_share(tmp_path):
    """A worker's fd-sharing thread reports a connection the exiting main process dropped: silent; any other
    error still reaches the hook."""
    import importlib.util
    import sys

    from emorph_deploy.train.loop import _quiet_lost_fd_share

    src = tmp_path / "resource_sharer.py"  # stands for multiprocessing.resource_sharer
    src.write_text("def serve(exc):\n    raise exc\n")
    spec = importlib.util.spec_from_file_location("fake_resource_sharer", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    seen = []
    hook = _quiet_lost_fd_share(lambda *a: seen.append(a[0]))
    for exc in (ConnectionResetError(104, "reset"), BrokenPipeError(), ValueError("real")):
        try:
            mod.serve(exc)
        except BaseException:
            hook(*sys.exc_info())
    try:
        raise ConnectionResetError(104, "elsewhere")
    except ConnectionResetError:
        hook(*sys.exc_info())
    assert seen == [ValueError, ConnectionResetError]
