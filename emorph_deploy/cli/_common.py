"""Shared CLI helpers: error handling that maps domain errors to one line and an exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from emorph_deploy.choices import Backend, Similarity
from emorph_deploy.errors import EmorphError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


def handle_errors(fn: F) -> F:
    """Decorate a command: an :class:`EmorphError` becomes ``error: <message>`` on stderr + its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EmorphError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


#: ``--refine N`` shared by ``emorph register`` and ``emorph demo``.
RefineOption = Annotated[
    int,
    typer.Option(
        "--refine",
        min=0,
        help="Test-time refinement: N Adam steps on the displacement (at half resolution; the training loss, "
        "NCC, when the two images share a contrast, else MIND-SSC; the network is untouched). 0 = off.",
    ),
]


#: ``--refine-similarity`` of ``emorph register``.
RefineSimilarityOption = Annotated[
    Similarity,
    typer.Option(
        "--refine-similarity",
        help="Similarity of --refine: ncc (the training loss; same contrast), mind (MIND-SSC; across "
        "contrasts, e.g. T1 to T2), ngf (normalised gradient fields) or auto (ncc if the two images share a "
        "contrast on the model grid, else mind; the choice is recorded in qc.json).",
    ),
]


#: ``--backend`` shared by ``emorph register`` and ``emorph demo``.
BackendOption = Annotated[
    Backend,
    typer.Option(
        "--backend",
        help="auto = TensorRT, then OpenVINO (CPU), then ONNX Runtime (GPU, then CPU), then torch.",
    ),
]
