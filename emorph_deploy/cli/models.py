"""``emorph models``: list the registered EfficientMorph variants with parameters and GMACs."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from emorph_deploy.cli._common import handle_errors
from emorph_deploy.errors import InputError


def _parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) != 3:
        raise InputError(f"--size expects DxHxW (e.g. 160x192x224); got {text!r}")
    return size  # type: ignore[return-value]


@handle_errors
def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    size: Annotated[str, typer.Option("--size", help="Grid DxHxW for the GMACs.")] = "160x192x224",
) -> None:
    """List the model variants with parameter counts and GMACs (torch FLOP counter, MACs = FLOPs/2)."""
    from emorph_deploy.models import list_models, model_info

    img_size = _parse_size(size)
    rows = []
    for name in list_models():
        info = model_info(name, img_size=img_size)
        info.pop("config")
        rows.append(info)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    d, h, w = img_size
    gm = f"GMACs@{d}x{h}x{w}"
    header = f"{'name':<18} {'attention':<9} {'depths':<7} {'params':>11} {gm:>19}  reference"
    typer.echo(header)
    typer.echo("-" * len(header) + "-" * 24)
    for r in rows:
        ref = ""
        if r["reference_params"] is not None:
            ref = f"{r['reference_params']:,} params, {r['reference_gmacs']} GMACs"
        name = r["name"] + (" *" if r["default"] else "")
        depths = ",".join(str(x) for x in r["depths"])
        attn = r["attention"]
        typer.echo(f"{name:<18} {attn:<9} {depths:<7} {r['params']:>11,} {r['gmacs']:>19.1f}  {ref}")
    typer.echo("* default. GMACs: torch.utils.flop_counter (convs, linears, attention matmuls), FLOPs/2")


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
