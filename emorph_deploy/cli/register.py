"""``emorph register``: native-space registration of one pair (or a CSV of pairs) with standard outputs.

Outputs in ``--out``: ``warped.nii.gz`` (fixed grid and header), ``warped_labels.nii.gz`` (with
``--moving-labels``), ``displacement.nii.gz`` (ITK/ANTs: LPS mm, 5D vector), ``affine.mat`` (the
pre-alignment, on by default), ``voxel_flow.nii.gz`` (with ``--voxel-flow``, Learn2Reg voxels), ``qc.json``
and ``qc.png``, each name starting with ``--prefix``. Written all-or-nothing; nothing is overwritten without
``--force``. Every default comes from :data:`emorph_deploy.registration.defaults.DEFAULTS` (shared with
:class:`~emorph_deploy.registration.Registrar`). Exit codes: 0 ok, 1 processing error (or any failed pair in
batch mode), 2 bad input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.cli._common import (
    Backend,
    BackendOption,
    MatchContrastOption,
    PassesOption,
    RefineFoldWeightOption,
    RefineFullStepsOption,
    RefineGradSigmaOption,
    RefineOption,
    RefineSimilarityOption,
    handle_errors,
    set_threads,
)
from emorph_deploy.errors import InputError
from emorph_deploy.registration.defaults import DEFAULTS

#: the option naming each backend's artifact
_ARTIFACT_OPTIONS = {"--model": "torch", "--onnx": "onnxruntime", "--engine": "tensorrt"}


def _artifact(model: Path | None, onnx: Path | None, engine: Path | None) -> Path | None:
    from emorph_deploy.runners import ARTIFACT_SUFFIXES, is_artifact_of

    given = [(n, p) for n, p in (("--model", model), ("--onnx", onnx), ("--engine", engine)) if p is not None]
    if len(given) > 1:
        raise InputError(
            f"model: expected at most one of --model/--onnx/--engine, got {', '.join(n for n, _ in given)}"
            "; fix: pass one of them"
        )
    if not given:
        return None
    name, path = given[0]
    backend = _ARTIFACT_OPTIONS[name]
    if not is_artifact_of(path, backend) and not (name == "--engine" and path.suffix.lower() == ".xml"):
        raise InputError(
            f"{name}: expected a {'/'.join(ARTIFACT_SUFFIXES[backend])} file, got {path.name}; fix: pass the "
            "right file to --model (checkpoint), --onnx (.onnx) or --engine (.plan/.engine, OpenVINO .xml)"
        )
    if not path.exists() and not (backend == "torch" and path.with_suffix(".safetensors").exists()):
        raise InputError(f"{name}: expected an existing file, got a missing path {path}; fix: check the path")
    return path


@handle_errors
def register_command(
    fixed: Annotated[
        Path | None,
        typer.Argument(
            help="Fixed image: NIfTI-1/2 (.nii/.nii.gz), MGH (.mgh/.mgz), NRRD (.nrrd/.nhdr), MetaImage "
            "(.mha/.mhd) or a folder holding one DICOM series; its grid (and NIfTI header) define the "
            "outputs, which are NIfTI.",
            show_default=False,
        ),
    ] = None,
    moving: Annotated[
        Path | None,
        typer.Argument(
            help="Moving image: NIfTI-1/2, MGH/MGZ, NRRD, MHA/MHD or a folder holding one DICOM series.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint (.json/.safetensors).")] = None,
    onnx: Annotated[
        Path | None, typer.Option("--onnx", help="Exported ONNX graph (+ manifest .json).")
    ] = None,
    engine: Annotated[
        Path | None,
        typer.Option("--engine", help="TensorRT engine (.plan/.engine) or OpenVINO IR (.xml, emorph build)."),
    ] = None,
    backend: BackendOption = Backend.auto,
    moving_labels: Annotated[
        Path | None,
        typer.Option(
            "--moving-labels",
            help="Moving label map, warped with nearest neighbour (original values and dtype).",
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (one subfolder per pair with --pairs).")
    ] = Path("registration"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    affine: Annotated[
        bool,
        typer.Option(
            "--affine/--no-affine",
            help="Fast affine pre-alignment (~4 mm), composed into the outputs and written as affine.mat. "
            "--no-affine only for inputs already in one space.",
        ),
    ] = DEFAULTS.affine,
    match_contrast: MatchContrastOption = DEFAULTS.match_contrast,
    passes: PassesOption = DEFAULTS.passes,
    initial_affine: Annotated[
        Path | None,
        typer.Option(
            "--initial-affine",
            help="ITK affine (.mat/.txt, ANTs convention, e.g. an earlier affine.mat): the start of the "
            "pre-alignment, or the pre-alignment itself with --no-affine.",
        ),
    ] = None,
    fixed_mask: Annotated[
        Path | None,
        typer.Option(
            "--fixed-mask",
            help="Mask on the fixed grid (nonzero = inside): bounds the affine fit, weights --refine, and "
            "the qc.json NCC is measured inside it.",
        ),
    ] = None,
    moving_mask: Annotated[
        Path | None,
        typer.Option("--moving-mask", help="Mask on the moving grid (nonzero = inside) for the affine fit."),
    ] = None,
    fixed_labels: Annotated[
        Path | None,
        typer.Option(
            "--fixed-labels",
            help="Fixed label map: with --moving-labels, qc.json gets Dice before/after (mean, per label).",
        ),
    ] = None,
    prefix: Annotated[
        str,
        typer.Option("--prefix", help="Start of every output file name, e.g. sub01_ (sub01_warped.nii.gz)."),
    ] = "",
    voxel_flow: Annotated[
        bool,
        typer.Option(
            "--voxel-flow/--no-voxel-flow",
            help="Also write voxel_flow.nii.gz (Learn2Reg: displacement in fixed voxels).",
        ),
    ] = DEFAULTS.voxel_flow,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="CSV with columns fixed,moving[,moving_labels,fixed_labels,fixed_mask,moving_mask,id]: "
            "batch mode.",
        ),
    ] = None,
    qc_png: Annotated[bool, typer.Option("--qc-png/--no-qc-png", help="Render qc.png.")] = DEFAULTS.qc_png,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads for torch (default: all).")
    ] = None,
    refine: RefineOption = DEFAULTS.refine_steps,
    refine_similarity: RefineSimilarityOption = DEFAULTS.refine_similarity,
    refine_full_steps: RefineFullStepsOption = DEFAULTS.refine_full_steps or 0,
    refine_fold_weight: RefineFoldWeightOption = DEFAULTS.refine_fold_weight,
    refine_grad_sigma: RefineGradSigmaOption = DEFAULTS.refine_grad_sigma,
    # cohort batches (--pairs): where the pairs run, and picking up an interrupted run
    scheduler: Annotated[
        str | None,
        typer.Option(
            "--scheduler",
            help="Run the --pairs on Dask: local[:N] (N worker processes sharing the cores; default one per "
            "two cores), slurm:N / pbs:N (N batch jobs via dask-jobqueue) or a running scheduler's address "
            "tcp://HOST:PORT (docs/cluster.md). Needs emorph-deploy[dask].",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="With --pairs: skip pairs whose outputs are complete and valid, redo the others, rewrite "
            "summary.csv.",
        ),
    ] = False,
) -> None:
    """Register MOVING to FIXED in native space (or every pair of --pairs) and write the standard outputs."""
    from emorph_deploy.registration.batch import read_pairs, run_batch
    from emorph_deploy.registration.pipeline import (
        Registrar,
        check_prefix,
        load_extras,
        load_inputs,
        output_targets,
        refuse_existing,
    )

    refine_cfg = DEFAULTS.refine_config(
        steps=refine,
        similarity=refine_similarity.value,
        full_steps=refine_full_steps,
        fold_weight=refine_fold_weight,
        grad_sigma=refine_grad_sigma,
    )
    check_prefix(prefix)
    per_pair = {
        "--moving-labels": moving_labels,
        "--fixed-labels": fixed_labels,
        "--fixed-mask": fixed_mask,
        "--moving-mask": moving_mask,
        "--initial-affine": initial_affine,
        "--prefix": prefix or None,
    }
    if pairs is not None and (fixed is not None or moving is not None or any(per_pair.values())):
        given = [n for n, v in per_pair.items() if v is not None] or ["FIXED MOVING"]
        raise InputError(
            f"register: expected either FIXED MOVING (with {'/'.join(per_pair)}) or --pairs CSV, got --pairs "
            f"and {', '.join(given)}; fix: pass one pair, or put masks and labels in the CSV's columns"
        )
    if pairs is None and (scheduler is not None or resume):
        raise InputError(
            "register: expected --pairs CSV with --scheduler/--resume, got a single pair; fix: pass --pairs"
        )
    if fixed_labels is not None and moving_labels is None:
        raise InputError(
            "--fixed-labels: expected --moving-labels too (Dice compares the two), got only --fixed-labels; "
            "fix: add --moving-labels SEG or drop --fixed-labels"
        )
    if pairs is None and (fixed is None or moving is None):
        raise InputError(
            "register: expected FIXED and MOVING images (or --pairs CSV), got "
            f"{'none' if fixed is None else 'only FIXED'}; fix: emorph register fixed.nii.gz "
            "moving.nii.gz --model CHECKPOINT"
        )
    set_threads(threads)
    artifact = _artifact(model, onnx, engine)
    batch = read_pairs(pairs) if pairs is not None else None
    if batch is None:  # fail before any work on a bad or existing output
        targets = output_targets(
            out,
            labels=moving_labels is not None,
            voxel_flow=voxel_flow,
            qc_png=qc_png,
            affine=affine or initial_affine is not None,
            prefix=prefix,
        )
        refuse_existing(out, targets.values(), force, prefix)

    if batch is not None and scheduler is not None:
        from emorph_deploy.registration.batch import PairOptions
        from emorph_deploy.registration.cluster import run_batch_dask

        options = PairOptions(force, None, voxel_flow, qc_png, refine_cfg, resume)
        rows = run_batch_dask(
            batch,
            out,
            scheduler,
            artifact=artifact,
            backend=backend.value,
            affine=affine,
            match_contrast=match_contrast,
            passes=passes,
            options=options,
            threads=threads,
            echo=lambda line: typer.echo(line, err=True),
        )
        _report_batch(rows, out)
        return
    extras: dict = {}
    if batch is None:  # fail fast on bad input, before the model loads
        inputs = load_inputs(fixed, moving, moving_labels)
        given = {"fixed_mask": fixed_mask, "moving_mask": moving_mask, "fixed_labels": fixed_labels}
        arrays = load_extras(inputs[0], inputs[1], **given)
        grid = {"fixed_mask": inputs[0], "moving_mask": inputs[1], "fixed_labels": inputs[0]}
        extras = {k: (a.astype("uint8") if a.dtype == bool else a, grid[k].affine) for k, a in arrays.items()}
        if initial_affine is not None:
            from emorph_deploy.data.transforms import read_itk_affine

            extras["initial_affine"] = read_itk_affine(initial_affine, name="--initial-affine")
    reg = Registrar.load(
        artifact, backend=backend.value, affine=affine, match_contrast=match_contrast, passes=passes
    )
    for note in reg.backend_notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(
        f"backend: {reg.backend} ({reg.precision}), model grid {'x'.join(map(str, reg.grid_shape))}"
        f"{'' if artifact is not None else ' [packaged default model]'}",
        err=True,
    )

    if batch is not None:
        rows = run_batch(
            reg,
            batch,
            out,
            force=force,
            voxel_flow=voxel_flow,
            qc_png=qc_png,
            progress=True,
            refine=refine_cfg,
            resume=resume,
        )
        _report_batch(rows, out)
        return

    res = reg.register(*inputs, validate=False, refine=refine_cfg, **extras)
    written = res.save(out, force=force, voxel_flow=voxel_flow, qc_png=qc_png, prefix=prefix)
    q = res.qc
    from emorph_deploy.qc import warnings_of

    for warning in warnings_of(q):
        typer.echo(warning, err=True)
    t = q["times_s"]
    dice = f"Dice {q['dice_before']:.4f} -> {q['dice_after']:.4f} | " if "dice_after" in q else ""
    typer.echo(
        f"NCC ({q['qc_region']}) {q['ncc_before']:.4f} -> {q['ncc_after']:.4f} | {dice}"
        f"J<=0 {100 * q['frac_jac_nonpos']:.4f}% | SDlogJ {q['sdlogj']:.4f} | total "
        f"{t['total'] + t.get('inverse', 0.0) + t.get('write', 0.0):.2f} s (infer {t['infer']:.2f} s)"
    )
    for path in written.values():
        typer.echo(str(path))


def _report_batch(rows: list[dict], out: Path) -> None:
    """Print the batch summary; exit 1 when any pair failed."""
    from emorph_deploy.registration.batch import format_summary

    typer.echo(format_summary(rows))
    typer.echo(f"summary: {out / 'summary.csv'}")
    if any(r["status"] == "failed" for r in rows):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("register")(register_command)
