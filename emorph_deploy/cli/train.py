"""``emorph train``: train EfficientMorph on NIfTI data or synthetic brains; resumable; DDP under torchrun.

Examples::

    emorph train --out runs/em23-2mm                         # synthetic data, em-23-hires at 2 mm 80×96×112
    emorph train --out runs/em23-2mm --resume --epochs 300   # continue (same step and learning rate)
    emorph train --data /data/oasis.csv --grid 1mm --out runs/oasis
    torchrun --nproc_per_node 4 -m emorph_deploy train --out runs/ddp ...   # DDP (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import json
import math
import os
from typing import Annotated, Any

import typer

from emorph_deploy.choices import Amp, BestMetric, GridPreset, SyntheticKind
from emorph_deploy.cli._common import handle_errors
from emorph_deploy.errors import InputError


def _ints(text: str | None, n: int | None, opt: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = text.lower().replace("×", "x").replace("x", ",").split(",")
    try:
        vals = tuple(int(p) for p in parts if p.strip())
    except ValueError:
        vals = ()
    if not vals or (n is not None and len(vals) != n):
        want = f"{n} comma-separated integers" if n else "comma-separated integers"
        raise InputError(f"{opt} expects {want}; got {text!r}")
    return vals


def _model_sets(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(
                f"--model-set expects KEY=VALUE (VALUE as JSON, e.g. depths=[1,1]); got {item!r}"
            )
        key, val = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            out[key.strip()] = val
    return out


@handle_errors
def train_command(
    out: Annotated[
        str, typer.Option("--out", "-o", help="Run folder (checkpoints best/last, logs).")
    ] = "runs/train",
    data: Annotated[
        str | None, typer.Option("--data", help="Folder or CSV of NIfTI volumes (default: synthetic).")
    ] = None,
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Train on synthetic brains (default without --data).")
    ] = False,
    synthetic_kind: Annotated[
        SyntheticKind | None,
        typer.Option(
            help="Synthetic pairs: 'brains' (SynthMorph-style MNI152 label maps, independent contrasts, "
            "soft-Dice supervision), 'synth' (random label maps), 'template' (MNI152 T1), or 'mix'."
        ),
    ] = None,
    synth_ramp_epochs: Annotated[
        int | None,
        typer.Option(
            help="brains: grow deformation/affine ranges from 40 % to 100 % over N epochs (default 0)."
        ),
    ] = None,
    synth_fine_disp_mm: Annotated[
        float | None,
        typer.Option(
            help="brains: add a fine-scale (6-12 mm control spacing) deformation of up to this many mm per "
            "subject, the gyral-scale differences between brains (default 0 = off; may change on --resume)."
        ),
    ] = None,
    synth_affine_fraction: Annotated[
        float | None,
        typer.Option(
            help="brains: scale the residual-affine ranges (±6°, ±6 %, ±3 % shear, ±6 mm) by this factor; "
            "< 1 trains on pairs as affine pre-alignment leaves them (default 1; may change on --resume)."
        ),
    ] = None,
    synth_same_subject: Annotated[
        float | None,
        typer.Option(
            help="brains: share of pairs in [0, 1] whose fixed subject is the moving one under a further "
            "deformation of random strength (near-identical pairs: identical anatomy needs no displacement; "
            "default 0; may change on --resume).",
        ),
    ] = None,
    synth_shapes: Annotated[
        float | None,
        typer.Option(
            help="brains: share of pairs in [0, 1] with random smooth shapes inside the head instead of "
            "tissue parcels, in random per-label contrasts (SynthMorph's shapes; default 0; may change on "
            "--resume).",
        ),
    ] = None,
    synth_known_flow: Annotated[
        bool | None,
        typer.Option(
            "--synth-known-flow/--no-synth-known-flow",
            help="brains: the fixed subject is the moving one under one more random deformation and residual "
            "affine, so every pair carries its true flow for --flow-weight (default off; may change on "
            "--resume).",
        ),
    ] = None,
    atlas: Annotated[str | None, typer.Option(help="Atlas (moving) for atlas-to-subject pairs.")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model variant (see 'emorph models').")
    ] = None,
    embed_dims: Annotated[str | None, typer.Option(help="Stage widths, e.g. 48,96 (narrow model).")] = None,
    depths: Annotated[str | None, typer.Option(help="Blocks per stage, e.g. 1,1.")] = None,
    heads: Annotated[str | None, typer.Option(help="Heads per stage, e.g. 2,4.")] = None,
    patch_dim: Annotated[int | None, typer.Option(help="Patch-embedding channels.")] = None,
    decoder_widths: Annotated[str | None, typer.Option(help="Decoder widths (up2, up3), e.g. 48,16.")] = None,
    drop_path: Annotated[
        float | None,
        typer.Option(
            help="Stochastic depth of the blocks, in [0, 1) (default: the variant's, 0.3); training only, "
            "so it may change on --resume."
        ),
    ] = None,
    skip_width: Annotated[int | None, typer.Option(help="Skip-branch width.")] = None,
    model_set: Annotated[
        list[str] | None, typer.Option(help="Any ModelConfig field: KEY=JSON (repeatable).")
    ] = None,
    grid: Annotated[
        GridPreset | None, typer.Option(help="Model grid preset: 1mm 160×192×224 or 2mm 80×96×112.")
    ] = None,
    grid_shape: Annotated[
        str | None, typer.Option(help="Override the grid shape DxHxW (multiples of 8).")
    ] = None,
    spacing: Annotated[float | None, typer.Option(help="Override the grid spacing (mm).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default 200).")] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(
            help="Iterations per epoch (default: 100 synthetic, one pass over the --data subjects)."
        ),
    ] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many iterations in total.")] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(help="Stop after this many minutes, saving 'last' (continue with --resume)."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", "-b", help="Pairs per process per step.")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes (default 0).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 5e-4).")] = None,
    lr_min: Annotated[float | None, typer.Option(help="Cosine floor (default 5e-5).")] = None,
    t_max: Annotated[int | None, typer.Option(help="Cosine period in epochs (default 20).")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm, 0 = off (default 10).")] = None,
    reg_weight: Annotated[float | None, typer.Option(help="Diffusion weight λ (default 1).")] = None,
    dice_weight: Annotated[
        float | None, typer.Option(help="Soft-Dice weight when labels exist (default 1).")
    ] = None,
    ncc_weight: Annotated[
        float | None,
        typer.Option(
            help="Local-NCC weight (default 1); pairs of different contrasts (brains data) get none."
        ),
    ] = None,
    flow_weight: Annotated[
        float | None,
        typer.Option(
            help="Endpoint-error weight (voxels, inside the fixed labels) on pairs that carry their true "
            "flow: synthetic data (synth/template/mix, or brains with --synth-known-flow); moving→fixed "
            "direction only (default 0 = off)."
        ),
    ] = None,
    bidirectional: Annotated[
        bool | None,
        typer.Option(
            "--bidirectional/--one-direction",
            help="Train both directions per iteration (default) or one (cheaper; enough for symmetric data).",
        ),
    ] = None,
    val_pairs: Annotated[int | None, typer.Option(help="Validation pairs per epoch (default 4).")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of subjects held out (default 0.1).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N].")] = None,
    amp: Annotated[
        Amp | None,
        typer.Option(
            help="Mixed precision: auto = bf16 where native (CUDA, or CPUs with AVX512-BF16/AMX), fp32 "
            "elsewhere; fp16 on CUDA only (default none)."
        ),
    ] = None,
    log_every: Annotated[int | None, typer.Option(help="Log every N iterations (default 10).")] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option(help="Also save 'last' every N iterations (default 20; 0 = epoch ends only)."),
    ] = None,
    best_metric: Annotated[
        BestMetric | None,
        typer.Option(
            help="Validation column 'best' follows: auto = dice (ncc without labels); dice_aligned = brain "
            "pairs without residual affines, as after emorph's pre-alignment (default auto; a change on "
            "--resume restarts 'best')."
        ),
    ] = None,
    tensorboard: Annotated[
        bool | None, typer.Option("--tensorboard/--no-tensorboard", help="TensorBoard logs (if installed).")
    ] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out (same step and lr; --lr/--lr-min/--t-max start a new phase; "
            "loss weights and the --synth-* data options may change too, everything else must match).",
        ),
    ] = False,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Warm start from this checkpoint ('default' = the packaged model): tensors of the same name "
            "and shape are copied, layers it lacks (e.g. --model-set full_res_width=8) keep their "
            "near-zero initialisation. New runs only.",
        ),
    ] = None,
    train_only: Annotated[
        str | None,
        typer.Option(
            "--train-only",
            help="Comma-separated parameter-name prefixes that train (e.g. full_res. after --init-from); "
            "the rest is frozen (default: everything trains).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing run in --out.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the final summary as JSON on stdout.")
    ] = False,
) -> None:
    """Train EfficientMorph (NCC + diffusion [+ Dice], Adam amsgrad, cosine schedule, both directions)."""
    from emorph_deploy.train.config import TrainConfig
    from emorph_deploy.train.loop import resolve_resume_config, train

    if data is not None and synthetic:
        raise InputError("--data and --synthetic are exclusive: expected one data source; fix: drop one")
    if resume and init_from is not None:
        raise InputError(
            "--resume and --init-from are exclusive: a resumed run continues its own weights; fix: drop "
            "--init-from, or start a new run in another --out"
        )
    if resume and force:
        raise InputError("--resume and --force are exclusive: fix: --resume to continue, --force to restart")
    overrides: dict[str, Any] = _model_sets(model_set)
    for key, val in (
        ("embed_dims", _ints(embed_dims, 2, "--embed-dims")),
        ("depths", _ints(depths, 2, "--depths")),
        ("heads", _ints(heads, 2, "--heads")),
        ("decoder_widths", _ints(decoder_widths, 2, "--decoder-widths")),
        ("patch_dim", patch_dim),
        ("skip_width", skip_width),
    ):
        if val is not None:
            overrides[key] = list(val) if isinstance(val, tuple) else val
    requested: dict[str, Any] = {
        "model": model,
        "model_overrides": overrides or None,
        "drop_path": drop_path,
        "init_from": init_from,
        "train_only": [p.strip() for p in train_only.split(",") if p.strip()] if train_only else None,
        "grid": grid.value if grid else None,
        "grid_shape": list(_ints(grid_shape, 3, "--grid-shape")) if grid_shape else None,
        "spacing_mm": spacing,
        "data": data,
        "atlas": atlas,
        "synthetic_kind": synthetic_kind.value if synthetic_kind else None,
        "synth_ramp_epochs": synth_ramp_epochs,
        "synth_fine_disp_mm": synth_fine_disp_mm,
        "synth_affine_fraction": synth_affine_fraction,
        "synth_known_flow": synth_known_flow,
        "synth_same_subject": synth_same_subject,
        "synth_shapes": synth_shapes,
        "ncc_weight": ncc_weight,
        "flow_weight": flow_weight,
        "bidirectional": bidirectional,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "max_steps": max_steps,
        "max_minutes": max_minutes,
        "batch_size": batch_size,
        "workers": workers,
        "lr": lr,
        "lr_min": lr_min,
        "t_max": t_max,
        "grad_clip": grad_clip,
        "reg_weight": reg_weight,
        "dice_weight": dice_weight,
        "val_pairs": val_pairs,
        "val_fraction": val_fraction,
        "seed": seed,
        "device": device,
        "amp": amp.value if amp else None,
        "log_every": log_every,
        "checkpoint_every": checkpoint_every,
        "best_metric": best_metric.value if best_metric else None,
        "tensorboard": tensorboard,
        "progress": progress,
    }
    if resume:
        cfg = resolve_resume_config(out, requested)
    else:
        given = {k: v for k, v in requested.items() if v is not None}
        if given.get("grad_clip") == 0:
            given["grad_clip"] = None
        cfg = TrainConfig.from_dict({**TrainConfig().to_dict(), **given, "out": out})
    cfg.model_config()  # validate the model/grid combination before any work
    result = train(cfg, resume=resume, force=force, echo=lambda s: typer.echo(s, err=True))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    last_val = result.history[-1] if result.history else {}
    shown = ", ".join(
        f"{k} {v:.4f}"
        for k, v in last_val.items()
        if k not in ("step", "epoch", "lr") and isinstance(v, float) and math.isfinite(v)
    )
    typer.echo(
        f"done: {result.step} iterations, {result.epoch} epochs, lr {result.lr:.3g}, "
        f"{result.steps_per_s:.3g} it/s overall this run (incl. data, validation, checkpoints), "
        f"{result.steps_per_s_window:.3g} it/s last logged window"
    )
    if shown:
        typer.echo(f"validation: {shown}")
    best = f"{result.best}.safetensors (best), " if os.path.exists(f"{result.best}.json") else ""
    typer.echo(f"checkpoints: {best}{result.last}.safetensors (last)")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
