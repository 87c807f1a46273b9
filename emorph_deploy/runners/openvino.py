"""OpenVINO runner (CPU): an exported ``.onnx`` + manifest, or an IR ``.xml`` from ``emorph build --target
openvino`` + its manifest.

Precision ``fp32 | bf16 | int8``, default the artifact's recorded one. fp32 and bf16 run the same float graph
with OpenVINO's ``INFERENCE_PRECISION_HINT`` set explicitly (on CPUs with AMX OpenVINO's own default is
bf16, so fp32 must be asked for); int8 runs an int8 graph: a QDQ graph from ``emorph calibrate`` or an IR
quantised by NNCF. bf16 and int8 run only where the CPU computes them natively
(:data:`emorph_deploy.runtime.PRECISION_CPU_FEATURES`, read at run time); elsewhere a one-line error names
the missing CPU flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.errors import ConfigMismatchError, InputError, ProcessingError, require
from emorph_deploy.runners.base import Runner

#: precision → OpenVINO ``INFERENCE_PRECISION_HINT`` (int8 graphs keep their non-quantised ops in f32)
INFERENCE_HINTS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32", "fp16": "f32"}
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def runnable_precision(requested: str | None, graph_precision: str, artifact: Path) -> str:
    """The precision to run: ``requested`` (or the graph's) if this graph supports it here, else a one-line
    error. A float graph runs as fp32 or bf16, an int8 graph as int8, an fp16 graph as recorded."""
    from emorph_deploy.runtime import cpu_model, missing_cpu_features

    precision = str(requested or graph_precision)
    if precision not in (*PRECISIONS, "fp16") or (requested and precision not in PRECISIONS):
        raise InputError(
            f"openvino precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}; "
            "fix: pass --precision fp32, bf16 or int8"
        )
    if (precision == "int8") != (graph_precision == "int8") or (
        graph_precision == "fp16" and precision != "fp16"
    ):
        fix = (
            "pass the QDQ graph from 'emorph calibrate' or an int8 IR from 'emorph build --target openvino "
            "--precision int8'"
            if precision == "int8"
            else "pass the fp32 export (or drop --precision)"
        )
        raise ConfigMismatchError(
            f"openvino {precision}: expected a graph that can run at {precision}, got a {graph_precision} "
            f"graph {artifact.name}; fix: {fix}"
        )
    missing = missing_cpu_features(precision)
    if missing:
        raise ConfigMismatchError(
            f"openvino {precision}: expected a CPU with {' or '.join(sorted(missing))}, got {cpu_model()} "
            "without them; fix: run the fp32 export or IR (emorph check: --precision fp32), or use a CPU "
            "that has them"
        )
    return precision


def compile_config(precision: str, threads: int | None) -> dict[str, Any]:
    """The CPU plugin properties for ``precision``: explicit inference precision, latency hint, threads."""
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": INFERENCE_HINTS[precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads is not None:
        if int(threads) < 0:
            raise InputError(f"threads must be >= 0 (0 = OpenVINO's default), got {threads}")
        if int(threads) > 0:
            config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


class OpenVinoRunner(Runner):
    """Run an exported ONNX graph or an OpenVINO IR on the CPU with OpenVINO.

    ``precision``: ``None`` = the artifact's; ``"fp32"``, ``"bf16"`` (float graphs) or ``"int8"`` (int8
    graphs). ``threads``: inference threads (``None``/0 = OpenVINO's default). ``verify``: ONNX checker and
    sha256 against the manifest (ONNX), or the IR manifest's hashes, OpenVINO version and source graph (IR).
    """

    name = "openvino"

    def __init__(
        self,
        artifact: str | Path,
        manifest: str | Path | None = None,
        precision: str | None = None,
        threads: int | None = None,
        verify: bool = True,
    ) -> None:
        super().__init__()
        ov = require("openvino", "cpu")
        self.artifact = Path(artifact)
        if self.artifact.suffix.lower() == ".xml":
            from emorph_deploy.engines.openvino import check_ir

            meta = check_ir(self.artifact, manifest, ov.__version__, verify=verify)
            self._grid_shape = tuple(int(s) for s in meta["grid_shape"])  # type: ignore[assignment]
            self._output_names = tuple(o["name"] for o in meta["outputs"])
            graph_precision = "int8" if meta["precision"] == "int8" else "fp32"
        else:
            from emorph_deploy.runners.onnxruntime import read_checked_manifest

            meta, self._grid_shape, self._output_names = read_checked_manifest(
                self.artifact, manifest, verify
            )
            graph_precision = str(meta.get("precision", "fp32"))
        wanted = precision if precision is not None else meta.get("precision")
        self._precision = runnable_precision(wanted, graph_precision, self.artifact)
        if self.artifact.suffix.lower() != ".xml" and self._precision == "bf16":
            from emorph_deploy.engines.openvino import check_bf16_warp

            check_bf16_warp(meta, self.artifact)  # an IR was checked when it was built
        config = compile_config(self._precision, threads)
        core = ov.Core()
        try:
            self._compiled = core.compile_model(core.read_model(str(self.artifact)), "CPU", config)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"openvino cannot compile {self.artifact}: {first}; fix: re-run 'emorph export' "
                "(or --backend onnxruntime)"
            ) from exc
        self._request = self._compiled.create_infer_request()
        self._meta = dict(meta)
        self._meta.update(
            precision=self._precision,
            backend=f"openvino {ov.__version__} (CPU, {self._precision})",
            openvino_config={k: str(v) for k, v in config.items()},
        )

    @property
    def precision(self) -> str:
        return self._precision

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._request.infer(feed)
        except Exception as exc:
            raise ProcessingError(f"openvino inference failed: {str(exc).splitlines()[0]}") from exc
        # the request's output tensors are reused by the next call: copy
        return {n: np.array(results[self._compiled.output(n)], copy=True) for n in self._output_names}

    def close(self) -> None:
        self._request = None
        self._compiled = None
