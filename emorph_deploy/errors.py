"""Domain exceptions. Every error a user can cause maps to one clear line and an exit code.

Exit codes (shared by every CLI command): 0 ok, 1 check failed / processing error, 2 bad input.
"""

from __future__ import annotations


class EmorphError(Exception):
    """Base class: ``str(err)`` is the one line shown to the user."""

    exit_code: int = 1


class InputError(EmorphError, ValueError):
    """Bad input from the user: missing/corrupt files, wrong shapes, NaN voxels, bad options (exit 2)."""

    exit_code = 2


class ConfigMismatchError(InputError):
    """An artifact (checkpoint, ONNX, engine) does not match what was asked for (exit 2)."""


class OutputExistsError(InputError):
    """An output exists and ``--force`` was not given (exit 2)."""


class MissingDependencyError(EmorphError, ImportError):
    """An optional backend is not installed; the message names the extra to install (exit 2)."""

    exit_code = 2


class ProcessingError(EmorphError, RuntimeError):
    """Valid input that failed during processing (exit 1)."""

    exit_code = 1


class CheckFailedError(EmorphError):
    """A numerical check ran and fell outside tolerance (exit 1)."""

    exit_code = 1


def require(module: str, extra: str):
    """Import ``module`` lazily; if missing, raise a MissingDependencyError naming the pip extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised when extras are absent
        raise MissingDependencyError(
            f"'{module}' is not installed: expected the optional backend, got ImportError ({exc}); "
            f"fix: pip install 'emorph-deploy[{extra}]'"
        ) from exc
