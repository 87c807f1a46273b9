"""``TrainConfig``: every training option with its default in one place (saved in checkpoints).

Defaults follow the released recipe (shared/reference/efficientmorph.md): NCC (Gaussian window 9, σ 1.5)
+ 1.0 × diffusion [+ 1.0 × soft Dice when labels exist]; Adam (amsgrad) lr 5e-4, weight decay 0; cosine
annealing T_max 20 epochs down to 5e-5, stepped per epoch; batch 1; both directions per iteration.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from emorph_deploy.choices import Amp, BestMetric, SyntheticKind
from emorph_deploy.errors import InputError
from emorph_deploy.runtime import cpu_has_native_bf16

__all__ = [
    "AMP_CHOICES",
    "BEST_METRICS",
    "RESUMABLE_OVERRIDES",
    "SYNTHETIC_KINDS",
    "TrainConfig",
    "resolve_amp",
]


AMP_CHOICES: tuple[str, ...] = tuple(a.value for a in Amp)
SYNTHETIC_KINDS: tuple[str, ...] = tuple(k.value for k in SyntheticKind)
BEST_METRICS: tuple[str, ...] = tuple(m.value for m in BestMetric)


def resolve_amp(amp: str, device_type: str) -> str:
    """The precision actually used for ``amp`` on ``device_type``: "none", "bf16" or "fp16"."""
    if amp == "auto":
        if device_type == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "none"
        return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "none"
    if amp == "fp16" and device_type != "cuda":
        return "none"  # fp16 autocast needs a gradient scaler and fast fp16 kernels: CUDA only
    return amp


#: Options that may differ between the original run and a ``--resume`` (everything else must match).
RESUMABLE_OVERRIDES: frozenset[str] = frozenset(
    {
        "epochs",
        "workers",
        "log_every",
        "checkpoint_every",
        "tensorboard",
        "progress",
        "device",
        "out",
        "max_steps",
        "max_minutes",
        "val_every",
        "amp",
        # a new learning-rate phase: the cosine restarts at the resumed epoch (see Trainer.load_resume)
        "lr",
        "lr_min",
        "t_max",
        # a change of training data within the same generator (the held-out validation pairs do not change)
        "synth_fine_disp_mm",
        "synth_affine_fraction",
        "synth_known_flow",
        "synth_same_subject",
        "synth_shapes",
        # loss weights: a fine-tuning phase may re-balance them (e.g. less smoothing); the model is the same
        "reg_weight",
        "ncc_weight",
        "dice_weight",
        "flow_weight",
        # what `best` follows: a phase aimed at pre-aligned pairs selects by their Dice (best restarts)
        "best_metric",
        # stochastic depth: a training-only regulariser; the weights and inference do not depend on it
        "drop_path",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """Training options. ``to_dict``/``from_dict`` round-trip through JSON."""

    # model
    model: str = "em-23-hires"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (widths, depths, ...)
    # stochastic depth of the blocks (ModelConfig.drop_path); None = the variant's. Synthetic data is
    # unlimited, so a long campaign may lower it (less regularisation, a better fit) on --resume.
    drop_path: float | None = None
    # warm start ("default" = the packaged model): a checkpoint whose weights initialise every tensor of the
    # same name and shape; tensors it lacks (new layers, e.g. a full-resolution stage) keep their
    # initialisation. Ignored on --resume.
    init_from: str | None = None
    # parameter-name prefixes that train (e.g. ("full_res.",) after a warm start: the new layers learn on
    # the frozen rest, which keeps its features); () = every parameter trains
    train_only: tuple[str, ...] = ()
    # grid / data
    grid: str = "2mm"  # Preprocessing preset ("1mm" = 160×192×224 as in the paper, "2mm" = 80×96×112)
    grid_shape: tuple[int, int, int] | None = None  # overrides the preset's shape (e.g. 32³ for tests)
    spacing_mm: float | None = None  # overrides the preset's spacing
    data: str | None = None  # folder or CSV of volumes; None = synthetic
    atlas: str | None = None  # atlas-to-subject pairs with this fixed image (folder/CSV data only)
    val_fraction: float = 0.1  # share of subjects held out for validation (folder/CSV data)
    val_pairs: int = 4  # validation pairs evaluated each epoch
    synthetic_kind: str = "mix"  # a SyntheticKind value
    synthetic_max_disp: float = 4.0  # largest true displacement of synth/template pairs, in voxels
    synth_ramp_epochs: int = 0  # brains: deformation/affine ranges grow from 40 % to 100 % over N epochs
    synth_fine_disp_mm: float = 0.0  # brains: largest fine-scale (gyral, 6-12 mm) displacement; 0 = off
    synth_affine_fraction: float = 1.0  # brains: scales the residual-affine ranges (< 1: pre-aligned pairs)
    # brains: the fixed subject is the moving one under one more random subject map, so each pair carries
    # its true flow (BrainSynthConfig.known_flow) for the endpoint loss (flow_weight)
    synth_known_flow: bool = False
    # brains: share of near-identical pairs (the moving subject under a further map of random strength,
    # BrainSynthConfig.p_same_subject)
    synth_same_subject: float = 0.0
    # brains: share of pairs with random shapes inside the head instead of tissue parcels
    # (BrainSynthConfig.p_shapes)
    synth_shapes: float = 0.0
    # schedule
    epochs: int = 200
    # iterations per epoch (each = both directions, 2 optimizer steps); None = 100 for synthetic data, one
    # pass over the training subjects (pairs) for folder/CSV data
    steps_per_epoch: int | None = None
    max_steps: int | None = None  # stop after this many iterations in total (per invocation; resumable)
    max_minutes: float | None = None  # stop (saving `last`) after this much wall time in this invocation
    batch_size: int = 1  # per process
    workers: int = 0
    # optimisation
    lr: float = 5e-4
    lr_min: float = 5e-5
    t_max: int = 20  # cosine period in epochs
    weight_decay: float = 0.0
    amsgrad: bool = True
    grad_clip: float | None = 10.0  # max global grad norm; None/0 = off
    bidirectional: bool = True
    # loss
    ncc_window: int = 9
    ncc_sigma: float = 1.5
    reg_weight: float = 1.0
    dice_weight: float = 1.0  # applied only when label maps exist; 0 = off
    # NCC weight; pairs flagged ``same_contrast`` = 0 (brains data) get no NCC term: their intensities do
    # not correspond, only their labels do
    ncc_weight: float = 1.0
    # endpoint error (mean |flow − true flow| in voxels, inside the fixed labels) on pairs that carry their
    # true flow (synthetic data; brains only with synth_known_flow), the moving→fixed direction only; 0 = off
    flow_weight: float = 0.0
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # an Amp value; "auto" = bf16 where native (see resolve_amp), fp16 on CUDA only
    out: str = "runs/train"
    log_every: int = 10
    val_every: int = 1  # epochs
    best_metric: str = "auto"  # a BestMetric value: the validation column `best` follows (higher = better)
    checkpoint_every: int = 20  # also save `last` every N iterations mid-epoch (0 = at epoch ends only)
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.grid_shape, list):
            object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        object.__setattr__(self, "train_only", tuple(str(p) for p in self.train_only))
        if self.model_overrides is None:
            object.__setattr__(self, "model_overrides", {})
        object.__setattr__(self, "model_overrides", dict(self.model_overrides))
        self._validate()

    def _validate(self) -> None:
        def pos(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v < 0 or (v == 0 and not allow_zero):
                bound = "≥ 0" if allow_zero else "> 0"
                raise InputError(f"--{name.replace('_', '-')} must be {bound}; got {v}")

        if self.steps_per_epoch is not None:
            pos("steps_per_epoch")
        for n in ("epochs", "batch_size", "lr", "t_max", "ncc_window", "log_every", "val_every"):
            pos(n)
        for n in (
            "workers",
            "lr_min",
            "weight_decay",
            "reg_weight",
            "dice_weight",
            "checkpoint_every",
            "val_pairs",
            "ncc_weight",
            "flow_weight",
            "synth_ramp_epochs",
            "synth_fine_disp_mm",
            "synth_affine_fraction",
            "synth_same_subject",
            "synth_shapes",
        ):
            pos(n, allow_zero=True)
        for n in ("synth_same_subject", "synth_shapes"):
            if getattr(self, n) > 1:
                raise InputError(f"--{n.replace('_', '-')} must be a share in [0, 1]; got {getattr(self, n)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise InputError(f"--max-minutes must be > 0; got {self.max_minutes}")
        if self.max_steps is not None and self.max_steps < 1:
            raise InputError(f"--max-steps must be ≥ 1; got {self.max_steps}")
        if self.best_metric not in BEST_METRICS:
            raise InputError(f"--best-metric must be one of {BEST_METRICS}; got {self.best_metric!r}")
        if self.best_metric == "dice_aligned" and not (self.synthetic and self.synthetic_kind == "brains"):
            got = f"--data {self.data}" if self.data else f"--synthetic-kind {self.synthetic_kind}"
            raise InputError(
                "--best-metric dice_aligned needs the pre-aligned validation pairs of --synthetic-kind "
                f"brains; got {got}; fix: use --best-metric auto or dice"
            )
        if self.flow_weight > 0 and not (
            self.synthetic and (self.synthetic_kind != "brains" or self.synth_known_flow)
        ):
            got = f"--data {self.data}" if self.data else "--synthetic-kind brains without --synth-known-flow"
            raise InputError(
                "--flow-weight needs pairs that carry their true flow (synthetic data: --synthetic-kind "
                f"synth/template/mix, or brains with --synth-known-flow); got {got}; fix: add "
                "--synth-known-flow or use --flow-weight 0"
            )
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise InputError(f"--drop-path must be in [0, 1); got {self.drop_path}")
        if self.amp not in AMP_CHOICES:
            raise InputError(f"--amp must be one of {AMP_CHOICES}; got {self.amp!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be in [0, 1); got {self.val_fraction}")
        if self.synthetic_kind not in SYNTHETIC_KINDS:
            raise InputError(
                f"--synthetic-kind must be one of {SYNTHETIC_KINDS}; got {self.synthetic_kind!r}"
            )
        if not self.synthetic_max_disp > 0:
            raise InputError(f"--synthetic-max-disp must be > 0 voxels; got {self.synthetic_max_disp}")
        if self.grid_shape is not None and len(self.grid_shape) != 3:
            raise InputError(f"--grid-shape needs three sizes D H W; got {self.grid_shape}")
        if self.ncc_window % 2 == 0:
            raise InputError(f"--ncc-window must be odd; got {self.ncc_window}")

    # ------------------------------------------------------------------ derived
    def preprocessing(self) -> Any:
        """The ``Preprocessing`` of the model grid (preset, with shape/spacing overrides)."""
        from emorph_deploy.data.preprocess import Preprocessing

        pre = Preprocessing.preset(self.grid)
        changes: dict[str, Any] = {}
        if self.grid_shape is not None:
            changes["grid_shape"] = tuple(self.grid_shape)
        if self.spacing_mm is not None:
            changes["spacing_mm"] = (float(self.spacing_mm),) * 3
        return dataclasses.replace(pre, **changes) if changes else pre

    def model_config(self) -> Any:
        """The ``ModelConfig``: the named variant + overrides, with ``img_size`` = the grid shape."""
        from emorph_deploy.models import get_config

        overrides = dict(self.model_overrides)
        if self.drop_path is not None:
            overrides["drop_path"] = self.drop_path
        overrides["img_size"] = tuple(self.preprocessing().grid_shape)
        return get_config(self.model, **overrides)

    @property
    def synthetic(self) -> bool:
        return self.data is None

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples → lists, deep copy

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(
                f"training config has unknown keys {unknown}; fix: upgrade emorph or start a new run"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)
