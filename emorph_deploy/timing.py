"""Wall-clock stage timing shared by the pipelines: ``with stopwatch(times, "infer"): ...``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["stopwatch"]


@contextmanager
def stopwatch(times: dict[str, float], name: str) -> Iterator[None]:
    """Set ``times[name]`` to the seconds (``time.perf_counter``) the ``with`` block took, also when it
    raises."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = time.perf_counter() - t0
