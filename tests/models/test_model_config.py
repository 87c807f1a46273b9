"""ModelConfig validation/serialisation and the variant registry (parameter counts, GMACs)."""

from __future__ import annotations

import json

import pytest
import torch

from emorph_deploy.errors import InputError
from emorph_deploy.models import (
    ModelConfig,
    count_macs,
    count_parameters,
    count_params,
    create_model,
    get_config,
    list_models,
    model_info,
)

TINY = dict(
    img_size=(16, 16, 24),
    embed_dims=(16, 32),
    heads=(2, 4),
    patch_dim=8,
    decoder_widths=(16, 8),
    skip_width=8,
)


@pytest.fixture(autouse=True)
def _single_thread():
    """2 shared cores: intra-op threads only contend on these tiny problems (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_defaults_are_em23():
    cfg = ModelConfig()
    assert cfg.name == "em-23-hires"
    assert cfg.img_size == (160, 192, 224)
    assert cfg.embed_dims == (96, 192) and cfg.depths == (2, 3) and cfg.heads == (4, 8)
    assert cfg.block_planes == (((1, 2), (2, 3)), ((3, 1), (1, 2), (2, 3)))
    assert cfg.pos_channels == 8
    assert get_config("em-11-hires").block_planes == (((1, 2),), ((2, 3),))


def test_round_trip_json_restores_tuples():
    cfg = get_config("em-11-hires-cga", img_size=(32, 32, 40), planes=(((2, 3),), ((3, 1),)))
    data = json.loads(json.dumps(cfg.to_dict()))
    back = ModelConfig.from_dict(data)
    assert back == cfg
    assert isinstance(back.img_size, tuple) and isinstance(back.planes[0][0], tuple)
    assert hash(back) == hash(cfg)


def test_bad_size_names_nearest_valid_size():
    with pytest.raises(InputError, match=r"\(160, 192, 224\)"):
        ModelConfig(img_size=(161, 190, 227))
    with pytest.raises(InputError, match=r"\(8, 16, 32\)"):
        get_config("em-23-hires", img_size=(3, 17, 30))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(heads=(5, 8)),
        dict(attention="window"),
        dict(warp_sampler="nope"),
        dict(depths=(1, 2, 3)),
        dict(planes=(((1, 2),), ((2, 3),))),
        dict(pos_channels_per_axis=8, patch_dim=8),
        dict(planes=(((1, 1), (2, 3)), ((3, 1), (1, 2), (2, 3)))),
    ],
)
def test_invalid_overrides_rejected(overrides):
    with pytest.raises(InputError):
        get_config("em-23-hires", **overrides)


def test_unknown_keys_rejected():
    with pytest.raises(InputError, match="unknown"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "window": 7})
    with pytest.raises(InputError, match="unknown"):
        create_model("em-23-hires", embed_dim=16)
    with pytest.raises(InputError, match="em-23-hires"):
        create_model("em-99")


def test_create_model_from_config_and_dict():
    cfg = get_config("em-11-hires", **TINY)
    m1 = create_model(cfg)
    m2 = create_model(cfg.to_dict())
    assert m1.config == m2.config == cfg
    assert count_parameters(m1) == count_parameters(m2) == count_params(cfg)


def test_registered_variants_and_parameter_counts():
    assert list_models()[0] == "em-23-hires"
    assert set(list_models()) == {
        "em-23-hires",
        "em-11-hires",
        "em-23-hires-s",
        "em-23-hires-s-fr",
        "em-23-hires-s-frw",
        "em-23-hires-s-frwc",
        "em-23-hires-cga",
        "em-11-hires-cga",
    }
    counts = {name: count_params(get_config(name)) for name in list_models()}
    # reference (public code) counts include an unused 2→16 conv (864 params) that we do not build
    assert abs(counts["em-23-hires"] - 2_794_011) / 2_794_011 < 0.01
    assert abs(counts["em-11-hires"] - 1_793_883) / 1_793_883 < 0.01
    assert counts["em-23-hires"] == 2_793_147  # hand count of the described modules
    assert counts["em-11-hires"] == 1_793_019
    # cascaded group attention: q/k/v cost 3C²/h instead of 3C² per block
    saved23 = 2 * (3 * 96**2 - 3 * 96**2 // 4) + 3 * (3 * 192**2 - 3 * 192**2 // 8)
    saved11 = (3 * 96**2 - 3 * 96**2 // 4) + (3 * 192**2 - 3 * 192**2 // 8)
    assert counts["em-23-hires-cga"] == counts["em-23-hires"] - saved23 == 2_461_371
    assert counts["em-11-hires-cga"] == counts["em-11-hires"] - saved11 == 1_675_515
    # half-width em-23 (packaged default): same depths/planes, every width halved, head width kept at 24
    small = get_config("em-23-hires-s")
    assert small.depths == (2, 3) and small.embed_dims == (48, 96) and small.img_size == (80, 96, 112)
    assert counts["em-23-hires-s"] == 723_303
    # + full-resolution stage: proj 16→8 (1³, bias), conv 10→8 (3³, bias), head 8→3 (3³, bias)
    fr = (16 * 8 + 8) + (10 * 8 * 27 + 8) + (8 * 3 * 27 + 3)
    assert get_config("em-23-hires-s-fr") == small.replace(name="em-23-hires-s-fr", full_res_width=8)
    assert counts["em-23-hires-s-fr"] == 723_303 + fr == 726_258
    # the warped-input variant: the same layers (one more warp, no parameters)
    frw = get_config("em-23-hires-s-frw")
    assert frw == small.replace(name="em-23-hires-s-frw", full_res_width=8, full_res_input="warped")
    assert counts["em-23-hires-s-frw"] == counts["em-23-hires-s-fr"]
    # + cascade stage (width 16, 3³ convs with bias): enc1 2→16, enc2 16→32, enc3 32→32, mid 32→32,
    # dec2 64→16, dec1 (16 + 16 + 16 decoder features)→16, head 16→3
    convs = [(2, 16), (16, 32), (32, 32), (32, 32), (64, 16), (48, 16), (16, 3)]
    cascade = sum(i * o * 27 + o for i, o in convs)
    frwc = get_config("em-23-hires-s-frwc")
    assert frwc == frw.replace(name="em-23-hires-s-frwc", cascade_width=16)
    assert counts["em-23-hires-s-frwc"] == counts["em-23-hires-s-frw"] + cascade == 846_069


def test_real_build_at_half_resolution_has_registered_count():
    # a real (non-meta) build at 80×96×112 (PE buffer 40×48×56) has the same parameters as the full-size model
    torch.manual_seed(0)
    model = create_model("em-23-hires", img_size=(80, 96, 112))
    assert count_parameters(model) == 2_793_147
    assert not any(k.endswith(("pos_enc.pe", "transformer.grid")) for k in model.state_dict())


def test_meta_mac_count_matches_real_count_small():
    from torch.utils.flop_counter import FlopCounterMode

    for attention in ("plane", "cga"):
        cfg = get_config("em-23-hires", attention=attention, **TINY)
        model = create_model(cfg).eval()
        x = torch.rand(1, 1, *cfg.img_size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, x)
        assert count_macs(cfg) == counter.get_total_flops() // 2


def test_cached_reference_macs_match_the_flop_counter():
    from emorph_deploy.models.registry import REFERENCE_MACS, REFERENCE_SIZE

    assert set(REFERENCE_MACS) == set(list_models())
    for name, macs in REFERENCE_MACS.items():
        assert count_macs(get_config(name, img_size=REFERENCE_SIZE)) == macs, name


def test_model_info_reference_gmacs():
    info = model_info("em-23-hires")
    assert info["params"] == 2_793_147
    assert abs(info["gmacs"] - 319.7) < 0.1
    assert abs(model_info("em-11-hires")["gmacs"] - 235.1) < 0.1
    assert info["config"]["img_size"] == [160, 192, 224]


def test_cli_models_json():
    from typer.testing import CliRunner

    from emorph_deploy.cli.app import app

    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert set(rows) == set(list_models())
    assert rows["em-23-hires"]["params"] == 2_793_147
    assert abs(rows["em-11-hires"]["gmacs"] - 235.1) < 0.1
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and "em-11-hires-cga" in table.output and "319.7" in table.output
    bad = CliRunner().invoke(app, ["models", "--size", "161x192x224"])
    assert bad.exit_code == 2
