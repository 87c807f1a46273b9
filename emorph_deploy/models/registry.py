"""Named EfficientMorph variants, the ``create_model`` factory, and cheap size/compute summaries.

Parameter counts and GMACs are computed on the ``meta`` device (no memory, no arithmetic), so listing every
variant at 160×192×224 takes well under a second each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import InputError
from emorph_deploy.models.config import ModelConfig

if TYPE_CHECKING:
    from emorph_deploy.models.efficientmorph import EfficientMorph

DEFAULT_MODEL = "em-23-hires"
#: Size at which ``emorph models`` reports GMACs (the OASIS/IXI grid of the paper).
REFERENCE_SIZE: tuple[int, int, int] = (160, 192, 224)


@dataclass(frozen=True)
class ModelSpec:
    """A registered variant: its config, a one-line description and the paper's reference numbers."""

    config: ModelConfig
    description: str
    reference_params: int | None = None
    reference_gmacs: float | None = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> None:
    """Register a variant under ``spec.config.name`` (names are unique)."""
    name = spec.config.name
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is already registered")
    _REGISTRY[name] = spec


register_model(
    ModelSpec(
        ModelConfig(name="em-23-hires"),
        "depths (2, 3), plane attention, Hi-Res tokenisation (default)",
        reference_params=2_794_011,
        reference_gmacs=319.7,
    )
)
register_model(
    ModelSpec(
        ModelConfig(name="em-11-hires", depths=(1, 1)),
        "depths (1, 1), plane attention, Hi-Res tokenisation",
        reference_params=1_793_883,
        reference_gmacs=235.1,
    )
)
_SMALL = ModelConfig(
    name="em-23-hires-s",
    img_size=(80, 96, 112),
    patch_dim=12,
    embed_dims=(48, 96),
    heads=(2, 4),
    decoder_widths=(48, 16),
    skip_width=24,
)
register_model(
    ModelSpec(
        _SMALL,
        "half-width em-23-hires (same depths, planes and head width) for 2 mm grids and CPU training",
    )
)
register_model(
    ModelSpec(
        _SMALL.replace(name="em-23-hires-s-fr", full_res_width=8),
        "em-23-hires-s plus a full-resolution residual flow stage (width 8): boundaries move by less than"
        " the D/2 flow's 2-voxel grid; warm-starts from em-23-hires-s (emorph train --init-from); the"
        " packaged default model",
    )
)
register_model(
    ModelSpec(
        _SMALL.replace(name="em-23-hires-s-frw", full_res_width=8, full_res_input="warped"),
        "em-23-hires-s-fr whose full-resolution stage sees the moving image warped by the D/2 flow (one"
        " more warp): it corrects the residual misalignment locally; warm-starts from em-23-hires-s",
    )
)
register_model(
    ModelSpec(
        _SMALL.replace(
            name="em-23-hires-s-frwc", full_res_width=8, full_res_input="warped", cascade_width=16
        ),
        "em-23-hires-s-frw plus a cascade stage (a conv U-Net, width 16, on the moving image warped by the"
        " flow so far) that adds a correction; warm-starts from em-23-hires-s-frw",
    )
)
register_model(
    ModelSpec(
        ModelConfig(name="em-23-hires-cga", attention="cga"),
        "depths (2, 3), cascaded group attention on planes",
    )
)
register_model(
    ModelSpec(
        ModelConfig(name="em-11-hires-cga", depths=(1, 1), attention="cga"),
        "depths (1, 1), cascaded group attention on planes",
    )
)


def list_models() -> list[str]:
    """Registered variant names, default first."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registered :class:`ModelSpec` of ``name``; unknown names are an ``InputError``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            f"unknown model '{name}'; expected one of {list_models()}; fix: run 'emorph models' to list them"
        ) from None


def get_config(
    name_or_config: str | ModelConfig | dict[str, Any] | None = None, **overrides: Any
) -> ModelConfig:
    """Resolve a variant name, config or config dict (plus overrides) to a validated :class:`ModelConfig`."""
    if name_or_config is None:
        cfg = get_spec(DEFAULT_MODEL).config
    elif isinstance(name_or_config, ModelConfig):
        cfg = name_or_config
    elif isinstance(name_or_config, dict):
        cfg = ModelConfig.from_dict(name_or_config)
    elif isinstance(name_or_config, str):
        cfg = get_spec(name_or_config).config
    else:
        raise InputError(
            f"create_model expects a variant name, ModelConfig or dict; got {type(name_or_config).__name__}"
        )
    return cfg.replace(**overrides) if overrides else cfg


def create_model(
    name_or_config: str | ModelConfig | dict[str, Any] | None = DEFAULT_MODEL, **overrides: Any
) -> EfficientMorph:
    """Build an :class:`EfficientMorph` from a registered name (default ``em-23-hires``), a ``ModelConfig`` or
    its dict, with any config field overridden, e.g. ``create_model("em-23-hires", img_size=(32, 32, 32),
    embed_dims=(16, 32), patch_dim=8, decoder_widths=(16, 8), skip_width=8)``.
    """
    from emorph_deploy.models.efficientmorph import EfficientMorph

    return EfficientMorph(get_config(name_or_config, **overrides))


def count_params(config: ModelConfig) -> int:
    """Parameter count of ``config`` (independent of ``img_size``: built at 8³ so no large buffers)."""
    from emorph_deploy.models.efficientmorph import EfficientMorph, count_parameters

    return count_parameters(EfficientMorph(config.replace(img_size=(8, 8, 8))))


def count_macs(config: ModelConfig, batch: int = 1) -> int:
    """Multiply-accumulates of one forward (MACs = FLOPs/2 from ``torch.utils.flop_counter``), meta device.

    Counts convolutions, linear layers and attention matmuls (what the FLOP counter sees); the warp, norms,
    softmax and resampling are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from emorph_deploy.models.efficientmorph import EfficientMorph

    with torch.device("meta"):
        model = EfficientMorph(config).eval()
        x = torch.empty(batch, 1, *config.img_size)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, x)
    return int(counter.get_total_flops()) // 2


#: MACs of the registered variants at REFERENCE_SIZE, batch 1, as computed by :func:`count_macs` (a test
#: recomputes them). Cached because the first meta-device forward imports sympy (a few seconds).
REFERENCE_MACS: dict[str, int] = {
    "em-23-hires": 319_690_506_240,
    "em-11-hires": 235_050_762_240,
    "em-23-hires-cga": 311_329_751_040,
    "em-11-hires-cga": 231_520_665_600,
    "em-23-hires-s": 125_225_533_440,
    "em-23-hires-s-fr": 144_658_268_160,
    "em-23-hires-s-frw": 144_658_268_160,  # the warp is not counted (no MACs)
    "em-23-hires-s-frwc": 169_554_739_200,
}


@functools.lru_cache(maxsize=64)
def _info_cached(config_json: str, name: str) -> tuple[int, int]:
    import json

    cfg = ModelConfig.from_dict(json.loads(config_json))
    registered = name in _REGISTRY and cfg == _REGISTRY[name].config.replace(img_size=REFERENCE_SIZE)
    if registered and name in REFERENCE_MACS:
        return count_params(cfg), REFERENCE_MACS[name]
    return count_params(cfg), count_macs(cfg)


def model_info(name: str, img_size: tuple[int, int, int] = REFERENCE_SIZE) -> dict[str, Any]:
    """Summary of a registered variant: parameters, GMACs at ``img_size`` (default 160×192×224), reference
    numbers, and its config dict.
    """
    import json

    spec = get_spec(name)
    cfg = spec.config.replace(img_size=tuple(img_size))
    params, macs = _info_cached(json.dumps(cfg.to_dict(), sort_keys=True), name)
    return {
        "name": name,
        "description": spec.description,
        "attention": cfg.attention,
        "depths": list(cfg.depths),
        "params": params,
        "gmacs": macs / 1e9,
        "img_size": list(cfg.img_size),
        "reference_params": spec.reference_params,
        "reference_gmacs": spec.reference_gmacs,
        "default": name == DEFAULT_MODEL,
        "config": cfg.to_dict(),
    }


__all__ = [
    "DEFAULT_MODEL",
    "REFERENCE_MACS",
    "REFERENCE_SIZE",
    "ModelSpec",
    "count_macs",
    "count_params",
    "create_model",
    "get_config",
    "get_spec",
    "list_models",
    "model_info",
    "register_model",
]
