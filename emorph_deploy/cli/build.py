"""``emorph build ONNX --precision fp32|fp16|int8``: a TensorRT engine + manifest under ``engines/``;
``--target openvino --precision fp32|bf16|int8``: an OpenVINO IR + manifest
(:mod:`emorph_deploy.engines.openvino`).

INT8 needs a calibrated QDQ graph. Either pass it as ONNX (``emorph calibrate`` writes
``calibration/<name>-int8.onnx``), or pass the FP32 export with ``--calibration calibration/<name>-int8.onnx``
(checked to derive from it), or with ``--calibrate-synthetic N`` to calibrate on N synthetic brain pairs first
(written under ``calibration/`` as ``emorph calibrate --synthetic N`` would). With ``--target openvino``,
``--nncf`` quantises the FP32 export with NNCF instead (on ``--calibrate-synthetic N`` pairs, default 8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.choices import BuildTarget, Flavour, Fp16Mode, Precision
from emorph_deploy.cli._common import handle_errors


@handle_errors
def build(
    onnx: Annotated[
        Path, typer.Argument(help="ONNX from 'emorph export' (or a QDQ ONNX from 'emorph calibrate').")
    ],
    precision: Annotated[
        Precision, typer.Option("--precision", "-p", help="Engine precision.")
    ] = Precision.fp32,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("engines"),
    target: Annotated[
        BuildTarget,
        typer.Option("--target", help="tensorrt: a TensorRT engine; openvino: an OpenVINO IR for the CPU."),
    ] = BuildTarget.tensorrt,
    nncf: Annotated[
        bool,
        typer.Option(
            "--nncf",
            help="openvino int8: NNCF post-training quantisation of the FP32 export (not a QDQ graph).",
        ),
    ] = False,
    flavour: Annotated[
        Flavour,
        typer.Option("--flavour", help="TensorRT flavour: auto = tensorrt if importable, else tensorrt-rtx."),
    ] = Flavour.auto,
    workspace_mb: Annotated[
        int | None, typer.Option("--workspace-mb", help="Builder workspace limit (MiB).")
    ] = None,
    fp16_mode: Annotated[
        Fp16Mode,
        typer.Option(
            "--fp16-mode",
            help="graph: mixed-precision ONNX (strongly typed); flag: BuilderFlag.FP16 (TensorRT 10.x).",
        ),
    ] = Fp16Mode.graph,
    opt_level: Annotated[
        int | None, typer.Option("--opt-level", help="Builder optimization level 0..5.")
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            "--calibration", help="int8: the QDQ ONNX written by 'emorph calibrate' for this export."
        ),
    ] = None,
    calibrate_synthetic: Annotated[
        int | None,
        typer.Option(
            "--calibrate-synthetic",
            help="int8: calibrate first on N synthetic brain pairs (into calibration/).",
        ),
    ] = None,
    calibration_out: Annotated[
        Path, typer.Option("--calibration-out", help="Folder for --calibrate-synthetic.")
    ] = Path("calibration"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print TensorRT's log.")] = False,
) -> None:
    """Build a TensorRT engine (fp32, fp16 or int8) or an OpenVINO IR (fp32, bf16 or int8) from an ONNX export
    and write its manifest."""
    from emorph_deploy.engines.builder import BuildOptions, build_engine
    from emorph_deploy.engines.trt import load_tensorrt
    from emorph_deploy.errors import InputError

    def say(msg: str) -> None:
        typer.echo(f"build: {msg}", err=True)

    if nncf and target is not BuildTarget.openvino:
        raise InputError("--nncf: expected --target openvino, got tensorrt; fix: add --target openvino")
    if target is BuildTarget.openvino:
        _build_openvino(
            onnx, precision, out, calibration, calibrate_synthetic, calibration_out, nncf, force, say
        )
        return

    options = BuildOptions(
        precision=precision.value,
        flavour=flavour.value,
        out_dir=str(out),
        workspace_mb=workspace_mb,
        fp16_mode=fp16_mode.value,
        optimization_level=opt_level,
        force=force,
    )
    trt = load_tensorrt(flavour.value)  # one clear line if TensorRT is missing, before any work
    source = _int8_source(onnx, precision, calibration, calibrate_synthetic, calibration_out, force, say)
    result = build_engine(source, options, trt=trt, verbose=verbose, progress=say)
    m = result.manifest
    typer.echo(
        f"{result.engine}  ({m['precision']}, {m['tensorrt']['flavour']} {m['tensorrt']['version']}, "
        f"{m['gpu']['name']}, built in {m['build_seconds']:.1f} s, {m['engine_bytes'] / 1e6:.1f} MB)"
    )
    typer.echo(f"{result.manifest_path}")
    for extra in result.extra_files:
        typer.echo(f"{extra}")


def _int8_source(
    onnx: Path,
    precision: Precision,
    calibration: Path | None,
    calibrate_synthetic: int | None,
    calibration_out: Path,
    force: bool,
    say,
) -> Path:
    """The graph to build: ``onnx``, or for int8 its QDQ graph (``--calibration`` or calibrated first)."""
    from emorph_deploy.errors import ConfigMismatchError, InputError
    from emorph_deploy.export.onnx_io import graph_precision, load_onnx_hashed

    source = onnx
    if precision is not Precision.int8 and (calibration is not None or calibrate_synthetic is not None):
        raise InputError(
            f"--calibration/--calibrate-synthetic: expected --precision int8, got {precision.value}; "
            "fix: drop them or pass --precision int8"
        )
    if precision is Precision.int8 and calibration is not None and calibrate_synthetic is not None:
        raise InputError(
            "int8: expected one of --calibration or --calibrate-synthetic, got both; fix: pick one"
        )
    src_model, src_sha = load_onnx_hashed(onnx) if precision is Precision.int8 else (None, None)
    if precision is Precision.int8 and graph_precision(src_model) != "int8":
        if calibration is not None:
            from emorph_deploy.export.onnx_io import read_onnx_manifest

            qmeta = read_onnx_manifest(calibration) or {}
            derived = (qmeta.get("derived_from") or {}).get("sha256")
            if derived and derived != src_sha:
                raise ConfigMismatchError(
                    f"--calibration {calibration}: expected a QDQ graph calibrated from "
                    f"{onnx}, got one from {qmeta['derived_from'].get('onnx')}; fix: run "
                    f"'emorph calibrate {onnx}'"
                )
            source = calibration
        elif calibrate_synthetic is not None:
            from emorph_deploy.calibration import calibrate

            res = calibrate(
                onnx, synthetic=calibrate_synthetic, out_dir=calibration_out, force=force, say=say
            )
            say(f"calibrated on {calibrate_synthetic} synthetic pairs -> {res.qdq_onnx}")
            source = res.qdq_onnx
    return source


def _build_openvino(
    onnx: Path,
    precision: Precision,
    out: Path,
    calibration: Path | None,
    calibrate_synthetic: int | None,
    calibration_out: Path,
    nncf: bool,
    force: bool,
    say,
) -> None:
    from emorph_deploy.engines.openvino import build_ir
    from emorph_deploy.errors import InputError

    if nncf and calibration is not None:
        raise InputError("--nncf: expected no --calibration (NNCF calibrates itself), got one; fix: drop one")
    if nncf:
        source, pairs = onnx, calibrate_synthetic or 8
    else:
        source = _int8_source(onnx, precision, calibration, calibrate_synthetic, calibration_out, force, say)
        pairs = None
    res = build_ir(source, precision.value, out_dir=out, nncf_pairs=pairs, force=force, say=say)
    m = res.manifest
    typer.echo(
        f"{res.xml}  ({m['precision']}, OpenVINO {m['openvino']['version']}, {m['cpu']['model']}, "
        f"built in {m['build_seconds']:.1f} s)"
    )
    typer.echo(f"{res.bin}")
    typer.echo(f"{res.manifest_path}")


def register(app: typer.Typer) -> None:
    app.command("build")(build)
