"""INT8 explicit quantization for TensorRT: ``emorph calibrate`` (pairs -> QDQ ONNX under ``calibration/``).

Public API: :func:`calibrate`, :class:`QuantizeOptions`, :func:`quantize_qdq`, :func:`inspect_qdq`,
:class:`CalibrationSet`, :func:`read_pair_csv`.
"""

from __future__ import annotations

from emorph_deploy.calibration.calibrate import CalibrationResult, calibrate, output_paths
from emorph_deploy.calibration.pairs import CalibrationSet, PairSource, make_reader, read_pair_csv
from emorph_deploy.calibration.quantize import (
    DEFAULT_OPS,
    METHODS,
    OP_TOKENS,
    QuantizeOptions,
    inspect_qdq,
    quantize_qdq,
    select_nodes,
)

__all__ = [
    "DEFAULT_OPS",
    "METHODS",
    "OP_TOKENS",
    "CalibrationResult",
    "CalibrationSet",
    "PairSource",
    "QuantizeOptions",
    "calibrate",
    "inspect_qdq",
    "make_reader",
    "output_paths",
    "quantize_qdq",
    "read_pair_csv",
    "select_nodes",
]
