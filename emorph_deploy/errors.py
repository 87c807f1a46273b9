"""Domain exceptions. Every error a user can cause maps to one clear line and an exit code.

Exit codes (shared by every CLI command): 0 ok, 1 check failed / processing error, 2 bad input.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread so every ``finally`` cleans up (a
    ``KeyboardInterrupt``, so nothing that catches ``Exception`` swallows it). Exit 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (the default SIGTERM
    action kills the process without running any cleanup). Elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[Callable[[], None]]:
    """Inside: SIGINT/SIGTERM are recorded, not raised, and the yielded ``check()`` raises
    :class:`Interrupted` for a recorded one; call it at safe points. Native code that calls back into Python
    (TensorRT's logger and progress monitor) swallows exceptions raised in the callbacks, which would lose
    the signal. A signal still recorded on a normal exit is raised then. Outside the main thread: a no-op."""
    got: list[int] = []

    def check() -> None:
        if got:
            raise Interrupted(got[0])

    if threading.current_thread() is not threading.main_thread():
        yield check
        return
    previous = {s: signal.signal(s, lambda signum, _frame: got.append(signum)) for s in _SIGNALS}
    try:
        yield check
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    check()


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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
