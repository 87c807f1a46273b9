"""``emorph apply``: warp any image with a saved registration (antsApplyTransforms' transform-list order)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from emorph_deploy.choices import Interp
from emorph_deploy.cli._common import handle_errors
from emorph_deploy.errors import InputError

_HELP = """Warp IMAGE onto the --reference grid through TRANSFORM... in ANTs' order (antsApplyTransforms -t,
ants.apply_transforms): the first transform listed maps the reference points first, so ANTs' [Warp, Affine]
is p -> Affine(Warp(p)) (the last listed acts on the image first).

Transforms: ITK/ANTs displacement fields (5D vector NIfTI, LPS mm) and ITK affines (.mat/.txt/.tfm;
\\[affine.mat,1] is its inverse). The output has the reference's grid and header.

register composes its affine pre-alignment into both fields. 'emorph apply OUT/displacement.nii.gz MOVING
--reference FIXED --out w.nii.gz' reproduces OUT/warped.nii.gz (--interp nearest on the moving labels:
warped_labels.nii.gz).

'emorph apply OUT/inverse_displacement.nii.gz ATLAS_LABELS --reference MOVING --interp label --out
s.nii.gz' takes fixed-space images (an atlas's labels) onto the moving image.

'emorph apply OUT/affine.mat MOVING --reference FIXED --out a.nii.gz' applies the pre-alignment alone;
never list affine.mat with one of the fields (it is already inside them).

Exit codes: 0 ok, 1 processing error, 2 bad input."""


@handle_errors
def apply_command(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="TRANSFORM... IMAGE: one or more transforms, then the image to warp.",
            show_default=False,
            metavar="TRANSFORM... IMAGE",
        ),
    ],
    reference: Annotated[
        Path,
        typer.Option("--reference", "-r", help="Image whose grid and header the output takes (e.g. FIXED)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output NIfTI (.nii/.nii.gz).")],
    interp: Annotated[
        Interp,
        typer.Option(
            "--interp",
            help="linear (trilinear, float32), nearest (values and dtype kept), label (ANTs GenericLabel: "
            "the label with the largest trilinear weight; values and dtype kept).",
        ),
    ] = Interp.linear,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --out.")] = False,
) -> None:
    from emorph_deploy.fileio import check_writable

    if len(paths) < 2:
        raise InputError(
            f"apply: expected TRANSFORM... IMAGE (at least one transform, then the image), got {len(paths)} "
            "path(s); fix: e.g. emorph apply out/displacement.nii.gz moving.nii.gz --reference fixed.nii.gz "
            "--out warped.nii.gz"
        )
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(
            f"--out: expected a .nii or .nii.gz file name, got {out.name}; fix: e.g. warped.nii.gz"
        )
    check_writable(out, force)  # before any work

    from emorph_deploy.data.nifti import save_nifti_atomic
    from emorph_deploy.registration.apply import apply_transforms

    *transforms, image = paths
    img = apply_transforms(transforms, Path(image), reference, interp)
    save_nifti_atomic(img, out, force=force)
    typer.echo(str(out))


apply_command.__doc__ = _HELP


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_command)
