"""The runner protocol (Polygraphy style): construct from an artifact, ``input_spec``, ``infer(feed)``.

The base class validates every feed against ``input_spec`` (names, shapes, dtypes) in one place, times
the backend call (``last_latency_s``) and checks the outputs it returns; backends implement ``_infer``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.errors import InputError, ProcessingError

INPUT_NAMES: tuple[str, ...] = ("moving", "fixed")
FLOW = "flow"
WARPED = "warped"


class Runner(ABC):
    """Base class of every backend runner.

    Subclasses set ``name`` and, in ``__init__``, ``self.artifact``, ``self._grid_shape`` (D, H, W),
    ``self._output_names`` and ``self._meta``; then implement :meth:`_infer`.
    """

    name: str = "base"

    def __init__(self) -> None:
        self.artifact: Path | None = None
        self._grid_shape: tuple[int, int, int] = (0, 0, 0)
        self._output_names: tuple[str, ...] = (FLOW,)
        self._meta: dict[str, Any] = {}
        self.last_latency_s: float = float("nan")

    # ------------------------------------------------------------------ description
    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Model grid (D, H, W)."""
        return self._grid_shape

    @property
    def input_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{"moving": ((1, 1, D, H, W), float32), "fixed": (...)}``."""
        shape = (1, 1, *self._grid_shape)
        return {n: (shape, np.dtype(np.float32)) for n in INPUT_NAMES}

    @property
    def output_names(self) -> tuple[str, ...]:
        """``("flow",)`` or ``("flow", "warped")``."""
        return self._output_names

    @property
    def meta(self) -> dict[str, Any]:
        """Model config, preprocessing, precision, ... (manifest or checkpoint metadata)."""
        return self._meta

    @property
    def precision(self) -> str:
        """``"fp32"``, ``"fp16"``, ``"int8"`` (from the metadata; fp32 when it says nothing)."""
        return str(self._meta.get("precision", "fp32"))

    @property
    def providers(self) -> list[str]:
        """Execution providers in use, fastest first (ONNX Runtime); empty for backends without any."""
        return []

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({str(self.artifact)!r}, grid={self._grid_shape}, outputs={self._output_names})"

    # ------------------------------------------------------------------ inference
    def validate_feed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, shapes and dtypes against :attr:`input_spec`; return C-contiguous arrays."""
        if not isinstance(feed, dict):
            raise InputError(
                f"{self.name} runner: expected a dict feed {{'moving', 'fixed'}}, got {type(feed).__name__}"
            )
        spec = self.input_spec
        missing = [n for n in spec if n not in feed]
        extra = [n for n in feed if n not in spec]
        if missing or extra:
            raise InputError(
                f"{self.name} runner: expected inputs {sorted(spec)}, got {sorted(feed)}; "
                f"fix: feed exactly {list(spec)}"
            )
        out: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in spec.items():
            arr = feed[name]
            if not isinstance(arr, np.ndarray):
                raise InputError(
                    f"{self.name} runner: input '{name}' must be a numpy array, "
                    f"got {type(arr).__name__}; fix: np.asarray(x, dtype=np.float32)"
                )
            if tuple(arr.shape) != tuple(shape):
                raise InputError(
                    f"{self.name} runner: input '{name}' expected shape {tuple(shape)}, got "
                    f"{tuple(arr.shape)}; fix: preprocess to the model grid {self._grid_shape} "
                    "and add batch/channel axes"
                )
            if arr.dtype != dtype:
                raise InputError(
                    f"{self.name} runner: input '{name}' expected dtype {dtype}, got {arr.dtype}; "
                    f"fix: x.astype(np.{dtype})"
                )
            out[name] = np.ascontiguousarray(arr)
        return out

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feed``, run the backend, time it, return ``{"flow": (1,3,D,H,W)[, "warped":
        (1,1,D,H,W)]}``."""
        feed = self.validate_feed(feed)
        start = time.perf_counter()
        outputs = self._infer(feed)
        self.last_latency_s = time.perf_counter() - start
        return self._check_outputs(outputs)

    def _check_outputs(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        d, h, w = self._grid_shape
        expected = {FLOW: (1, 3, d, h, w), WARPED: (1, 1, d, h, w)}
        result: dict[str, np.ndarray] = {}
        for name in self._output_names:
            if name not in outputs:
                raise ProcessingError(f"{self.name} runner returned {sorted(outputs)}, expected {name!r}")
            arr = np.asarray(outputs[name])
            if tuple(arr.shape) != expected[name]:
                raise ProcessingError(
                    f"{self.name} runner output '{name}' has shape {tuple(arr.shape)}, "
                    f"expected {expected[name]}"
                )
            result[name] = arr.astype(np.float32, copy=False)
        return result

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the backend on a validated feed; return at least :attr:`output_names`."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release backend resources (sessions, engines); idempotent."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
