"""TensorRT engines: ``emorph build`` (ONNX -> ``engines/<name>-<precision>-<gpu|aot>-<trt>.plan`` +
manifest).

Public API: :class:`BuildOptions`, :func:`build_engine`, :func:`load_tensorrt`, :func:`convert_fp16`,
:func:`read_engine_manifest`, :func:`check_compatible`. TensorRT / onnx / modelopt are imported lazily.
"""

from __future__ import annotations

from emorph_deploy.engines.builder import PRECISIONS, BuildOptions, BuildResult, build_engine
from emorph_deploy.engines.manifest import (
    AOT_GPU,
    ENGINE_FORMAT,
    check_compatible,
    read_engine_manifest,
    rebuild_command,
)
from emorph_deploy.engines.trt import Flavour, GpuInfo, TensorRT, detect_gpu, load_tensorrt


def convert_fp16(*args, **kwargs):
    from emorph_deploy.engines.fp16 import convert_fp16 as _c

    return _c(*args, **kwargs)


__all__ = [
    "AOT_GPU",
    "ENGINE_FORMAT",
    "PRECISIONS",
    "BuildOptions",
    "BuildResult",
    "Flavour",
    "GpuInfo",
    "TensorRT",
    "build_engine",
    "check_compatible",
    "convert_fp16",
    "detect_gpu",
    "load_tensorrt",
    "read_engine_manifest",
    "rebuild_command",
]
