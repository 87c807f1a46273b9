"""``emorph export CHECKPOINT``: checkpoint → ``<out>/<name>.onnx`` + ``<out>/<name>.json`` manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.choices import ExportOutputs, ExportTarget, GridSampleMode
from emorph_deploy.cli._common import handle_errors


@handle_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (.safetensors, .json or <dir>/<stem>).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("export"),
    name: Annotated[
        str | None, typer.Option("--name", help="Base name (default <checkpoint>-<grid-sample>).")
    ] = None,
    grid_sample: Annotated[
        GridSampleMode,
        typer.Option(
            "--grid-sample",
            help="gather: decomposed sampler at opset 17 (TensorRT 10.x, Jetson); "
            "native: ONNX GridSample at opset 20 (ONNX Runtime, TensorRT >= 11.2).",
        ),
    ] = GridSampleMode.gather,
    outputs: Annotated[
        ExportOutputs, typer.Option("--outputs", help="Graph outputs.")
    ] = ExportOutputs.flow_warped,
    target: Annotated[
        ExportTarget | None,
        typer.Option(
            "--target",
            help="tensorrt checks the op set against the TensorRT ONNX parser list "
            "(default for gather); onnxruntime skips that check (default for native).",
        ),
    ] = None,
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset (default 17 gather, 20 native).")
    ] = None,
    trt_version: Annotated[
        str,
        typer.Option(
            "--trt-version", help="TensorRT version the op set is checked for (5D GridSample needs >= 11.2)."
        ),
    ] = "10.15",
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
) -> None:
    """Export a checkpoint to ONNX (fixed 1x1xDxHxW float32 inputs moving/fixed; outputs flow in voxels,
    warped)."""
    from emorph_deploy.errors import InputError
    from emorph_deploy.export.loaders import default_export_name, export_paths, onnx_from_checkpoint
    from emorph_deploy.export.manifest import read_manifest

    name = name or default_export_name(checkpoint, grid_sample.value)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise InputError(f"--name must be a plain file stem, got {name!r}; fix: e.g. --name em-23-gather")
    onnx_path, json_path = export_paths(out, name)
    onnx_from_checkpoint(
        checkpoint,
        onnx_path,
        grid_sample=grid_sample.value,
        outputs=outputs.value,
        opset=opset,
        target=target.value if target else None,
        force=force,
        trt_version=trt_version,
    )
    meta = read_manifest(json_path)
    typer.echo(
        f"wrote {onnx_path} and {json_path.name}: grid {tuple(meta['grid_shape'])}, opset {meta['opset']}, "
        f"grid-sample {meta['grid_sample']}, target {meta['target']}, outputs "
        f"{','.join(o['name'] for o in meta['outputs'])}, {len(meta['ops'])} op types"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
