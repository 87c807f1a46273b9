"""Shared CLI helpers: error handling that maps domain errors to one line and an exit code."""

from __future__ import annotations

import errno
import functools
import signal
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from emorph_deploy.choices import Backend, Similarity
from emorph_deploy.errors import EmorphError, InputError, Interrupted, interrupts_raise
from emorph_deploy.registration.defaults import MAX_GRAD_SIGMA, MAX_PASSES

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2

#: OS errors of the disk itself (full, over quota, read-only, file too large, I/O): one line, exit 1
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO})


def handle_errors(fn: F) -> F:
    """Decorate a command: an :class:`EmorphError` becomes ``error: <message>`` on stderr + its exit code;
    SIGINT/SIGTERM become :class:`~emorph_deploy.errors.Interrupted` (every ``finally`` removes what was
    half written), then one line and exit 130/143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupts_raise():
                return fn(*args, **kwargs)
        except EmorphError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if exc.errno not in _DISK_ERRNOS:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            typer.echo(
                f"error: writing{where}: expected room on a writable disk, got {exc.strerror or exc}; fix: "
                "free space or choose another --out",
                err=True,
            )
            raise typer.Exit(EXIT_CHECK_FAILED) from None
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            typer.echo(
                f"error: interrupted by {signal.Signals(signum).name}; unfinished outputs removed", err=True
            )
            raise typer.Exit(128 + int(signum)) from None

    return wrapper  # type: ignore[return-value]


def set_threads(threads: int | None) -> None:
    """Apply ``--threads`` to torch and to the ONNX Runtime / OpenVINO runners created after it, bounded to
    1..4x the CPU count: far more threads than cores only slows a run down, and the OpenMP runtime fails (or
    crashes) at tens of thousands. InputError outside."""
    if threads is None:
        return
    import os

    most = 4 * (os.cpu_count() or 1)
    if not 1 <= threads <= most:
        raise InputError(
            f"--threads: expected 1..{most} (up to 4 per CPU), got {threads}; fix: pass e.g. "
            f"--threads {os.cpu_count() or 1}"
        )
    import torch

    from emorph_deploy.runners import set_default_threads

    torch.set_num_threads(threads)
    set_default_threads(threads)


#: ``--refine N`` shared by ``emorph register`` and ``emorph demo``.
RefineOption = Annotated[
    int,
    typer.Option(
        "--refine",
        min=0,
        help="Test-time refinement: N Adam steps on the displacement (at half resolution; the training loss, "
        "NCC, when the two images share a contrast, else normalised gradient fields; the network is "
        "untouched). 0 = off.",
    ),
]


#: ``--refine-full-steps`` of ``emorph register``.
RefineFullStepsOption = Annotated[
    int,
    typer.Option(
        "--refine-full-steps",
        min=0,
        help="With --refine N: K more steps at the model grid's full resolution after the N half-resolution "
        "ones (more accurate, ~8x the cost of a half-resolution step, and more folding; see the model card).",
    ),
]


#: ``--refine-fold-weight`` of ``emorph register``.
RefineFoldWeightOption = Annotated[
    float,
    typer.Option(
        "--refine-fold-weight",
        min=0.0,
        help="With --refine N: weight of the folding penalty, which pushes back only where a voxel is about "
        "to fold (Jacobian determinant below 0.05); 0 = off. Much larger weights than the default make "
        "Adam's steps fold more, not less (see the model card).",
    ),
]


#: ``--refine-grad-sigma`` of ``emorph register``.
RefineGradSigmaOption = Annotated[
    float,
    typer.Option(
        "--refine-grad-sigma",
        min=0.0,
        max=MAX_GRAD_SIGMA,
        help="With --refine N: standard deviation (voxels of each level) of the Gaussian that smooths every "
        "step's gradient before Adam's update, so that neighbouring voxels move together; 0 = off.",
    ),
]


#: ``--refine-similarity`` of ``emorph register``.
RefineSimilarityOption = Annotated[
    Similarity,
    typer.Option(
        "--refine-similarity",
        help="Similarity of --refine: ncc (the training loss; same contrast), ngf (normalised gradient "
        "fields; across contrasts, e.g. T1 to T2), mind (MIND-SSC) or auto (ncc if the two images share a "
        "contrast on the model grid, else ngf; the choice is recorded in qc.json).",
    ),
]


#: ``--match-contrast/--no-match-contrast`` of ``emorph register`` and ``emorph demo``.
MatchContrastOption = Annotated[
    bool,
    typer.Option(
        "--match-contrast/--no-match-contrast",
        help="When the pre-aligned images differ in contrast (e.g. T1 to T2), give the moving image the "
        "fixed image's contrast (median fixed intensity per moving intensity) for the network and --refine; "
        "the outputs warp the moving image as given. Recorded in qc.json's contrast.",
    ),
]


#: ``--passes`` shared by ``emorph register`` and ``emorph demo``.
PassesOption = Annotated[
    int,
    typer.Option(
        "--passes",
        min=1,
        max=MAX_PASSES,
        help="Network passes: each further pass registers the moving image warped so far and composes the "
        "flows (one more inference each). 2 raises the network's own accuracy; after --refine it adds "
        "little.",
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
