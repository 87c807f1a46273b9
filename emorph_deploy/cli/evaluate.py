"""``emorph evaluate CHECKPOINT [DATA]``: registration metrics per pair and their mean.

Examples::

    emorph evaluate runs/em23-2mm/best.safetensors --synthetic 8
    emorph evaluate runs/oasis/best.json /data/oasis_val.csv --oasis --csv oasis_val.csv --json oasis_val.json
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from emorph_deploy.choices import SyntheticKind
from emorph_deploy.cli._common import handle_errors
from emorph_deploy.errors import InputError


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@handle_errors
def evaluate_command(
    checkpoint: Annotated[str, typer.Argument(help="Checkpoint: .safetensors, .json, stem or run folder.")],
    data: Annotated[
        str | None,
        typer.Argument(help="Folder or CSV of NIfTI volumes (pairs i→i+1, or a fixed,moving CSV)."),
    ] = None,
    synthetic: Annotated[
        int | None,
        typer.Option(help="Evaluate on N synthetic pairs with known deformations (no data needed)."),
    ] = None,
    synthetic_kind: Annotated[
        SyntheticKind,
        typer.Option(
            help="Synthetic pair kind; 'brains' = held-out SynthMorph-style brain pairs, half of them in "
            "different contrasts (Dice over tissue parcels)."
        ),
    ] = SyntheticKind.mix,
    oasis: Annotated[
        bool,
        typer.Option(
            "--oasis", help="Learn2Reg OASIS protocol: labels 1-35, Dice, HD95, SDlogJ (both), J<=0."
        ),
    ] = False,
    atlas: Annotated[str | None, typer.Option(help="Atlas (moving) for atlas-to-subject pairs.")] = None,
    max_pairs: Annotated[int | None, typer.Option(help="Evaluate at most N pairs.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Require this model variant.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of synthetic pairs.")] = 1234,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write rows + mean as JSON to this file ('-' = stdout).")
    ] = None,
    csv_out: Annotated[
        str | None, typer.Option("--csv", help="Write rows + mean as CSV to this file.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing --json/--csv files.")] = False,
) -> None:
    """Evaluate a checkpoint: Dice, HD95 (mm), SDlogJ (true and L2R), fraction J<=0, NCC (and EPE)."""
    from emorph_deploy.fileio import check_writable, write_bytes_atomic
    from emorph_deploy.train.checkpoint import load_checkpoint
    from emorph_deploy.train.distributed import _resolve_device
    from emorph_deploy.train.evaluate import (
        OASIS_HEADER,
        build_eval_pairs,
        evaluate_model,
        format_table,
        summarise,
        to_csv_bytes,
    )

    if data is not None and synthetic is not None:
        raise InputError("DATA and --synthetic are exclusive: expected one source of pairs; fix: drop one")
    if data is None and synthetic is None:
        raise InputError("no evaluation data: expected DATA (folder or CSV) or --synthetic N; fix: pass one")
    for path in (json_out, csv_out):  # validate outputs before any work
        if path and path != "-":
            check_writable(path, force=force)
    dev = _resolve_device(device, 0)
    net, meta = load_checkpoint(checkpoint, map_location=dev, expect_model=model)
    from emorph_deploy.data.preprocess import Preprocessing

    pre = Preprocessing.from_dict(meta["preprocessing"]) if meta.get("preprocessing") else None
    if pre is None:
        raise InputError(
            f"checkpoint {checkpoint} has no preprocessing: expected a checkpoint from 'emorph train'"
        )
    if tuple(pre.grid_shape) != tuple(net.config.img_size):
        raise InputError(
            f"checkpoint {checkpoint}: preprocessing grid {pre.grid_shape} differs from the "
            f"model "
            f"img_size {net.config.img_size}; fix: re-save the checkpoint"
        )
    train_cfg = (meta.get("training") or {}).get("config") or {}
    preset_spacing = train_cfg.get("grid_shape") is None
    names, ds = build_eval_pairs(
        pre,
        data=data,
        synthetic=synthetic,
        seed=seed,
        atlas=atlas,
        kind=synthetic_kind.value,
        max_pairs=max_pairs,
        preset_spacing=preset_spacing,
    )
    items = (ds[i] for i in range(len(ds)))
    rows = evaluate_model(net, items, tuple(pre.spacing_mm), oasis=oasis, device=dev, names=names)
    if not rows:
        raise InputError("the evaluation set is empty: expected at least one pair; fix: check DATA")
    mean = summarise(rows)
    report = {
        "checkpoint": str(checkpoint),
        "model": net.config.name,
        "grid_shape": list(pre.grid_shape),
        "spacing_mm": list(pre.spacing_mm),
        "oasis": oasis,
        "pairs": [{k: _jsonable(v) for k, v in r.items()} for r in rows],
        "mean": {k: _jsonable(v) for k, v in mean.items()},
    }
    if json_out == "-":
        typer.echo(json.dumps(report, indent=2))
    else:
        src = f"{synthetic} synthetic pairs" if synthetic is not None else f"{len(rows)} pairs from {data}"
        d, h, w = pre.grid_shape
        typer.echo(
            f"checkpoint {checkpoint} ({net.config.name}, {d}x{h}x{w} at {pre.spacing_mm[0]:g} mm), {src}"
        )
        if oasis:
            typer.echo(OASIS_HEADER)
        typer.echo(format_table(rows, mean))
        typer.echo(
            "SDlogJ = true std of log J (J>0); SDlogJ(L2R) = Learn2Reg std of log(J+3) (not "
            "comparable); HD95 in mm on the model grid; EPE = endpoint error vs the true "
            "deformation (voxels)."
        )
    if json_out and json_out != "-":
        write_bytes_atomic(json_out, (json.dumps(report, indent=2) + "\n").encode(), force=force)
    if csv_out:
        write_bytes_atomic(csv_out, to_csv_bytes(rows, mean), force=force)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
