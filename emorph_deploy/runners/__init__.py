"""Backend runners with one protocol: construct from an artifact, ``input_spec``, ``infer(feed) -> dict``.

The artifact rules live here, once: which file suffixes each backend reads (:data:`ARTIFACT_SUFFIXES`),
which backend a file belongs to (:func:`backend_for`), where a backend's artifact sits beside another one
(:func:`artifact_for`), and how ``backend="auto"`` falls back (:func:`resolve`). Backend modules (and
torch, onnxruntime, tensorrt) are imported only when a runner is created.

``load_runner(artifact, backend)`` opens exactly that file with that backend (``"auto"``: by suffix);
``resolve(artifact, backend)`` is what registration uses: an explicit backend must be given its own kind of
artifact, ``"auto"`` tries TensorRT, OpenVINO (CPU, see :func:`openvino_auto_skip`), ONNX Runtime, then torch
on the artifact or its same-stem siblings.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emorph_deploy.errors import EmorphError, InputError, MissingDependencyError
from emorph_deploy.runners.base import Runner

if TYPE_CHECKING:
    from emorph_deploy.runners.onnxruntime import OnnxRuntimeRunner
    from emorph_deploy.runners.openvino import OpenVinoRunner
    from emorph_deploy.runners.tensorrt import TensorRTRunner
    from emorph_deploy.runners.torch import TorchRunner

#: backend name → (module, class, pip extra needed)
BACKENDS: dict[str, tuple[str, str, str]] = {
    "torch": ("emorph_deploy.runners.torch", "TorchRunner", "train"),
    "onnxruntime": ("emorph_deploy.runners.onnxruntime", "OnnxRuntimeRunner", "onnx"),
    "tensorrt": ("emorph_deploy.runners.tensorrt", "TensorRTRunner", "tensorrt"),
    "openvino": ("emorph_deploy.runners.openvino", "OpenVinoRunner", "cpu"),
}
#: backend name → the file suffixes of its artifacts
ARTIFACT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "tensorrt": (".plan", ".engine"),
    "onnxruntime": (".onnx",),
    "torch": (".json", ".safetensors"),
    "openvino": (".xml", ".onnx"),  # its IR, or the ONNX export itself
}
#: suffix → its backend in :func:`backend_for` (the first listed: ``.onnx`` → onnxruntime)
SUFFIX_BACKEND: dict[str, str] = {}
for _backend, _suffixes in ARTIFACT_SUFFIXES.items():
    for _suffix in _suffixes:
        SUFFIX_BACKEND.setdefault(_suffix, _backend)
#: Order in which ``backend="auto"`` tries backends (each needs its artifact: the one given or a sibling).
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "openvino", "onnxruntime", "torch")
_ARTIFACT_KINDS = {
    "tensorrt": "--engine FILE (.plan/.engine)",
    "onnxruntime": "--onnx FILE (.onnx)",
    "torch": "--model CHECKPOINT (.json/.safetensors)",
    "openvino": "--onnx FILE (.onnx) or --engine FILE (.xml from 'emorph build --target openvino')",
}
_CLASS_TO_BACKEND = {cls: name for name, (_, cls, _) in BACKENDS.items()}
#: backends whose runner takes ``threads`` (torch's pool is process-wide: ``torch.set_num_threads``)
THREADED_BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino")
_default_threads: int | None = None


def set_default_threads(threads: int | None) -> None:
    """CPU threads of the ONNX Runtime and OpenVINO runners created from now on in this process when the
    caller passes no ``threads`` (None: each library's default, all cores). A Dask worker sets its share of
    the cores here, so N workers on one machine do not each start a pool as wide as the machine."""
    if threads is not None and int(threads) < 1:
        raise InputError(f"threads: expected >= 1 (or None), got {threads}; fix: pass e.g. 1")
    global _default_threads
    _default_threads = None if threads is None else int(threads)


def default_threads() -> int | None:
    """The thread count of :func:`set_default_threads` (None: the libraries' defaults)."""
    return _default_threads


def runner_class(backend: str) -> type[Runner]:
    """Import and return the runner class of ``backend`` (MissingDependencyError if it cannot be imported)."""
    check_backend(backend)
    module_name, cls_name, extra = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            f"the {backend} runner is not available ({exc}); fix: pip install 'emorph-deploy[{extra}]'"
        ) from exc
    return getattr(module, cls_name)


def check_backend(backend: str, *, auto: bool = False) -> str:
    """``backend`` if it names a runner (or is ``"auto"`` when ``auto``), else InputError."""
    if backend in BACKENDS or (auto and backend == "auto"):
        return backend
    raise InputError(f"unknown backend {backend!r}; expected one of {['auto', *BACKENDS]}")


def is_artifact_of(path: str | Path, backend: str) -> bool:
    """True if ``path`` is ``backend``'s kind of artifact by its suffix; a torch checkpoint may also be named
    by its stem (``run/model`` for ``run/model.safetensors``)."""
    path = Path(path)
    if path.suffix.lower() in ARTIFACT_SUFFIXES[backend]:
        return True
    return backend == "torch" and path.with_suffix(".safetensors").exists()


def backend_for(artifact: str | Path, backend: str = "auto") -> str:
    """Backend name for ``artifact``: ``backend`` if given, else from the file suffix."""
    if backend != "auto":
        return check_backend(backend)
    suffix = Path(artifact).suffix.lower()
    if suffix in SUFFIX_BACKEND:
        return SUFFIX_BACKEND[suffix]
    if Path(artifact).is_dir() or Path(artifact).with_suffix(".safetensors").is_file():  # run folder / stem
        return "torch"
    raise InputError(
        f"cannot tell the backend of {artifact}: expected .safetensors/.json (checkpoint), .onnx or "
        ".plan/.engine/.xml; fix: pass --backend or the right file"
    )


def artifact_for(path: str | Path, backend: str) -> Path | None:
    """``path`` if it is ``backend``'s kind of artifact, else a sibling with the same stem, else None."""
    path = Path(path)
    if path.suffix.lower() in ARTIFACT_SUFFIXES[backend]:
        return path
    if path.suffix.lower() not in SUFFIX_BACKEND:
        return None
    for suffix in ARTIFACT_SUFFIXES[backend]:
        cand = path.with_suffix(suffix)
        if cand.is_file() and (backend != "torch" or cand.with_suffix(".safetensors").is_file()):
            if backend == "torch" and cand.suffix == ".json" and not _is_checkpoint_json(cand):
                continue  # an ONNX manifest is also <stem>.json: only a checkpoint counts here
            return cand
    return None


def _is_checkpoint_json(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format", "").startswith("emorph-checkpoint") is not False
    except (OSError, ValueError):
        return False


def openvino_auto_skip(artifact: str | Path | None = None) -> str | None:
    """Why ``backend="auto"`` passes over OpenVINO for ``artifact`` here, or None when it prefers it.

    The rule, from ``benchmarks/openvino_latency.py`` (docs/cpu_backends.md): on x86-64 CPUs with AVX2 or
    better, OpenVINO fp32 ran the exported graph faster than ONNX Runtime's CPU provider at both model grids,
    so it goes first there. Elsewhere nothing was measured; where ONNX Runtime has a GPU provider, the GPU
    goes first; and a QDQ graph (int8 ONNX) stays with ONNX Runtime unless the CPU has AMX int8 tiles:
    on an AVX512-VNNI CPU without AMX (AMD Zen 4) OpenVINO's int8 of it fell outside the int8 tolerance of
    ``emorph check``, while on an AMX Xeon it matched ONNX Runtime's accuracy at 3.5-4x its speed. An IR
    (``.xml``) is never passed over: only OpenVINO runs it.
    """
    import platform

    from emorph_deploy.runtime import cpu_flags

    if artifact is not None and Path(artifact).suffix.lower() == ".xml":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not measured on {platform.machine()} CPUs (auto prefers it on x86-64 with AVX2)"
    if "avx2" not in cpu_flags():
        return "the CPU has no AVX2 (auto prefers OpenVINO only where it was measured faster)"
    if (
        artifact is not None
        and Path(artifact).suffix.lower() == ".onnx"
        and _recorded_precision(artifact) == "int8"
        and "amx_int8" not in cpu_flags()
    ):
        return "a QDQ graph runs in ONNX Runtime under auto on CPUs without AMX (OpenVINO int8: an NNCF IR)"
    try:
        import onnxruntime
    except ImportError:
        return None
    from emorph_deploy.runners.onnxruntime import PREFERRED_PROVIDERS

    available = onnxruntime.get_available_providers()
    gpu = [p for p in PREFERRED_PROVIDERS if p in available and p != "CPUExecutionProvider"]
    return f"onnxruntime has a GPU provider ({', '.join(gpu)})" if gpu else None


def _recorded_precision(onnx: str | Path) -> str | None:
    try:
        return json.loads(Path(onnx).with_suffix(".json").read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None


def load_runner(artifact: str | Path, backend: str = "auto", **kwargs: Any) -> Runner:
    """Create the runner for ``artifact`` (``backend`` "auto"|"torch"|"onnxruntime"|"tensorrt"|"openvino").

    ONNX Runtime and OpenVINO runners get :func:`default_threads` unless ``threads`` is passed. Also makes
    the process keep freed memory for reuse (:func:`emorph_deploy.runtime.keep_freed_memory`;
    ``EMORPH_MALLOC=system`` opts out): large per-layer tensors are then not page-faulted in afresh.
    """
    from emorph_deploy.runtime import keep_freed_memory

    keep_freed_memory()
    name = backend_for(artifact, backend)
    if name in THREADED_BACKENDS and default_threads() is not None:
        kwargs.setdefault("threads", default_threads())
    return runner_class(name)(artifact, **kwargs)


def resolve(artifact: str | Path, backend: str = "auto", notes: list[str] | None = None) -> Runner:
    """The runner that registers with ``artifact`` on ``backend`` ("auto" | "tensorrt" | "openvino" |
    "onnxruntime" | "torch").

    An explicit backend needs its own kind of artifact (InputError naming the option to pass otherwise).
    ``"auto"`` tries TensorRT, then OpenVINO on the CPU (unless :func:`openvino_auto_skip` says why not),
    then ONNX Runtime (GPU providers first, then CPU), then torch, each with the given artifact or a sibling
    of the same stem (``model.plan`` / ``model.xml`` / ``model.onnx`` / ``model.json``), and falls through
    when a backend is not installed or cannot run here (e.g. no GPU for an engine, no VNNI for an int8 graph
    in OpenVINO); what was skipped and why is appended to ``notes``. A broken artifact the caller named is
    reported, not skipped (OpenVINO, tried before ONNX Runtime on the same file, only notes it). The packaged
    default checkpoint runs as an OpenVINO bf16 IR where :func:`emorph_deploy.weights.packaged_ir_skip`
    allows (built once into a cache, :func:`emorph_deploy.weights.default_openvino_ir`), else as above.
    """
    path = Path(artifact)
    notes = [] if notes is None else notes
    if backend != "auto":
        if backend not in AUTO_ORDER:
            raise InputError(
                f"backend: expected one of auto, {', '.join(AUTO_ORDER)}, got {backend!r}; "
                "fix: pass --backend auto"
            )
        if artifact_for(path, backend) != path:
            raise InputError(
                f"backend: expected a {backend} artifact for --backend {backend}, got {path.name}; "
                f"fix: pass {_ARTIFACT_KINDS[backend]} or --backend auto"
            )
        return load_runner(path, backend=backend)
    packaged = _packaged_openvino(path, notes)
    if packaged is not None:
        return packaged
    last: Exception | None = None
    for name in AUTO_ORDER:
        cand = artifact_for(path, name)
        if cand is None:
            continue
        skip = openvino_auto_skip(cand) if name == "openvino" else None
        if skip is not None:
            notes.append(f"openvino skipped: {skip}")
            continue
        try:
            kwargs = {"providers": "auto"} if name == "onnxruntime" else {}
            runner = load_runner(cand, backend=name, **kwargs)
        except (EmorphError, ImportError, RuntimeError, OSError) as exc:
            fallback = name in ("tensorrt", "openvino")
            if cand == path and not isinstance(exc, ImportError | RuntimeError) and not fallback:
                raise  # the artifact the user named is broken: say so, do not hide it behind a fallback
            notes.append(f"{name} skipped: {_one_line(exc)}")
            last = exc
            continue
        if runner.providers:
            notes.append(f"onnxruntime providers: {', '.join(runner.providers)}")
        return runner
    if last is not None:
        raise last
    raise InputError(
        f"model: expected a checkpoint (.json/.safetensors), .onnx, .plan/.engine or .xml, got {path.name}; "
        "fix: pass --model, --onnx or --engine"
    )


def _packaged_openvino(path: Path, notes: list[str]) -> Runner | None:
    """``auto`` on the packaged checkpoint: its OpenVINO bf16 IR's runner, or None (why, in ``notes``)."""
    from emorph_deploy import weights

    if not weights.is_default_checkpoint(path):
        return None
    skip = weights.packaged_ir_skip()
    if skip is not None:
        notes.append(f"openvino skipped: {skip}")
        return None
    try:
        ir = weights.default_openvino_ir("bf16", say=lambda line: notes.append(line))
        return load_runner(ir, backend="openvino")
    except (EmorphError, ImportError, RuntimeError, OSError) as exc:
        notes.append(f"openvino skipped: {_one_line(exc)}; the packaged model runs in torch")
        return None


def _one_line(exc: BaseException, n: int = 160) -> str:
    s = " ".join(str(exc).split()) or type(exc).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


def __getattr__(name: str) -> Any:  # lazy: ``from emorph_deploy.runners import TorchRunner``
    if name in _CLASS_TO_BACKEND:
        return runner_class(_CLASS_TO_BACKEND[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARTIFACT_SUFFIXES",
    "AUTO_ORDER",
    "BACKENDS",
    "OnnxRuntimeRunner",
    "OpenVinoRunner",
    "Runner",
    "TensorRTRunner",
    "TorchRunner",
    "artifact_for",
    "backend_for",
    "check_backend",
    "default_threads",
    "is_artifact_of",
    "load_runner",
    "openvino_auto_skip",
    "resolve",
    "runner_class",
    "set_default_threads",
]
