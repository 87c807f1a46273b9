"""Which TensorRT is installed: one entry point for full TensorRT (``tensorrt``) and TensorRT-RTX
(``tensorrt_rtx``).

``load_tensorrt("auto")`` picks ``tensorrt`` when importable (datacenter GPUs, Jetson) else ``tensorrt_rtx``
(RTX workstations; builds engines ahead of time without a GPU). Everything else in
:mod:`emorph_deploy.engines` talks to the returned module through the API both share, guarding
version-specific members with ``hasattr``.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from emorph_deploy.choices import Flavour
from emorph_deploy.errors import InputError, MissingDependencyError
from emorph_deploy.export.trt_ops import gridsample_5d_supported, parse_version

#: flavour -> Python module
MODULES: dict[str, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT: dict[str, str] = {
    "tensorrt": "install NVIDIA TensorRT for your CUDA (JetPack on Jetson; 'pip install tensorrt-cu12' "
    "elsewhere)",
    "tensorrt-rtx": "pip install 'emorph-deploy[tensorrt]' (tensorrt-rtx)",
}


@dataclass(frozen=True)
class TensorRT:
    """A loaded TensorRT flavour: the module and what it is."""

    module: Any
    flavour: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return parse_version(self.version)

    @property
    def tag(self) -> str:
        """Flavour + version for file names: 'tensorrt10.3.0.26', 'tensorrt-rtx1.7.1.116'."""
        return f"{self.flavour}{self.version}"

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def strongly_typed_only(self) -> bool:
        """TensorRT-RTX and TensorRT >= 11 removed BuilderFlag.FP16/INT8: networks are strongly typed."""
        return self.is_rtx or self.version_tuple[:1] >= (11,) or not hasattr(self.module.BuilderFlag, "FP16")

    @property
    def supports_grid_sample_5d(self) -> bool:
        # TensorRT-RTX 1.7's parser and builder accept a rank-5 GridSample (checked CPU-only, AOT).
        return self.is_rtx or gridsample_5d_supported(self.version)

    def describe(self) -> dict[str, str]:
        return {"flavour": self.flavour, "module": self.module.__name__, "version": self.version}


def _import(flavour: str) -> Any:
    return importlib.import_module(MODULES[flavour])


def load_tensorrt(flavour: str | Flavour = "auto") -> TensorRT:
    """Import the requested TensorRT flavour; :class:`MissingDependencyError` (exit 2) when absent."""
    flavour = Flavour(flavour).value if not isinstance(flavour, Flavour) else flavour.value
    if flavour not in ("auto", *MODULES):
        raise InputError(
            f"--flavour: expected auto|tensorrt|tensorrt-rtx, got {flavour!r}; fix: pick one of those"
        )
    candidates = list(MODULES) if flavour == "auto" else [flavour]
    errors: list[str] = []
    for name in candidates:
        try:
            mod = _import(name)
        except ImportError as exc:  # includes a tensorrt stub wheel whose libraries were never downloaded
            errors.append(f"{MODULES[name]}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            continue
        return TensorRT(module=mod, flavour=name, version=str(getattr(mod, "__version__", "unknown")))
    hint = "; or ".join(INSTALL_HINT[c] for c in candidates)
    raise MissingDependencyError(
        f"TensorRT is not installed: expected {' or '.join(MODULES[c] for c in candidates)}, got "
        f"ImportError ({'; '.join(errors)}); fix: {hint}"
    )


def make_logger(module: Any, verbose: bool = False) -> Any:
    """A TensorRT ILogger for ``module`` (``tensorrt`` or ``tensorrt_rtx``) that keeps every message; the
    builder and the runner report its errors in their one-line failures."""

    class _Logger(module.ILogger):
        def __init__(self) -> None:
            module.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.messages.append((severity, msg))
            if verbose or severity in (module.ILogger.INTERNAL_ERROR,):
                print(f"[{str(severity).rsplit('.', 1)[-1]}] {msg}")

        def errors(self) -> list[str]:
            bad = (module.ILogger.ERROR, module.ILogger.INTERNAL_ERROR)
            return [m for s, m in self.messages if s in bad]

    return _Logger()


# ---------------------------------------------------------------------------------------------- GPU
@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.9"

    @property
    def slug(self) -> str:
        s = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        s = re.sub(r"^nvidia-", "", s)
        return f"{s}-sm{self.compute_capability.replace('.', '')}"


def detect_gpu() -> GpuInfo | None:
    """The first CUDA GPU (name, compute capability) or None. Tries torch, pycuda, then nvidia-smi; never
    raises."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return GpuInfo(torch.cuda.get_device_name(0), f"{major}.{minor}")
    except Exception:  # pragma: no cover - depends on the machine
        pass
    try:  # pragma: no cover - needs a GPU
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() > 0:
            dev = cuda.Device(0)
            major, minor = dev.compute_capability()
            return GpuInfo(dev.name(), f"{major}.{minor}")
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:  # pragma: no cover - needs a GPU
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            line = out.strip().splitlines()[0]
            name, cc = (s.strip() for s in line.rsplit(",", 1))
            return GpuInfo(name, cc)
        except Exception:
            pass
    return None
