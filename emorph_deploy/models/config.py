"""``ModelConfig``: the frozen architecture description of an EfficientMorph model (saved with the weights).

No torch import here: the config is cheap to build, validate and serialise (``to_dict`` / ``from_dict``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from emorph_deploy.errors import InputError

ATTENTION_KINDS: tuple[str, ...] = ("plane", "cga")
WARP_SAMPLERS: tuple[str, ...] = ("grid_sample", "gather")
FULL_RES_INPUTS: tuple[str, ...] = ("pair", "warped")
#: Total down-sampling of the patch (2) + Hi-Res merge (2) + stage merge (2) pyramid: sizes must divide by it.
SIZE_MULTIPLE: int = 8

Plane = tuple[int, int]

#: ModelConfig fields that act only while training (the weights and inference do not depend on them): two
#: configs that differ only here describe the same model (a checkpoint resumed with another stochastic depth).
TRAINING_ONLY_FIELDS: frozenset[str] = frozenset({"drop_path"})


def nearest_valid_size(size: tuple[int, ...], multiple: int = SIZE_MULTIPLE) -> tuple[int, ...]:
    """Nearest size whose every axis is a positive multiple of ``multiple`` (ties round up)."""
    return tuple(max(multiple, math.floor(s / multiple + 0.5) * multiple) for s in size)


def default_planes(depths: tuple[int, ...]) -> tuple[tuple[Plane, ...], ...]:
    """Planes cycle (1,2) → (2,3) → (3,1) over all blocks of all stages (axes 1,2,3 = D,H,W).

    em-23: (1,2),(2,3) | (3,1),(1,2),(2,3);  em-11: (1,2) | (2,3).
    """
    cycle: tuple[Plane, ...] = ((1, 2), (2, 3), (3, 1))
    out: list[tuple[Plane, ...]] = []
    i = 0
    for d in depths:
        out.append(tuple(cycle[(i + j) % 3] for j in range(d)))
        i += d
    return tuple(out)


def _tupleize(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_tupleize(v) for v in value)
    return value


def _listify(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_listify(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an EfficientMorph model. All defaults (= ``em-23-hires``) live here.

    ``planes`` and ``pos_channels_per_axis`` may be ``None`` = derived (see :attr:`block_planes`,
    :attr:`pos_channels`), so that overriding ``depths`` or ``patch_dim`` alone stays consistent.
    """

    name: str = "em-23-hires"
    img_size: tuple[int, int, int] = (160, 192, 224)  # (D, H, W) of the model grid
    in_chans: int = 2  # cat(moving, fixed)
    patch_dim: int = 24  # channels of the patch-2 embedding
    embed_dims: tuple[int, int] = (96, 192)  # stage widths
    depths: tuple[int, int] = (2, 3)  # blocks per stage
    heads: tuple[int, int] = (4, 8)  # attention heads per stage
    planes: tuple[tuple[Plane, ...], ...] | None = None  # per stage, per block; None = default_planes(depths)
    mlp_ratio: float = 4.0
    drop_path: float = 0.3  # stochastic depth rises linearly 0 → drop_path over all blocks
    qkv_bias: bool = False
    attention: str = "plane"  # "plane" | "cga" (cascaded group attention)
    decoder_widths: tuple[int, int] = (96, 16)  # widths of the up2 (D/4) and up3 (D/2) conv pairs
    skip_width: int = 48  # conv(in_chans → skip_width) on AvgPool(input) at D/2
    pos_channels_per_axis: int | None = None  # sinusoidal PE channels per axis; None = 2·floor(patch_dim/6)
    flow_init_std: float = 1e-5  # flow-head weight init N(0, std), bias 0
    # Full-resolution residual stage: conv(cat(up(decoder D/2 features), input) → width), then a flow head
    # whose output is added to the upsampled D/2 flow (0 = off: the flow is the D/2 flow upsampled ×2).
    full_res_width: int = 0
    # what the full-resolution stage sees next to the features: "pair" = cat(moving, fixed) as given;
    # "warped" = cat(moving warped by the D/2 flow, fixed), so its few full-resolution voxels of receptive
    # field see the residual misalignment instead of the whole displacement
    full_res_input: str = "pair"
    # Cascade stage (``layers.cascade.CascadeStage``): a conv U-Net of this base width that sees the moving
    # image warped by the flow so far and adds a correction (0 = off).
    cascade_width: int = 0
    warp_sampler: str = "grid_sample"  # "grid_sample" | "gather" (export without GridSample)

    def __post_init__(self) -> None:
        # Normalise sequences to tuples (from JSON or user lists) without breaking frozenness.
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, _tupleize(v))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        size = tuple(int(s) for s in self.img_size)
        if len(size) != 3:
            raise InputError(f"img_size must be (D, H, W); got {self.img_size!r}; fix: pass three integers")
        if any(s % SIZE_MULTIPLE or s < SIZE_MULTIPLE for s in size):
            raise InputError(
                f"img_size {size} is not a positive multiple of {SIZE_MULTIPLE} per axis (patch 2 + two "
                f"2×2×2 merges); fix: use the nearest valid size {nearest_valid_size(size)} (pad or crop)"
            )
        object.__setattr__(self, "img_size", size)
        n_stages = len(self.embed_dims)
        if n_stages != 2 or len(self.depths) != 2 or len(self.heads) != 2:
            raise InputError(
                f"embed_dims, depths and heads need 2 entries (two stages); got {self.embed_dims}, "
                f"{self.depths}, {self.heads}"
            )
        if len(self.decoder_widths) != 2:
            raise InputError(f"decoder_widths needs 2 entries (up2, up3); got {self.decoder_widths}")
        for c, h in zip(self.embed_dims, self.heads, strict=True):
            if h < 1 or c % h:
                raise InputError(f"embed dim {c} is not divisible by heads {h}; fix: use heads dividing it")
        if min(self.depths) < 1:
            raise InputError(f"depths must be ≥ 1 per stage; got {self.depths}")
        if self.attention not in ATTENTION_KINDS:
            raise InputError(f"attention must be one of {ATTENTION_KINDS}; got {self.attention!r}")
        if self.warp_sampler not in WARP_SAMPLERS:
            raise InputError(f"warp_sampler must be one of {WARP_SAMPLERS}; got {self.warp_sampler!r}")
        if self.in_chans < 2:
            raise InputError(f"in_chans must be ≥ 2 (moving + fixed); got {self.in_chans}")
        if self.full_res_width < 0:
            raise InputError(
                f"full_res_width must be ≥ 0 (0 = no full-resolution stage); got {self.full_res_width}"
            )
        if self.cascade_width < 0:
            raise InputError(f"cascade_width must be ≥ 0 (0 = no cascade stage); got {self.cascade_width}")
        if self.full_res_input not in FULL_RES_INPUTS:
            raise InputError(f"full_res_input must be one of {FULL_RES_INPUTS}; got {self.full_res_input!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise InputError(f"drop_path must be in [0, 1); got {self.drop_path}")
        p = self.pos_channels
        if p < 0 or p % 2 or 3 * p > self.patch_dim:
            raise InputError(
                f"pos_channels_per_axis must be even with 3·p ≤ patch_dim={self.patch_dim}; got {p}; "
                f"fix: use ≤ {2 * (self.patch_dim // 6)} or None"
            )
        if self.planes is not None:
            if len(self.planes) != 2 or any(
                len(pl) != d for pl, d in zip(self.planes, self.depths, strict=True)
            ):
                raise InputError(
                    f"planes must give one plane per block per stage (depths {self.depths}); "
                    f"got {self.planes}; fix: pass planes=None for the default cycle"
                )
            for stage in self.planes:
                for plane in stage:
                    if len(plane) != 2 or set(plane) - {1, 2, 3} or plane[0] == plane[1]:
                        raise InputError(
                            f"a plane is two distinct axes among 1, 2, 3 (D, H, W); got {plane!r}"
                        )

    # ------------------------------------------------------------------ derived values
    @property
    def block_planes(self) -> tuple[tuple[Plane, ...], ...]:
        """Plane of every block, per stage (explicit ``planes`` or the default cycle)."""
        return self.planes if self.planes is not None else default_planes(tuple(self.depths))

    @property
    def pos_channels(self) -> int:
        """Sinusoidal position-encoding channels per axis (8 for patch_dim 24)."""
        if self.pos_channels_per_axis is not None:
            return int(self.pos_channels_per_axis)
        return 2 * (self.patch_dim // 6)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists); :meth:`from_dict` restores the exact config."""
        return {f.name: _listify(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an ``InputError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(
                f"model config has unknown keys {unknown}; expected a subset of {sorted(names)}; "
                f"fix: upgrade emorph or strip those keys"
            )
        return cls(**{k: _tupleize(v) for k, v in data.items()})

    def replace(self, **overrides: Any) -> ModelConfig:
        """Copy with fields replaced (validated); unknown field names are an ``InputError``."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise InputError(f"unknown model option(s) {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **{k: _tupleize(v) for k, v in overrides.items()})


def warps_inside(model: Mapping[str, Any] | None) -> bool:
    """True when a model config (a :class:`ModelConfig` as its dict, e.g. a checkpoint's or an export
    manifest's ``model``) has the network warp the moving image inside itself (``full_res_input``
    "warped", or a cascade stage): a bf16 runtime samples that warp correctly only with integer gather indices
    (``emorph_deploy.engines.openvino.check_bf16_warp``, in ``build_ir`` and the OpenVINO runner)."""
    model = model or {}
    return model.get("full_res_input") == "warped" or int(model.get("cascade_width") or 0) > 0


__all__ = [
    "ATTENTION_KINDS",
    "FULL_RES_INPUTS",
    "SIZE_MULTIPLE",
    "TRAINING_ONLY_FIELDS",
    "WARP_SAMPLERS",
    "ModelConfig",
    "default_planes",
    "nearest_valid_size",
    "warps_inside",
]
