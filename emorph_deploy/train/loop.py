"""The training loop: single process or PyTorch DDP under ``torchrun``.

One iteration = both directions (moving→fixed, then fixed→moving), one optimizer step each. Loss: local
NCC (Gaussian window) + ``reg_weight`` × diffusion [+ ``dice_weight`` × soft Dice of the warped one-hot labels
when the pair has label maps] [+ ``flow_weight`` × endpoint error when the pair carries its true flow, the
moving→fixed direction only]. The cosine schedule is stepped once per epoch. Each epoch ends with validation
(Dice, fraction J ≤ 0, NCC, endpoint error against the true flow of synthetic pairs) and the ``last``
checkpoint; ``best`` follows ``best_metric`` (default: the validation Dice, or NCC when no labels exist).
``--resume`` restores weights, optimizer, scheduler, step, epoch and RNG, and continues at the same iteration
and learning rate (data are a deterministic function of (seed, epoch, index)).

Run folder (rank 0 writes it): ``best.{safetensors,json}``, ``last.{safetensors,json,state.pt}``,
``train_log.csv`` (every ``log_every`` iterations), ``val_log.csv`` (every validation), ``tb/`` (TensorBoard,
if installed), ``config.json`` (the TrainConfig).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from torch.utils.data import DataLoader
    from torch.utils.tensorboard import SummaryWriter

from emorph_deploy.errors import (
    ConfigMismatchError,
    InputError,
    OutputExistsError,
    ProcessingError,
    interrupts_raise,
)
from emorph_deploy.fileio import check_writable, write_bytes_atomic, write_json_atomic
from emorph_deploy.train.checkpoint import (
    checkpoint_paths,
    load_checkpoint,
    load_checkpoint_meta,
    load_training_state,
    load_weights_partial,
    save_checkpoint,
    save_training_state,
    unwrap_model,
)
from emorph_deploy.train.config import RESUMABLE_OVERRIDES, TrainConfig, resolve_amp
from emorph_deploy.train.distributed import (
    DistContext,
    all_reduce_mean,
    barrier,
    cleanup_distributed,
    init_distributed,
)

__all__ = ["TrainResult", "Trainer", "resolve_resume_config", "train", "weights_digest"]

TRAIN_LOG_FIELDS = (
    "step",
    "epoch",
    "lr",
    "loss",
    "ncc",
    "reg",
    "dice_loss",
    "epe",
    "grad_norm",
    "steps_per_s",
    "elapsed_s",
)
VAL_FIELDS = (
    "dice",
    "dice_init",
    "dice_same",
    "dice_diff",
    "frac_jac_nonpos",
    "ncc",
    "ncc_init",
    "epe_vox",
    # brains data: the same held-out pairs without their residual affines (as emorph's affine leaves them), so
    # the nonlinear part the network adds after pre-alignment is seen on its own; not part of `dice`
    "dice_aligned",
    "dice_aligned_init",
)
MAX_BAD_STEPS = 20  # consecutive non-finite losses before giving up


@dataclass(frozen=True)
class TrainResult:
    """Summary of one :meth:`Trainer.fit` call (this process's view; rates and times cover this call only)."""

    step: int  #: iterations done in total (a resumed run counts the earlier ones too)
    epoch: int  #: epochs completed
    out: str  #: the run folder
    best: str  #: checkpoint stem of the best validation score (``<out>/best``; may not exist)
    last: str  #: checkpoint stem of the latest state (``<out>/last``)
    history: list[dict[str, float]]  #: validation rows (``step``, ``epoch``, ``lr`` and the metrics)
    first_loss: float | None  #: mean training loss of the first logged window (None: nothing logged)
    final_loss: float | None  #: mean training loss of the last logged window (None: nothing logged)
    steps_per_s_window: float  #: iterations per second in the last logged window (NaN: none logged)
    steps_per_s: float  #: iterations per second over the whole call (incl. data, validation, checkpoints)
    elapsed_s: float  #: wall time of the call, seconds
    lr: float  #: learning rate after the last step
    weights_sha256: str  #: :func:`weights_digest` of the final weights
    rank: int  #: this process's DDP rank (0 single process)
    world_size: int  #: number of processes

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain (JSON-friendly) dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- helpers
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_finite_batch(batch: dict[str, Any]) -> None:
    for key in ("moving", "fixed"):
        t = batch[key]
        if not torch.isfinite(t).all():
            raise InputError(
                f"training {key} image holds NaN/Inf voxels: expected finite intensities; "
                f"fix: clean the input volume"
            )


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, shapes, raw bytes): equal iff the weights are identical."""
    import hashlib

    h = hashlib.sha256()
    for k, v in unwrap_model(model).state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _trainable(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Parameter]:
    """The parameters that train: all, or those whose names start with one of ``prefixes`` (the others are
    frozen: ``requires_grad`` off, so autograd skips the backward through them)."""
    if not prefixes:
        return list(model.parameters())
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    chosen = [p for p in model.parameters() if p.requires_grad]
    if not chosen:
        tops = sorted({name.split(".")[0] + "." for name, _ in model.named_parameters()})
        raise InputError(
            f"--train-only {','.join(prefixes)} matches no parameter of the model; expected prefixes of "
            f"parameter names, e.g. {', '.join(tops[-4:])}; fix: use one of those"
        )
    return chosen


def _lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])


def _csv_bytes(fields: tuple[str, ...] | list[str], rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue().encode()


def _read_csv(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            conv: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    conv[k] = int(v) if k in ("step", "epoch") else float(v)
                except (TypeError, ValueError):
                    conv[k] = v
            out.append(conv)
    return out


def _clean_worker_errors(it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Re-raise a domain error from a DataLoader worker as the original one-line error."""
    from emorph_deploy.errors import EmorphError

    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except EmorphError as exc:
            text = str(exc)
            if "Original Traceback" in text:
                last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
                msg = last.split(": ", 1)[1] if ": " in last else last
                raise type(exc)(msg) from None
            raise
        yield batch


# ---------------------------------------------------------------------------------------------- data
def build_datasets(cfg: TrainConfig, pre: Any, world_size: int = 1) -> tuple[Any, Any]:
    """(train dataset, validation dataset); items are dicts of tensors (``moving``, ``fixed`` (1, D, H, W)
    float32, optional ``moving_labels``/``fixed_labels`` (1, D, H, W) int64 and ``flow`` (3, D, H, W))."""
    shape = tuple(pre.grid_shape)
    if cfg.synthetic and cfg.synthetic_kind == "brains":
        return _brain_datasets(cfg, pre, world_size)
    if cfg.synthetic:
        from emorph_deploy.data.synthetic import SyntheticPairs

        preset_shape = cfg.grid_shape is None
        kwargs: dict[str, Any] = {"max_disp": cfg.synthetic_max_disp}
        tkw = dict(kwargs)
        if preset_shape:  # real-world spacing of the preset; test grids fit the brain into the grid instead
            tkw["spacing"] = tuple(pre.spacing_mm)
        n_train = cfg.steps_per_epoch * cfg.batch_size * world_size
        train_ds = _SyntheticAdapter(
            SyntheticPairs(n_train, shape, seed=cfg.seed, kind=cfg.synthetic_kind), kwargs, tkw
        )
        val_ds = _SyntheticAdapter(
            SyntheticPairs(max(cfg.val_pairs, 1), shape, seed=cfg.seed + 104729, kind=cfg.synthetic_kind),
            kwargs,
            tkw,
        )
        return train_ds, val_ds
    from emorph_deploy.train.data import build_file_datasets

    return build_file_datasets(cfg, pre, world_size)


def _brain_datasets(cfg: TrainConfig, pre: Any, world_size: int) -> tuple[Any, Any]:
    """SynthMorph-style brain pairs; validation = held-out pairs, half same contrast, half different."""
    from emorph_deploy.data.brainsynth import BrainSynthConfig, BrainSynthPairs, heldout_pairs

    shape = tuple(pre.grid_shape)
    spacing = float(pre.spacing_mm[0]) if cfg.grid_shape is None else None  # test grids fit the brain
    n_train = cfg.steps_per_epoch * cfg.batch_size * world_size
    synth = BrainSynthConfig(
        fine_disp_mm=cfg.synth_fine_disp_mm,
        affine_fraction=cfg.synth_affine_fraction,
        known_flow=cfg.synth_known_flow,
        p_same_subject=cfg.synth_same_subject,
        p_shapes=cfg.synth_shapes,
    )
    train_ds = BrainSynthPairs(
        n_train, shape, seed=cfg.seed, spacing_mm=spacing, config=synth, ramp_epochs=cfg.synth_ramp_epochs
    )
    n_val = max(cfg.val_pairs, 1)

    def heldout(config: BrainSynthConfig | None = None) -> list[dict[str, Any]]:
        same = heldout_pairs((n_val + 1) // 2, shape, spacing, "same", config=config)
        return same + heldout_pairs(n_val // 2, shape, spacing, "different", config=config)

    # then the same subjects and contrasts without residual affines (validate() reports them apart)
    aligned = [{**item, "aligned": True} for item in heldout(BrainSynthConfig(affine_fraction=0.0))]
    return train_ds, heldout() + aligned


class _SyntheticAdapter(torch.utils.data.Dataset):
    """SyntheticPairs with separate kwargs for label-map and template pairs (spacing applies to templates)."""

    def __init__(self, ds: Any, synth_kwargs: dict[str, Any], template_kwargs: dict[str, Any]) -> None:
        self.ds = ds
        self.synth_kwargs = synth_kwargs
        self.template_kwargs = template_kwargs

    def set_epoch(self, epoch: int) -> None:
        self.ds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        from emorph_deploy.data.synthetic import synth_pair, template_pair

        epoch, index = key if isinstance(key, tuple) else (self.ds.epoch, key)
        if not 0 <= index < len(self.ds):
            raise IndexError(index)
        seed = (self.ds.seed, int(epoch), int(index))
        kind = self.ds.kind
        use_template = kind == "template" or (kind == "mix" and index % 2 == 1)
        if use_template:
            pair = template_pair(self.ds.shape, seed, **self.template_kwargs)
        else:
            pair = synth_pair(self.ds.shape, seed, **self.synth_kwargs)
        item = pair.to_tensors()
        item["index"] = int(index)
        return item


class _EpochKeys(torch.utils.data.Sampler):
    """Sampler of ``(epoch, index)`` keys, refilled each epoch (persistent workers need no set_epoch)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds model, losses, optimizer, schedule and data from a :class:`TrainConfig` and runs :meth:`fit`."""

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext | None = None,
        resume: bool = False,
        force: bool = False,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        from emorph_deploy.losses import DiffusionLoss, NCCLoss, SoftDiceLoss

        if cfg.steps_per_epoch is None:
            if cfg.synthetic:
                cfg = cfg.replace(steps_per_epoch=100)
            else:
                from emorph_deploy.train.data import default_steps_per_epoch

                cfg = cfg.replace(steps_per_epoch=default_steps_per_epoch(cfg, ctx.world_size if ctx else 1))
        self.cfg = cfg
        if ctx is None:
            from emorph_deploy.train.distributed import _resolve_device

            ctx = DistContext(device=_resolve_device(cfg.device, 0))
        self.ctx = ctx
        self.out = Path(cfg.out)
        self.resume = resume
        self.force = force
        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))
        self.pre = cfg.preprocessing()
        self.model_config = cfg.model_config()
        self.device = torch.device(self.ctx.device)

        _seed_everything(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        from emorph_deploy.models import create_model

        core = create_model(self.model_config).to(self.device)
        self.core = core
        # freeze before DDP wraps the model: DDP expects a gradient for every parameter that requires one
        trainable = _trainable(core, cfg.train_only)
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model: nn.Module = DDP(
                core, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        else:
            self.model = core
        # seed data-independent randomness (drop path) differently per rank, reproducibly
        _seed_everything(cfg.seed + 7919 * (self.ctx.rank + 1))

        self.ncc = NCCLoss(window=cfg.ncc_window, sigma=cfg.ncc_sigma, kind="gaussian").to(self.device)
        self.reg = DiffusionLoss().to(self.device)
        self.dice = SoftDiceLoss().to(self.device)
        self.opt = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.t_max, eta_min=cfg.lr_min)
        self.amp_dtype: torch.dtype | None = None
        amp = resolve_amp(cfg.amp, self.device.type)
        if cfg.amp == "fp16" and amp == "none":
            self.echo(f"note: --amp fp16 is CUDA-only; training in fp32 on {self.device.type}")
        if amp != "none":
            self.amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.step = 0  # iterations done (each = 2 optimizer steps when bidirectional)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0
        self.best_score = -math.inf
        self.history: list[dict[str, Any]] = []
        self.train_rows: list[dict[str, Any]] = []
        self.val_rows: list[dict[str, Any]] = []
        self.tb: SummaryWriter | None = None  # opened by fit() when --tensorboard and installed
        self._bad_steps = 0  # consecutive non-finite losses
        self._last_window: float | None = None  # mean training loss of the last logged window
        # the training DataLoader, built on first use and kept (persistent workers) with its sampler;
        # _n_batches is the current epoch's iteration count
        self._keys = _EpochKeys()
        self._dl: DataLoader | None = None
        self._n_batches = 0

        self.train_ds, self.val_ds = build_datasets(cfg, self.pre, self.ctx.world_size)
        if len(self.train_ds) == 0:
            raise InputError("the training dataset is empty: expected at least 2 volumes; fix: check --data")

    # ------------------------------------------------------------------ run folder
    def prepare_out(self) -> None:
        """Validate the run folder before any work: no overwrite without --force/--resume."""
        if not self.ctx.is_main:
            return
        last = checkpoint_paths(self.out / "last")
        if self.resume:
            return
        existing = [p for p in (last.meta, last.weights, last.state, self.out / "best.json") if p.exists()]
        if existing and not self.force:
            raise OutputExistsError(
                f"run folder {self.out} already holds a run ({existing[0].name}): expected an empty folder; "
                f"fix: pass --resume to continue it, --force to overwrite it, or choose another --out"
            )
        check_writable(self.out / "config.json", force=True, create=True)

    def _save_config(self) -> None:
        if self.ctx.is_main:
            write_json_atomic(self.out / "config.json", self.cfg.to_dict(), force=True)

    # ------------------------------------------------------------------ resume
    def _maybe_start_lr_phase(self) -> None:
        """Restart the cosine at the resumed epoch when ``--lr/--lr-min/--t-max`` differ from the saved one.

        The saved scheduler keeps the run's schedule; a resume that asks for another one (e.g. a decay phase
        from ``lr`` down to ``lr_min`` over ``t_max`` epochs) starts that cosine from its top at the current
        epoch. Later resumes without these options load the new schedule unchanged.
        """
        cfg, sched = self.cfg, self.sched
        saved = (float(sched.base_lrs[0]), float(sched.eta_min), int(sched.T_max))
        wanted = (float(cfg.lr), float(cfg.lr_min), int(cfg.t_max))
        if all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(saved, wanted, strict=True)):
            return
        for group in self.opt.param_groups:
            group["lr"] = group["initial_lr"] = cfg.lr
        sched.base_lrs = [cfg.lr for _ in self.opt.param_groups]
        sched.eta_min, sched.T_max, sched.last_epoch = cfg.lr_min, cfg.t_max, 0
        sched._last_lr = [cfg.lr for _ in self.opt.param_groups]
        self.echo(
            f"new learning-rate phase at epoch {self.epoch}: cosine from {cfg.lr:.3g} to {cfg.lr_min:.3g} "
            f"over {cfg.t_max} epochs (was {saved[0]:.3g} to {saved[1]:.3g} over {saved[2]})"
        )

    def load_init(self) -> None:
        """Warm start (--init-from): same-named tensors from the checkpoint, new layers as initialised."""
        source: Any = self.cfg.init_from
        if source == "default":  # the packaged model (emorph_deploy/weights)
            from emorph_deploy.weights import default_checkpoint_path

            source = default_checkpoint_path()
        loaded, kept = load_weights_partial(self.core, source)
        if self.ctx.is_main:
            new = f"; {len(kept)} new tensor(s) keep their initialisation (e.g. {kept[0]})" if kept else ""
            self.echo(f"initialised {len(loaded)} tensor(s) from {source}{new}")

    def load_resume(self) -> None:
        path = self.out / "last"
        model, _ = load_checkpoint(
            path, map_location="cpu", expect_model=self.model_config, verify_hash=False
        )
        state = load_training_state(path)
        weights = state.get("model") or model.state_dict()
        try:
            self.core.load_state_dict(weights)
        except RuntimeError as exc:
            raise ConfigMismatchError(
                f"training state {path}.state.pt does not fit the model: {str(exc).splitlines()[0]}; "
                f"fix: start a new run"
            ) from None
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        self.best_score = float(state.get("best_score", -math.inf))
        was = str(state.get("best_metric", "auto"))
        if was != self.cfg.best_metric:
            # scores of another column do not compare: the next validation sets `best` again
            self.best_score = -math.inf
            self.echo(f"best now follows {self.cfg.best_metric} (was {was}): the next validation sets it")
        rng = (
            state.get("rng_per_rank", {}).get(str(self.ctx.rank))
            if self.ctx.world_size > 1
            else state.get("rng")
        )
        if rng is not None:
            _set_rng_state(rng)
        self._maybe_start_lr_phase()
        if self.ctx.is_main:
            rows = _read_csv(self.out / "train_log.csv")
            self.train_rows = [r for r in rows if r.get("step", 0) <= self.step]
            self.val_rows = [r for r in _read_csv(self.out / "val_log.csv") if r.get("step", 0) <= self.step]
        self.history = [dict(r) for r in self.val_rows]
        self.echo(
            f"resumed {self.out} at iteration {self.step} (epoch {self.epoch + 1}, "
            f"{self.step_in_epoch} iterations into it), lr {_lr(self.opt):.3g}"
        )

    def _save_last(self, metrics: dict[str, Any] | None) -> None:
        """Write `last` (weights + JSON + state) atomically; rank 0 only, after gathering RNG states."""
        rng = _rng_state()
        rng_per_rank = None
        if self.ctx.distributed:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, rng)
            rng_per_rank = {str(i): g for i, g in enumerate(gathered)}
        if not self.ctx.is_main:
            return
        state = {
            # the weights again, so weights and optimizer state always come from the same moment
            "model": {k: v.detach().cpu().clone() for k, v in self.core.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_score": self.best_score,
            "best_metric": self.cfg.best_metric,
            "rng": rng,
            "world_size": self.ctx.world_size,
        }
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        # state first: a `last.json` on disk always has a state at least as new as itself
        save_training_state(self.out / "last", state, force=True)
        save_checkpoint(
            self.core,
            self.out / "last",
            self.pre,
            training=self._training_meta(),
            metrics=metrics,
            force=True,
        )

    def _training_meta(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "lr": _lr(self.opt),
            "world_size": self.ctx.world_size,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "best_metric": self.cfg.best_metric,
        }

    # ------------------------------------------------------------------ one direction
    def _direction_loss(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        m_lab: torch.Tensor | None,
        f_lab: torch.Tensor | None,
        same_contrast: torch.Tensor | None = None,
        true_flow: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one direction. ``same_contrast`` (B,) in {0, 1} gates the NCC term per pair (None = all
        pairs share a contrast); ``true_flow`` (B, 3, D, H, W) voxels adds the endpoint error inside the
        fixed labels (``flow_weight``)."""
        from emorph_deploy.losses import endpoint_error, one_hot
        from emorph_deploy.models.warp import warp

        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            warped, flow = self.model(moving, fixed)  # (B, 1, D, H, W), (B, 3, D, H, W)
        warped = warped.float()
        flow = flow.float()
        l_reg = self.reg(flow)
        l_ncc = torch.zeros((), device=flow.device)
        if self.cfg.ncc_weight > 0 and (same_contrast is None or bool(same_contrast.any())):
            l_ncc = (
                self.ncc(warped, fixed)
                if same_contrast is None
                else self._ncc_per_item(warped, fixed, same_contrast)
            )
        loss = self.cfg.ncc_weight * l_ncc + self.cfg.reg_weight * l_reg
        parts = {"ncc": float(l_ncc.detach()), "reg": float(l_reg.detach())}
        if m_lab is not None and f_lab is not None and self.cfg.dice_weight > 0:
            # label values 0..max, a sort-free stand-in for unique; a label absent from both maps scores
            # Dice 1: it adds no gradient but weights the present labels' gradients by (present / listed)
            values = torch.arange(int(torch.maximum(m_lab.max(), f_lab.max())) + 1, device=m_lab.device)
            oh_m = one_hot(m_lab, values)  # (B, L, D, H, W)
            oh_f = one_hot(f_lab, values)
            l_dice = self.dice(warp(oh_m, flow), oh_f)
            loss = loss + self.cfg.dice_weight * l_dice
            parts["dice_loss"] = float(l_dice.detach())
        if true_flow is not None and self.cfg.flow_weight > 0:
            l_epe = endpoint_error(flow, true_flow, None if f_lab is None else f_lab > 0)
            loss = loss + self.cfg.flow_weight * l_epe
            parts["epe"] = float(l_epe.detach())
        return loss, parts

    def _ncc_per_item(self, warped: torch.Tensor, fixed: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Batch mean of the NCC loss with each pair weighted by its ``gate`` (0 or 1)."""
        per = torch.stack([self.ncc(warped[i : i + 1], fixed[i : i + 1]) for i in range(warped.shape[0])])
        return (per * gate.to(per)).mean()

    def _optimizer_step(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = float("nan")
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.core.parameters(), self.cfg.grad_clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        return grad_norm

    def _out_of_time(self, t_start: float) -> bool:
        """``--max-minutes`` reached (the same decision on every rank)."""
        if self.cfg.max_minutes is None:
            return False
        over = torch.tensor([float(time.perf_counter() - t_start > 60.0 * self.cfg.max_minutes)])
        if self.ctx.distributed:
            import torch.distributed as dist

            over = over.to(self.ctx.device)
            dist.all_reduce(over, op=dist.ReduceOp.MAX)
        if over.item() > 0 and self.ctx.is_main:
            self.echo(
                f"--max-minutes {self.cfg.max_minutes:g} reached at iteration {self.step}: saving "
                f"{self.out / 'last'}; continue with --resume"
            )
        return bool(over.item() > 0)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        ok = torch.isfinite(loss.detach()).to(torch.float32).reshape(1)
        if self.ctx.distributed:
            import torch.distributed as dist

            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def train_iteration(self, batch: dict[str, Any]) -> dict[str, float]:
        """Both directions, one optimizer step each; returns the mean loss parts."""
        moving = batch["moving"].to(self.device, non_blocking=True)
        fixed = batch["fixed"].to(self.device, non_blocking=True)
        m_lab = batch.get("moving_labels")
        f_lab = batch.get("fixed_labels")
        m_lab = m_lab.to(self.device) if m_lab is not None else None
        f_lab = f_lab.to(self.device) if f_lab is not None else None
        same = batch.get("same_contrast")
        same = same.to(self.device).reshape(-1) if same is not None else None
        true_flow = batch.get("flow")
        true_flow = true_flow.to(self.device) if true_flow is not None else None
        directions = [(moving, fixed, m_lab, f_lab, true_flow)]
        if self.cfg.bidirectional:  # the reverse direction's true flow (the inverse) is not known
            directions.append((fixed, moving, f_lab, m_lab, None))
        sums: dict[str, float] = {}
        for mv, fx, ml, fl, tf in directions:
            loss, parts = self._direction_loss(mv, fx, ml, fl, same, tf)
            if not self._all_finite(loss):
                # the same decision on every rank: skip this step everywhere (no backward, no update)
                self.opt.zero_grad(set_to_none=True)
                self._bad_steps += 1
                if self._bad_steps >= MAX_BAD_STEPS:
                    raise ProcessingError(
                        f"training diverged: {MAX_BAD_STEPS} non-finite losses in a row at iteration "
                        f"{self.step}; fix: lower --lr, keep --grad-clip on, or resume from an earlier run"
                    )
                continue
            self._bad_steps = 0
            parts["grad_norm"] = self._optimizer_step(loss)
            parts["loss"] = float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / len(directions)
        return sums

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean validation metrics over the validation pairs (sharded over ranks, then averaged)."""
        from emorph_deploy import metrics as M
        from emorph_deploy.losses import endpoint_error

        if self.val_ds is None:
            return {}
        core = self.core
        was_training = core.training
        core.eval()
        rows = []
        n = len(self.val_ds)
        # brains data is a list ending in the pre-aligned versions of its pairs: all of it is evaluated
        aligned = isinstance(self.val_ds, list) and n > 0 and bool(self.val_ds[-1].get("aligned"))
        limit = n if aligned else min(n, max(self.cfg.val_pairs, 1))
        for i in range(self.ctx.rank, limit, self.ctx.world_size):
            item = self.val_ds[i]
            moving = item["moving"][None].to(self.device)
            fixed = item["fixed"][None].to(self.device)
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
            ):
                warped, flow = core(moving, fixed)
            flow = flow.float()
            if item.get("aligned"):  # reported apart, label Dice only: none of the main metrics
                dice, dice_init = self._label_dice(item, flow)
                rows.append({"dice_aligned": dice, "dice_aligned_init": dice_init})
                continue
            warped_np = warped.float()[0, 0].cpu().numpy()
            fixed_np = fixed[0, 0].cpu().numpy()
            jac = M.jacobian_determinant(flow[0].cpu().numpy())
            row = {
                "frac_jac_nonpos": M.fraction_nonpositive_jacobian(jac),
                "ncc": M.ncc_global(warped_np, fixed_np),
                "ncc_init": M.ncc_global(moving[0, 0].cpu().numpy(), fixed_np),
            }
            if item.get("moving_labels") is not None and item.get("fixed_labels") is not None:
                row["dice"], row["dice_init"] = self._label_dice(item, flow)
                if "same_contrast" in item:  # brains data: accuracy per contrast relation
                    row["dice_same" if float(item["same_contrast"]) > 0 else "dice_diff"] = row["dice"]
            if item.get("flow") is not None:
                row["epe_vox"] = float(endpoint_error(flow.cpu(), item["flow"][None]))  # voxels
            rows.append(row)
        core.train(was_training)
        local = {}
        for k in VAL_FIELDS:
            vals = [r[k] for r in rows if k in r and math.isfinite(r[k])]
            local[k] = float(np.mean(vals)) if vals else math.nan
        return all_reduce_mean(self.ctx, local) if self.ctx.distributed else local

    def _label_dice(self, item: dict[str, Any], flow: torch.Tensor) -> tuple[float, float]:
        """(Dice after, Dice before) of ``item``'s moving labels warped by ``flow`` (1, 3, D, H, W), voxels"""
        from emorph_deploy import metrics as M
        from emorph_deploy.models.warp import warp

        ml = item["moving_labels"][None].to(self.device).float()
        wl = warp(ml, flow, mode="nearest")[0, 0].round().long().cpu().numpy()
        fl = item["fixed_labels"][0].numpy()
        return M.mean_dice(wl, fl), M.mean_dice(item["moving_labels"][0].numpy(), fl)

    @torch.no_grad()
    def validation_loss(self, n: int | None = None) -> float:
        """Mean training loss (both directions, eval mode) over the first ``n`` validation pairs."""
        if self.val_ds is None:
            return math.nan
        was_training = self.core.training
        self.core.eval()
        model, self.model = self.model, self.core  # plain forward, no DDP hooks
        try:
            vals = []
            for i in range(min(n or len(self.val_ds), len(self.val_ds))):
                item = self.val_ds[i]
                mov, fix = item["moving"][None].to(self.device), item["fixed"][None].to(self.device)
                ml, fl = item.get("moving_labels"), item.get("fixed_labels")
                ml = ml[None].to(self.device) if ml is not None else None
                fl = fl[None].to(self.device) if fl is not None else None
                same = item.get("same_contrast")
                same = torch.as_tensor(same).reshape(1).to(self.device) if same is not None else None
                for a, b, la, lb in ((mov, fix, ml, fl), (fix, mov, fl, ml)):
                    vals.append(float(self._direction_loss(a, b, la, lb, same)[0]))
        finally:
            self.model = model
            self.core.train(was_training)
        return float(np.mean(vals)) if vals else math.nan

    def score(self, val: dict[str, float]) -> float:
        """The value `best` follows (higher = better; NaN when this validation did not measure it)."""
        if self.cfg.best_metric != "auto":
            return val.get(self.cfg.best_metric, math.nan)
        d = val.get("dice", math.nan)
        return d if math.isfinite(d) else val.get("ncc", -math.inf)

    # ------------------------------------------------------------------ epoch data
    def _epoch_indices(self, epoch: int) -> list[int]:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(
            self.train_ds,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shuffle=True,
            seed=self.cfg.seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
        return list(iter(sampler))

    def _loader(self, epoch: int, skip_batches: int) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)  # for datasets without (epoch, index) keys (workers = 0)
        idx = self._epoch_indices(epoch)
        bs = self.cfg.batch_size
        n_batches = min(self.cfg.steps_per_epoch, len(idx) // bs)
        if n_batches == 0:
            raise InputError(
                f"the training set has {len(idx)} pairs per process, fewer than --batch-size {bs}; "
                f"fix: lower --batch-size or add data"
            )
        idx = idx[skip_batches * bs : n_batches * bs]
        if self._dl is None:
            # own generator: worker seeds must not consume the global RNG (keeps --resume bit-exact
            # mid-epoch); items are seeded by (seed, epoch, index) anyway. Persistent workers keep their
            # caches (MNI template, preprocessed volumes) across epochs.
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.ctx.rank)
            self._dl = DataLoader(
                self.train_ds,
                batch_size=bs,
                sampler=self._keys,
                num_workers=self.cfg.workers,
                drop_last=True,
                pin_memory=self.device.type == "cuda",
                persistent_workers=self.cfg.workers > 0,
                generator=gen,
                worker_init_fn=_worker_ignores_interrupts,
            )
        self._keys.keys = [(epoch, int(i)) for i in idx]
        self._n_batches = n_batches
        return iter(self._dl)

    # ------------------------------------------------------------------ logging
    def _open_tb(self) -> None:
        if not (self.ctx.is_main and self.cfg.tensorboard):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.echo("note: tensorboard is not installed; logging to CSV only (pip install tensorboard)")
            return
        self.tb = SummaryWriter(log_dir=str(self.out / "tb"), purge_step=self.step if self.resume else None)

    def _flush_logs(self) -> None:
        if not self.ctx.is_main:
            return
        write_bytes_atomic(
            self.out / "train_log.csv", _csv_bytes(TRAIN_LOG_FIELDS, self.train_rows), force=True
        )
        if self.val_rows:
            fields = ["step", "epoch", "lr", *VAL_FIELDS]
            write_bytes_atomic(self.out / "val_log.csv", _csv_bytes(fields, self.val_rows), force=True)
        if self.tb is not None:
            self.tb.flush()

    # ------------------------------------------------------------------ fit
    def fit(self) -> TrainResult:
        cfg = self.cfg
        if cfg.init_from and not self.resume:
            self.load_init()  # reads only: a bad checkpoint leaves no run folder behind
        self.prepare_out()
        barrier(self.ctx)
        if self.resume:
            self.load_resume()
        self._save_config()
        self._open_tb()
        self._bad_steps = 0
        total_iters = cfg.epochs * cfg.steps_per_epoch
        if cfg.max_steps is not None:
            total_iters = min(total_iters, cfg.max_steps)
        window: list[float] = []
        first_loss = None
        t_start = time.perf_counter()
        start_step = self.step
        t_log = t_start
        n_since_log = 0
        steps_per_s = math.nan
        if self.ctx.is_main:
            n_params = sum(p.numel() for p in self.core.parameters())
            n_train = sum(p.numel() for p in self.core.parameters() if p.requires_grad)
            frozen = f", {n_train:,} of them train ({','.join(cfg.train_only)}*)" if cfg.train_only else ""
            self.echo(
                f"training {self.model_config.name} ({n_params:,} parameters{frozen}) on "
                f"{tuple(self.pre.grid_shape)} at {self.pre.spacing_mm[0]:g} mm, "
                f"{'synthetic' if cfg.synthetic else cfg.data} data, "
                f"{self.ctx.world_size} process(es) on {self.device}, batch {cfg.batch_size}/process; "
                f"run folder {self.out}"
            )
        stop = self.step >= total_iters
        interrupts = contextlib.ExitStack()
        if not self.ctx.distributed:  # SIGTERM acts like Ctrl-C: save `last`, then exit 143 via the CLI
            interrupts.enter_context(interrupts_raise())
        try:
            while self.epoch < cfg.epochs and not stop:
                loader = self._loader(self.epoch, self.step_in_epoch)
                bar = None
                if self.ctx.is_main and cfg.progress:
                    from tqdm.auto import tqdm

                    bar = tqdm(
                        total=self._n_batches,
                        initial=self.step_in_epoch,
                        mininterval=0.1 if sys.stderr.isatty() else 5.0,
                        desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                        unit="it",
                        dynamic_ncols=True,
                        leave=True,
                        file=sys.stderr,
                    )
                for batch in _clean_worker_errors(loader):
                    _check_finite_batch(batch)
                    self.model.train()
                    parts = self.train_iteration(batch)
                    self.step += 1
                    self.step_in_epoch += 1
                    n_since_log += 1
                    loss = parts.get("loss", math.nan)
                    if math.isfinite(loss):
                        window.append(loss)
                    now = time.perf_counter()
                    if bar is not None:
                        rate = n_since_log / max(now - t_log, 1e-9)
                        bar.set_postfix(
                            loss=f"{loss:.4f}", steps_per_s=f"{rate:.3g}", lr=f"{_lr(self.opt):.2e}"
                        )
                        bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step_in_epoch == self._n_batches:
                        steps_per_s = n_since_log / max(now - t_log, 1e-9)
                        mean_loss = float(np.mean(window)) if window else math.nan
                        if first_loss is None:
                            first_loss = mean_loss
                        row = {
                            "step": self.step,
                            "epoch": self.epoch + 1,
                            "lr": _lr(self.opt),
                            "loss": mean_loss,
                            "steps_per_s": steps_per_s,
                            "elapsed_s": now - t_start,
                            **{k: v for k, v in parts.items() if k != "loss"},
                        }
                        row = (
                            dict(
                                all_reduce_mean(self.ctx, {k: float(v) for k, v in row.items()}),
                                step=self.step,
                                epoch=self.epoch + 1,
                            )
                            if self.ctx.distributed
                            else row
                        )
                        self.train_rows.append(row)
                        if self.tb is not None:
                            for k in ("loss", "ncc", "reg", "dice_loss", "grad_norm", "lr", "steps_per_s"):
                                if k in row and math.isfinite(row[k]):
                                    self.tb.add_scalar(f"train/{k}", row[k], self.step)
                        self._last_window = mean_loss
                        window = []
                        t_log, n_since_log = now, 0
                        self._flush_logs()
                    if self.step >= total_iters or self._out_of_time(t_start):
                        stop = True
                    if (
                        cfg.checkpoint_every
                        and self.step % cfg.checkpoint_every == 0
                        and self.step_in_epoch < self._n_batches
                    ):
                        self._save_last(metrics=None)
                    if stop:
                        break
                if bar is not None:
                    bar.close()
                if self.step_in_epoch >= self._n_batches:  # epoch complete
                    self._end_epoch()
                elif stop:
                    self._save_last(metrics=None)
        except InputError:
            # bad data met mid-run (volumes are validated lazily): keep the progress for --resume
            if not self.ctx.distributed and self.step > 0:
                self._save_last(metrics=None)
                self._flush_logs()
            raise
        except KeyboardInterrupt:
            if not self.ctx.distributed:
                self.echo(f"interrupted at iteration {self.step}: saving {self.out / 'last'} for --resume")
                self._save_last(metrics=None)
                self._flush_logs()
            raise
        finally:
            interrupts.close()
            if self.tb is not None:
                self.tb.close()
        elapsed = time.perf_counter() - t_start
        return TrainResult(
            step=self.step,
            epoch=self.epoch,
            out=str(self.out),
            best=str(self.out / "best"),
            last=str(self.out / "last"),
            history=self.history,
            first_loss=first_loss,
            final_loss=self._last_window,
            steps_per_s_window=steps_per_s,
            steps_per_s=(self.step - start_step) / elapsed if elapsed > 0 else math.nan,
            elapsed_s=elapsed,
            lr=_lr(self.opt),
            weights_sha256=weights_digest(self.core),
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        val: dict[str, float] = {}
        if self.cfg.val_pairs > 0 and self.epoch % self.cfg.val_every == 0:
            val = self.validate()
        lr_used = _lr(self.opt)
        self.sched.step()
        improved = False
        if val:
            row = {"step": self.step, "epoch": self.epoch, "lr": lr_used, **val}
            self.val_rows.append(row)
            self.history.append(row)
            s = self.score(val)
            if math.isfinite(s) and s > self.best_score:
                self.best_score = s
                improved = True
            if self.tb is not None:
                for k, v in val.items():
                    if math.isfinite(v):
                        self.tb.add_scalar(f"val/{k}", v, self.step)
            if self.ctx.is_main:
                shown = ", ".join(f"{k} {v:.4f}" for k, v in val.items() if math.isfinite(v))
                self.echo(f"epoch {self.epoch}: {shown}{' (best)' if improved else ''}")
        metrics = {"epoch": self.epoch, "step": self.step, **{f"val_{k}": v for k, v in val.items()}}
        self._save_last(metrics=metrics)
        if improved and self.ctx.is_main:
            save_checkpoint(
                self.core,
                self.out / "best",
                self.pre,
                training=self._training_meta(),
                metrics=metrics,
                force=True,
            )
        self._flush_logs()
        barrier(self.ctx)


# ---------------------------------------------------------------------------------------------- entry points
def _worker_ignores_interrupts(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: the main process owns the shutdown.

    Ctrl-C in a terminal and a scheduler's SIGTERM reach the whole process group. A worker killed by the
    signal makes the main process fail with "DataLoader worker ... is killed by signal" in the middle of
    saving `last` (a traceback, `last.json` older than its state). Ignoring it here lets the main process
    save `last`, then stop its workers through their queues."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.excepthook = _quiet_lost_fd_share(sys.excepthook)


def _quiet_lost_fd_share(hook: Any) -> Any:
    """``sys.excepthook`` for a DataLoader worker: the thread that hands batch tensors' file descriptors to
    the main process (``multiprocessing.resource_sharer``) reports through ``sys.excepthook`` a connection
    the main process dropped, which is how the main process ends after saving `last` on SIGTERM; that one
    case is silent, anything else goes to ``hook``."""
    import traceback

    def quiet(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        lost = issubclass(exc_type, (ConnectionResetError, BrokenPipeError, EOFError))
        if lost and any(f.filename.endswith("resource_sharer.py") for f in traceback.extract_tb(tb)):
            return
        hook(exc_type, exc, tb)

    return quiet


def resolve_resume_config(out: str | Path, requested: dict[str, Any]) -> TrainConfig:
    """TrainConfig for ``--resume``: the saved one, with the explicitly requested options applied.

    Options outside :data:`RESUMABLE_OVERRIDES` that differ from the saved run are a ``ConfigMismatchError``.
    """
    out = Path(out)
    meta, _ = load_checkpoint_meta(out / "last")
    saved = (meta.get("training") or {}).get("config")
    if not isinstance(saved, dict):
        raise InputError(f"{out / 'last.json'} has no training config: cannot resume; fix: start a new run")
    base = TrainConfig.from_dict(saved)
    base_d = base.to_dict()
    base_d["max_steps"] = None  # per-invocation stopping points, not inherited
    base_d["max_minutes"] = None
    changes: dict[str, Any] = {}
    for k, v in requested.items():
        if v is None:
            continue
        cur = base_d.get(k)
        norm = TrainConfig.from_dict({**base_d, k: v}).to_dict()[k]
        if norm == cur:
            continue
        if k not in RESUMABLE_OVERRIDES:
            raise ConfigMismatchError(
                f"--resume: option {k}={norm!r} differs from the saved run ({cur!r}); expected the same "
                f"{k}; fix: drop that option or start a new run in another --out"
            )
        changes[k] = norm
    changes["out"] = str(out)
    return TrainConfig.from_dict({**base_d, **changes})


def train(
    cfg: TrainConfig, resume: bool = False, force: bool = False, echo: Callable[[str], None] | None = None
) -> TrainResult:
    """Run training (joins the DDP group when launched by torchrun). Returns the :class:`TrainResult`."""
    ctx = init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, ctx, resume=resume, force=force, echo=echo)
        return trainer.fit()
    finally:
        cleanup_distributed()
