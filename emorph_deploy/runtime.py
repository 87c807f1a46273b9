"""Process-level runtime facts and settings for fast CPU work: the CPU's features and the glibc allocator.

:func:`cpu_flags` reads the CPU's feature flags at run time (the machine may change between runs: never
assume the last one); :func:`cpu_has_native_bf16` says whether bf16 arithmetic is native (AVX512-BF16 or AMX),
which decides reduced precision (``emorph train --amp auto``); :func:`cpu_has_int8_dot` whether int8 dot
products accumulate in int32 without saturating (VNNI or AMX); :func:`missing_cpu_features` names what a
precision lacks on this CPU.

Inference on 3D volumes allocates and frees tensors of 50–500 MB per layer. glibc serves every allocation
above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it to the kernel on ``free``, so
each layer's output is page-faulted in and zeroed by the kernel again, a large share of a full-resolution
forward's time (figures in ``benchmarks/results/profile_notes.md``).

:func:`keep_freed_memory` tells glibc to serve large blocks from the heap (``M_MMAP_MAX = 0``) and never to
trim it (``M_TRIM_THRESHOLD`` = max), so freed blocks are reused by the next layer. The cost: the process
keeps its peak heap after a forward (RSS stays at the high-water mark instead of dropping; peak RSS itself
grows through fragmentation; see ``benchmarks/results/memory.md``).

The CLI and :func:`emorph_deploy.runners.load_runner` call it (so every ``emorph`` command and the
:class:`~emorph_deploy.registration.Registrar` get it); set ``EMORPH_MALLOC=system`` to keep glibc's
defaults. It is a no-op (returns False) on non-glibc platforms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

__all__ = [
    "PRECISION_CPU_FEATURES",
    "allocator_state",
    "cpu_flags",
    "cpu_has_int8_dot",
    "cpu_has_native_bf16",
    "cpu_model",
    "keep_freed_memory",
    "missing_cpu_features",
]


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of this CPU (``flags`` in /proc/cpuinfo); empty where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``model name`` in /proc/cpuinfo), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Reduced precision → the CPU flags of which one must be present for it to run natively (any of them).
#: int8 without VNNI/AMX goes through 16-bit intermediate sums that saturate (``vpmaddubsw``).
PRECISION_CPU_FEATURES: dict[str, frozenset[str]] = {
    "bf16": frozenset({"avx512_bf16", "amx_bf16"}),
    "int8": frozenset({"avx512_vnni", "avx_vnni", "amx_int8"}),
}


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 dot products natively (AVX512-BF16 or AMX-BF16)."""
    return bool(cpu_flags() & PRECISION_CPU_FEATURES["bf16"])


def cpu_has_int8_dot() -> bool:
    """True when this CPU has int8 dot products accumulating in int32 (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool(cpu_flags() & PRECISION_CPU_FEATURES["int8"])


def missing_cpu_features(precision: str) -> frozenset[str]:
    """The flags of which ``precision`` needs one, when this CPU has none of them; empty when it can run
    (and for precisions without a requirement, e.g. fp32)."""
    wanted = PRECISION_CPU_FEATURES.get(str(precision), frozenset())
    return frozenset() if not wanted or cpu_flags() & wanted else wanted


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_state = {"applied": False, "reason": "not requested"}


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - exotic loader setups
        return None


def keep_freed_memory(force: bool = False) -> bool:
    """Reuse freed memory instead of returning it to the kernel (glibc only); idempotent.

    Honours ``EMORPH_MALLOC=system`` (do nothing) unless ``force``. Returns whether the setting is active.
    """
    if _state["applied"]:
        return True
    if not force and os.environ.get("EMORPH_MALLOC", "").strip().lower() in ("system", "default", "0", "off"):
        _state["reason"] = "EMORPH_MALLOC=system"
        return False
    libc = _glibc()
    if libc is None:
        _state["reason"] = f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
        return False
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    _state.update(
        applied=ok,
        reason="glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=max)"
        if ok
        else "glibc mallopt refused the setting",
    )
    return ok


def allocator_state() -> dict[str, object]:
    """``{"applied": bool, "reason": str}`` — recorded in benchmark JSON."""
    return dict(_state)
