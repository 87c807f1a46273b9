"""``emorph calibrate ONNX (--pairs CSV | --synthetic N)``: INT8 QDQ ONNX under ``calibration/``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.choices import CalibrationKind, CalibrationMethod, Quantizer
from emorph_deploy.cli._common import handle_errors


@handle_errors
def calibrate_cmd(
    onnx: Annotated[
        Path, typer.Argument(help="FP32 ONNX from 'emorph export' (its manifest gives preprocessing).")
    ],
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="CSV with columns fixed,moving (NIfTI paths); without a header: moving,fixed lines.",
        ),
    ] = None,
    synthetic: Annotated[
        int | None, typer.Option("--synthetic", help="Use N synthetic brain pairs instead.")
    ] = None,
    synthetic_kind: Annotated[CalibrationKind, typer.Option("--synthetic-kind")] = CalibrationKind.template,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic pairs.")] = 0,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Use only the first N rows of --pairs.")
    ] = None,
    method: Annotated[
        CalibrationMethod, typer.Option("--method", help="Activation range calibration.")
    ] = CalibrationMethod.minmax,
    ops: Annotated[
        str,
        typer.Option(
            "--ops",
            help="Op types to quantize: Conv,ConvTranspose,Gemm,MatMul (all) or LinearMatMul (weights only).",
        ),
    ] = "Conv,MatMul,Gemm",
    exclude: Annotated[
        list[str] | None, typer.Option("--exclude", help="Regex of node names to keep FP32.")
    ] = None,
    exclude_flow_head: Annotated[
        bool, typer.Option("--exclude-flow-head", help="Keep the flow head conv FP32.")
    ] = False,
    quantizer: Annotated[Quantizer, typer.Option("--quantizer")] = Quantizer.onnxruntime,
    percentile: Annotated[float, typer.Option("--percentile", help="For --method percentile.")] = 99.999,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("calibration"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")] = False,
) -> None:
    """Calibrate and write an explicitly quantized (QDQ, INT8) ONNX that 'emorph build --precision int8'
    takes."""
    from emorph_deploy.calibration import QuantizeOptions, calibrate

    options = QuantizeOptions(
        method=method.value,
        op_types=tuple(t.strip() for t in ops.split(",") if t.strip()),
        quantizer=quantizer.value,
        percentile=percentile,
        exclude_flow_head=exclude_flow_head,
        exclude_nodes=tuple(exclude or ()),
    )
    res = calibrate(
        onnx,
        pairs=pairs,
        synthetic=synthetic,
        options=options,
        out_dir=out,
        seed=seed,
        synthetic_kind=synthetic_kind.value,
        limit=limit,
        force=force,
        progress=not no_progress,
        say=lambda m: typer.echo(f"calibrate: {m}", err=True),
    )
    r = res.report
    typer.echo(
        f"{res.qdq_onnx}  ({r['n_pairs']} pairs, {r['options']['method']}, {r['quantizer']}, "
        f"{len(r['quantized_nodes'])} nodes quantized)"
    )
    for f in res.files:
        if f != res.qdq_onnx:
            typer.echo(str(f))


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
