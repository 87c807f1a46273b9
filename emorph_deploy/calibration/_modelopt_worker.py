"""Run NVIDIA Model Optimizer's INT8 quantization in a child process.

Model Optimizer patches ONNX Runtime's quantization classes process-wide; running it here keeps later
``quantize_static`` calls in the parent (the default quantizer) unaffected.
Usage: ``python -m emorph_deploy.calibration._modelopt_worker SRC OUT FEEDS.npz ARGS.json``.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(src: str, out: str, feeds_path: str, args_path: str) -> None:
    from pathlib import Path

    from onnxruntime.quantization import CalibrationDataReader

    from emorph_deploy.engines.fp16 import _quiet_modelopt

    args = json.loads(Path(args_path).read_text())
    data = np.load(feeds_path)
    n = int(data["__n__"])
    feeds = [{k: data[f"{k}__{i}"] for k in args["inputs"]} for i in range(n)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= len(feeds):
                return None
            self.i += 1
            return feeds[self.i - 1]

        def get_first(self):
            return feeds[0]

        def rewind(self) -> None:
            self.i = 0

    from modelopt.onnx.quantization import quantize

    _quiet_modelopt()
    quantize(
        src,
        quantize_mode="int8",
        calibration_data_reader=Reader(),
        calibration_method=args["method"],
        calibration_eps=["cpu"],
        op_types_to_quantize=args["ops"],
        nodes_to_quantize=args["nodes"],
        nodes_to_exclude=[],
        high_precision_dtype="fp32",
        output_path=out,
        log_level="ERROR",
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
