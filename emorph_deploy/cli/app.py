"""The ``emorph`` command. Each command lives in its own module and is registered here.

Commands wrap their body with :func:`emorph_deploy.cli._common.handle_errors`: a domain error is printed as
one line on stderr with the exit code it carries (0 ok, 1 check failed / processing error, 2 bad input).
"""

from __future__ import annotations

import importlib

import typer

from emorph_deploy import __version__

app = typer.Typer(
    name="emorph",
    help="EfficientMorph 3D registration: train, export to ONNX, build TensorRT engines, check, register.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion
    context_settings={"help_option_names": ["-h", "--help"]},  # -h on every command
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"emorph {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """EfficientMorph 3D registration toolkit."""


# One entry per command module (``emorph_deploy/cli/<name>.py``); each exposes ``register(app: typer.Typer)``
# and keeps its heavy imports (torch, onnx, tensorrt) inside the command function.
COMMAND_MODULES: tuple[str, ...] = (
    "models",
    "export",
    "check",
    "register",
    "apply",
    "train",
    "evaluate",
    "build",
    "calibrate",
    "demo",
)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"emorph_deploy.cli.{name}").register(app)


_register_commands()


def main() -> None:
    """Console-script entry point."""
    from emorph_deploy.runtime import keep_freed_memory

    keep_freed_memory()  # reuse freed tensor memory (EMORPH_MALLOC=system keeps glibc's defaults)
    app()
