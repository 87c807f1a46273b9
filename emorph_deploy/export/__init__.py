"""Checkpoint → ONNX export (gather or native 3D grid sample), its manifest and the TensorRT op-set check;
ONNX graphs read back for build and calibration (:mod:`emorph_deploy.export.onnx_io`).

Heavy imports (torch, onnx, onnxslim) happen inside the functions, so importing this package is cheap.
"""

from __future__ import annotations

from emorph_deploy.export.loaders import (
    DEFAULT_OPSET,
    GRID_SAMPLE_MODES,
    TARGETS,
    ExportWrapper,
    check_onnx,
    default_export_name,
    export_paths,
    infer_shapes,
    load_model_from_checkpoint,
    load_onnx_checked,
    onnx_from_checkpoint,
    op_types,
    set_sampler,
    simplify_onnx,
    torch_to_onnx,
)
from emorph_deploy.export.manifest import MANIFEST_FORMAT, manifest_path_for, read_manifest
from emorph_deploy.export.onnx_io import (
    derived_onnx_manifest,
    graph_precision,
    io_spec,
    load_onnx,
    load_onnx_hashed,
    read_onnx_manifest,
)
from emorph_deploy.export.trt_ops import check_tensorrt_ops, supported_ops, tensorrt_op_report

__all__ = [
    "DEFAULT_OPSET",
    "GRID_SAMPLE_MODES",
    "MANIFEST_FORMAT",
    "TARGETS",
    "ExportWrapper",
    "check_onnx",
    "check_tensorrt_ops",
    "default_export_name",
    "derived_onnx_manifest",
    "export_paths",
    "graph_precision",
    "infer_shapes",
    "io_spec",
    "load_model_from_checkpoint",
    "load_onnx",
    "load_onnx_checked",
    "load_onnx_hashed",
    "manifest_path_for",
    "onnx_from_checkpoint",
    "op_types",
    "read_manifest",
    "read_onnx_manifest",
    "set_sampler",
    "simplify_onnx",
    "supported_ops",
    "tensorrt_op_report",
    "torch_to_onnx",
]
