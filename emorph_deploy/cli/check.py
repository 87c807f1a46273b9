"""``emorph check ARTIFACT``: run the artifact and the PyTorch reference on the same pairs; exit 0/1/2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.choices import Backend, CheckPrecision
from emorph_deploy.cli._common import handle_errors


@handle_errors
def check_command(
    artifact: Annotated[
        Path, typer.Argument(help="ONNX (.onnx + .json manifest), engine (.plan) or checkpoint.")
    ],
    reference: Annotated[
        Path | None,
        typer.Option("--reference", help="Reference checkpoint (default: the manifest's source_checkpoint)."),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs", help="CSV with columns fixed,moving[,fixed_labels,moving_labels] (NIfTI paths)."
        ),
    ] = None,
    synthetic: Annotated[
        int | None,
        typer.Option(
            "--synthetic", help="Number of synthetic pairs with labels at the artifact's grid (default 2)."
        ),
    ] = None,
    precision: Annotated[
        CheckPrecision,
        typer.Option(
            "--precision",
            help="Tolerance set; auto = the artifact's recorded precision. With --backend openvino also the "
            "precision it runs at (fp32, bf16 or int8).",
        ),
    ] = CheckPrecision.auto,
    backend: Annotated[
        Backend, typer.Option("--backend", help="Artifact backend (auto: by suffix).")
    ] = Backend.auto,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for both backends.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first synthetic pair.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON here.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --json file.")] = False,
) -> None:
    """Compare an artifact with its PyTorch reference: flow, warped image, warped labels, Jacobian."""
    from emorph_deploy.check import (
        check_grids,
        csv_pairs,
        format_report,
        resolve_reference,
        run_check,
        synthetic_pairs,
    )
    from emorph_deploy.errors import CheckFailedError, InputError
    from emorph_deploy.fileio import check_writable, write_json_atomic
    from emorph_deploy.runners import backend_for, load_runner

    if pairs is not None and synthetic is not None:
        raise InputError("give either --pairs CSV or --synthetic N, not both")
    if json_out is not None:
        check_writable(json_out, force=force)
    kwargs = {"threads": threads} if threads is not None else {}
    art_backend = backend_for(artifact, backend.value)
    art_kwargs = kwargs if art_backend in ("torch", "onnxruntime", "openvino") else {}  # CPU thread count
    if art_backend == "openvino" and precision is not CheckPrecision.auto:
        art_kwargs = {**art_kwargs, "precision": precision.value}
    art = load_runner(artifact, art_backend, **art_kwargs)
    ref_path = resolve_reference(art.meta, reference)
    ref = load_runner(ref_path, "torch", **kwargs)
    check_grids(art, ref)
    if pairs is not None:
        source = csv_pairs(
            pairs, art.meta.get("preprocessing") or ref.meta.get("preprocessing"), art.grid_shape
        )
    else:
        source = synthetic_pairs(synthetic if synthetic is not None else 2, art.grid_shape, seed=seed)
    report = run_check(art, ref, source, precision=precision.value)
    typer.echo(format_report(report))
    if json_out is not None:
        write_json_atomic(json_out, report, force=force)
        typer.echo(f"wrote {json_out}")
    if not report["passed"]:
        failed = [c["metric"] for c in report["checks"] if c["ok"] is False]
        raise CheckFailedError(
            f"{artifact} is outside the {report['precision']} tolerance on {', '.join(failed)}"
        )


def register(app: typer.Typer) -> None:
    app.command("check")(check_command)
