"""Backend runners with one protocol: construct from an artifact, ``input_spec``, ``infer(feed) -> dict``.

``load_runner(artifact, backend="auto")`` picks the backend by file suffix: ``.safetensors``/``.json``
checkpoint → torch, ``.onnx`` → onnxruntime, ``.plan``/``.engine`` → tensorrt. Backend modules (and
torch, onnxruntime, tensorrt) are imported only when a runner is created.

TensorRT: ``emorph_deploy/runners/tensorrt.py`` (engines task) defines ``TensorRTRunner(artifact,
**kwargs)``, a :class:`Runner` built from an engine plus its manifest; it is registered in ``BACKENDS``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import InputError, MissingDependencyError
from emorph_deploy.runners.base import Runner

if TYPE_CHECKING:
    from emorph_deploy.runners.onnxruntime import OnnxRuntimeRunner
    from emorph_deploy.runners.tensorrt import TensorRTRunner
    from emorph_deploy.runners.torch import TorchRunner

#: backend name → (module, class, pip extra needed)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("emorph_deploy.runners.torch", "TorchRunner", "train"),
    "onnxruntime": ("emorph_deploy.runners.onnxruntime", "OnnxRuntimeRunner", "onnx"),
    "tensorrt": ("emorph_deploy.runners.tensorrt", "TensorRTRunner", "tensorrt"),
}
SUFFIX_BACKEND: dict[str, str] = {
    ".safetensors": "torch",
    ".json": "torch",
    ".onnx": "onnxruntime",
    ".plan": "tensorrt",
    ".engine": "tensorrt",
}
_CLASS_TO_BACKEND = {cls: name for name, (_, cls, _) in BACKENDS.items()}


def runner_class(backend: str) -> type[Runner]:
    """Import and return the runner class of ``backend`` (MissingDependencyError if it cannot be imported)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; expected one of {['auto', *BACKENDS]}")
    module_name, cls_name, extra = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"the {backend} runner is not available ({exc}); fix: pip install 'emorph-deploy[{extra}]'"
        ) from exc
    return getattr(module, cls_name)


def backend_for(artifact: str | Path, backend: str = "auto") -> str:
    """Backend name for ``artifact``: ``backend`` if given, else from the file suffix."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; expected one of {['auto', *BACKENDS]}")
        return backend
    suffix = Path(artifact).suffix.lower()
    if suffix in SUFFIX_BACKEND:
        return SUFFIX_BACKEND[suffix]
    if Path(artifact).is_dir() or Path(artifact).with_suffix(".safetensors").is_file():  # run folder / stem
        return "torch"
    raise InputError(
        f"cannot tell the backend of {artifact}: expected .safetensors/.json (checkpoint), .onnx or "
        ".plan/.engine; fix: pass --backend or the right file"
    )


def load_runner(artifact: str | Path, backend: str = "auto", **kwargs: Any) -> Runner:
    """Create the runner for ``artifact`` (``backend`` "auto"|"torch"|"onnxruntime"|"tensorrt").

    Also makes the process keep freed memory for reuse (:func:`emorph_deploy.runtime.keep_freed_memory`;
    ``EMORPH_MALLOC=system`` opts out): large per-layer tensors are then not page-faulted in afresh.
    """
    from emorph_deploy.runtime import keep_freed_memory

    keep_freed_memory()
    name = backend_for(artifact, backend)
    return runner_class(name)(artifact, **kwargs)


def __getattr__(name: str) -> Any:  # lazy: ``from emorph_deploy.runners import TorchRunner``
    if name in _CLASS_TO_BACKEND:
        return runner_class(_CLASS_TO_BACKEND[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "OnnxRuntimeRunner",
    "Runner",
    "TensorRTRunner",
    "TorchRunner",
    "backend_for",
    "load_runner",
    "runner_class",
]
