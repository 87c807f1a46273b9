"""Mixed-precision (FP16) ONNX for strongly typed TensorRT (TensorRT 11, TensorRT-RTX) and FP16-flag builds
(10.x).

Compute runs in FP16; LayerNormalization, Softmax (overflow after attention: NVIDIA TensorRT issues #2564,
#3692), the flow head and the whole warp (coordinates lose ~0.1 voxel in FP16 at width 224) stay FP32; graph
inputs and outputs stay FP32. The conversion is NVIDIA Model Optimizer's AutoCast (``modelopt.onnx.autocast``)
with those nodes excluded. onnxconverter-common's ``float16`` converter is not used: it breaks graphs where an
output (``flow``) is also consumed inside the graph (the warp), which both ONNX Runtime and TensorRT reject.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emorph_deploy.engines.graph import find_regions, named_copy
from emorph_deploy.errors import MissingDependencyError, ProcessingError

#: op types kept in FP32 everywhere in the network
DEFAULT_FP32_OPS: tuple[str, ...] = ("LayerNormalization", "Softmax")


@dataclass(frozen=True)
class Fp16Options:
    fp32_ops: tuple[str, ...] = DEFAULT_FP32_OPS
    keep_flow_head_fp32: bool = True
    keep_warp_fp32: bool = True
    extra_fp32_nodes: tuple[str, ...] = field(default_factory=tuple)  # regexes on node names

    def to_dict(self) -> dict[str, Any]:
        return {
            "fp32_ops": list(self.fp32_ops),
            "keep_flow_head_fp32": self.keep_flow_head_fp32,
            "keep_warp_fp32": self.keep_warp_fp32,
            "extra_fp32_nodes": list(self.extra_fp32_nodes),
        }


def fp32_node_names(model: Any, options: Fp16Options = Fp16Options()) -> set[str]:
    """Names of the nodes that must stay FP32 (model must be named, see :func:`name_nodes`)."""
    regions = find_regions(model)
    keep = {n for n, t in regions.op_types.items() if t in options.fp32_ops}
    if options.keep_flow_head_fp32:
        keep |= regions.flow_head
    if options.keep_warp_fp32:
        keep |= regions.warp
    for pat in options.extra_fp32_nodes:
        rx = re.compile(pat)
        keep |= {n for n in regions.op_types if rx.search(n)}
    return keep


def fp32_nodes_and_tensors(model: Any, options: Fp16Options = Fp16Options()) -> tuple[set[str], set[str]]:
    """(names of the nodes that must stay FP32, their output tensors), from a named copy of ``model`` (the
    caller's model is not modified): what an FP16-flag build pins to FP32 layer by layer."""
    named = named_copy(model)
    keep = fp32_node_names(named, options)
    return keep, {o for n in named.graph.node if n.name in keep for o in n.output}


def _require_autocast() -> Any:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise MissingDependencyError(
            f"FP16 conversion needs NVIDIA Model Optimizer's AutoCast: expected modelopt.onnx.autocast, got "
            f"ImportError ({str(exc).splitlines()[0]}); fix: pip install nvidia-modelopt onnx-graphsurgeon "
            "lief"
        ) from exc
    return convert_to_mixed_precision


def convert_fp16(
    src_onnx: str | os.PathLike | Any, options: Fp16Options = Fp16Options()
) -> tuple[Any, dict[str, Any]]:
    """FP32 ONNX (a path or a loaded ModelProto, not modified) -> mixed FP16/FP32 ONNX ModelProto (I/O FP32)
    plus a summary dict for the manifest."""
    import onnx

    convert = _require_autocast()
    model = named_copy(src_onnx)
    keep = fp32_node_names(model, options)
    with tempfile.TemporaryDirectory(prefix="emorph-fp16-") as tmp:
        named = Path(tmp) / "named.onnx"
        onnx.save(model, str(named))
        _quiet_modelopt()
        try:
            out = convert(
                str(named),
                low_precision_type="fp16",
                keep_io_types=True,
                nodes_to_exclude=[f"^{re.escape(n)}$" for n in sorted(keep)],
                op_types_to_exclude=list(options.fp32_ops),
                providers=["cpu"],
            )
        except Exception as exc:  # AutoCast reports problems as assorted exceptions
            raise ProcessingError(
                f"FP16 conversion of {src_onnx} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; fix: check the ONNX with "
                "'emorph check' or build --precision fp32"
            ) from exc
    summary = fp16_summary(out, keep)
    summary["options"] = options.to_dict()
    summary["converter"] = _converter_version()
    return out, summary


def _quiet_modelopt() -> None:
    """Model Optimizer logs every node at INFO on its own handler: keep errors only."""
    try:
        from modelopt.onnx.logging_config import configure_logging

        configure_logging(level=logging.ERROR)
    except Exception:  # pragma: no cover - older/newer layouts
        logging.getLogger("modelopt.onnx").setLevel(logging.ERROR)


def _converter_version() -> str:
    try:
        import modelopt

        return f"nvidia-modelopt {modelopt.__version__} autocast"
    except Exception:  # pragma: no cover
        return "nvidia-modelopt autocast"


def node_precisions(model: Any) -> dict[str, str]:
    """Per compute node, 'fp16' or 'fp32' from the element type of its first float output."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    }
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    out: dict[str, str] = {}
    for node in inferred.graph.node:
        if node.op_type in ("Cast", "Constant", "Shape"):
            continue
        for o in node.output:
            t = types.get(o)
            if t in (f16, f32):
                out[node.name] = "fp16" if t == f16 else "fp32"
                break
    return out


def fp16_summary(model: Any, kept: set[str]) -> dict[str, Any]:
    prec = node_precisions(model)
    by_op: dict[str, Counter] = {}
    for name, p in prec.items():
        op = next((n.op_type for n in model.graph.node if n.name == name), "?")
        by_op.setdefault(op, Counter())[p] += 1
    leaked = sorted(n for n in kept if prec.get(n) == "fp16")
    if leaked:
        raise ProcessingError(
            f"FP16 conversion: expected {len(kept)} nodes kept FP32, got {len(leaked)} in FP16 "
            f"(e.g. {leaked[:3]}); fix: report this with the ONNX file"
        )
    return {
        "fp32_nodes": len(kept),
        "by_op": {k: dict(v) for k, v in sorted(by_op.items())},
        "compute_fp16": sum(1 for p in prec.values() if p == "fp16"),
    }
