"""INT8 explicit quantization (QDQ ONNX) in the form TensorRT accepts.

* signed int8, symmetric (zero point 0) activations and weights; weights per output channel;
* biases not quantized; Q/DQ only on the inputs of the selected op types (default Conv, MatMul, Gemm);
* the warp (everything not needed for ``flow``: coordinate arithmetic, sampling of ``moving``) and the input
  convs (first conv and the skip conv on the pooled input) stay unquantized, so the moving image reaches the
  warp unquantized; every Q/DQ pair is dedicated to its consumer, so no other op sees a rounded tensor.

Op-set tokens: ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul`` (all MatMuls, including attention's
activation x activation products) and ``LinearMatMul`` (only MatMuls with a constant weight, i.e. nn.Linear).

Quantizers: ONNX Runtime's ``quantize_static`` configured as above (always available) or NVIDIA Model
Optimizer's ``modelopt.onnx.quantization.quantize`` on CPU (it drives the same ORT calibrator with
TensorRT-guided options).
"""

from __future__ import annotations

import logging
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emorph_deploy.engines.graph import find_regions, is_linear_matmul, named_copy
from emorph_deploy.errors import InputError, MissingDependencyError, ProcessingError

METHODS = ("minmax", "entropy", "percentile")
QUANTIZERS = ("auto", "onnxruntime", "modelopt")
OP_TOKENS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LinearMatMul")
DEFAULT_OPS: tuple[str, ...] = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QuantizeOptions:
    """All ``emorph calibrate`` quantization defaults live here."""

    method: str = "minmax"
    op_types: tuple[str, ...] = DEFAULT_OPS
    quantizer: str = "onnxruntime"
    percentile: float = 99.999
    exclude_input_convs: bool = True
    exclude_flow_head: bool = False
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)  # regexes on node names

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"--method: expected one of {METHODS}, got {self.method!r}; fix: pick one")
        if self.quantizer not in QUANTIZERS:
            raise InputError(
                f"--quantizer: expected one of {QUANTIZERS}, got {self.quantizer!r}; fix: pick one"
            )
        bad = [t for t in self.op_types if t not in OP_TOKENS]
        if bad or not self.op_types:
            raise InputError(
                f"--ops: expected a comma list of {OP_TOKENS}, got {list(self.op_types)}; fix: e.g. "
                "--ops Conv,MatMul,Gemm"
            )
        if not 90.0 < self.percentile <= 100.0:
            raise InputError(f"--percentile: expected 90 < p <= 100, got {self.percentile}; fix: e.g. 99.999")
        for pat in self.exclude_nodes:
            try:
                re.compile(pat)
            except re.error as exc:
                raise InputError(
                    f"--exclude: expected a regular expression, got {pat!r} ({exc}); fix: quote it"
                ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "op_types": list(self.op_types),
            "quantizer": self.quantizer,
            "percentile": self.percentile if self.method == "percentile" else None,
            "exclude_input_convs": self.exclude_input_convs,
            "exclude_flow_head": self.exclude_flow_head,
            "exclude_nodes": list(self.exclude_nodes),
        }


def select_nodes(model: Any, options: QuantizeOptions) -> tuple[list[str], dict[str, list[str]]]:
    """(nodes to quantize, {reason: excluded nodes}) for a named model."""
    regions = find_regions(model)
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    consts = {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    wanted: list[str] = []
    for node in graph.node:
        op = node.op_type
        if op == "MatMul":
            linear = is_linear_matmul(node, inits, consts)
            if "MatMul" in options.op_types or ("LinearMatMul" in options.op_types and linear):
                wanted.append(node.name)
        elif op in options.op_types:
            wanted.append(node.name)
    excluded: dict[str, list[str]] = {"warp": [], "input_convs": [], "flow_head": [], "user": []}
    rx = [re.compile(p) for p in options.exclude_nodes]
    keep: list[str] = []
    for n in wanted:
        if n in regions.warp:
            excluded["warp"].append(n)
        elif options.exclude_input_convs and n in regions.input_convs:
            excluded["input_convs"].append(n)
        elif options.exclude_flow_head and n in regions.flow_head:
            excluded["flow_head"].append(n)
        elif any(r.search(n) for r in rx):
            excluded["user"].append(n)
        else:
            keep.append(n)
    return keep, excluded


def _ort_options(options: QuantizeOptions) -> dict[str, Any]:
    extra = {
        "ActivationSymmetric": True,  # zero point 0
        "WeightSymmetric": True,
        "QuantizeBias": False,  # TensorRT rejects INT32 bias DQ
        "DedicatedQDQPair": True,  # a Q/DQ pair per consumer: other consumers see the FP32 tensor
        "CalibTensorRangeSymmetric": True,
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": 0},  # per output channel
    }
    if options.method == "percentile":
        extra["CalibPercentile"] = float(options.percentile)
    return extra


def quantize_qdq(
    source: str | Path | Any,
    reader: Any,
    options: QuantizeOptions = QuantizeOptions(),
    *,
    label: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Calibrate with ``reader`` and return (QDQ ModelProto, report dict). Nothing is written by this
    function.

    ``source``: an ONNX path or an already loaded ``onnx.ModelProto`` (copied, never modified; external data
    must already be loaded into it). ``label`` names the graph in messages (default: the path).
    """
    import onnx

    label = label or ("the ONNX graph" if isinstance(source, onnx.ModelProto) else str(source))
    model = named_copy(source)
    nodes, excluded = select_nodes(model, options)
    if not nodes:
        raise InputError(
            f"quantization of {label}: expected nodes of op types {list(options.op_types)} to "
            "quantize, got none after exclusions; fix: widen --ops or relax --exclude"
        )
    chosen = set(nodes)
    real_ops = sorted({n.op_type for n in model.graph.node if n.name in chosen})
    quantizer = options.quantizer
    if quantizer == "auto":
        quantizer = "modelopt" if _has_modelopt() else "onnxruntime"
    with tempfile.TemporaryDirectory(prefix="emorph-qdq-") as tmp:
        src = Path(tmp) / "named.onnx"
        out = Path(tmp) / "qdq.onnx"
        onnx.save(model, str(src))
        if quantizer == "onnxruntime":
            _quantize_ort(src, out, reader, nodes, real_ops, options)
        else:
            _quantize_modelopt(src, out, reader, nodes, real_ops, options)
        qdq = onnx.load(str(out))
    rewired = restrict_qdq(qdq, chosen)
    report = inspect_qdq(qdq, excluded_nodes=[n for v in excluded.values() for n in v])
    problems = report["problems"]
    if problems:
        raise ProcessingError(
            f"quantized graph is not in the form TensorRT accepts: {'; '.join(problems[:3])}; "
            "fix: use --quantizer onnxruntime or report this"
        )
    report.update(
        {
            "rewired_consumers": rewired,
            "quantizer": quantizer,
            "selected_nodes": nodes,
            "excluded": excluded,
            "options": options.to_dict(),
            "ort_op_types": real_ops,
        }
    )
    return qdq, report


def _quantize_ort(
    src: Path, out: Path, reader: Any, nodes: list[str], ops: list[str], options: QuantizeOptions
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.method]
    logging.getLogger("root").setLevel(logging.ERROR)
    try:
        quantize_static(
            str(src),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=method,
            extra_options=_ort_options(options),
        )
    except Exception as exc:
        raise ProcessingError(
            f"ONNX Runtime quantization failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; fix: check the calibration "
            "inputs match the graph"
        ) from exc


def _has_modelopt() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def _quantize_modelopt(
    src: Path, out: Path, reader: Any, nodes: list[str], ops: list[str], options: QuantizeOptions
) -> None:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"--quantizer modelopt: expected NVIDIA Model Optimizer, got ImportError "
            f"({str(exc).splitlines()[0]}); fix: pip install nvidia-modelopt onnx-graphsurgeon lief "
            "polygraphy (or --quantizer onnxruntime)"
        ) from exc
    if options.method == "percentile":
        raise InputError(
            "--quantizer modelopt: expected --method minmax or entropy, got percentile; fix: use "
            "--quantizer onnxruntime for percentile calibration"
        )
    import json
    import subprocess
    import sys

    feeds = []
    while (feed := reader.get_next()) is not None:  # ticks the progress bar
        feeds.append(feed)
    if not feeds:
        raise InputError(
            "calibration: expected at least one pair, got none; fix: --synthetic N or --pairs CSV"
        )
    tmp = out.parent
    arrays = {f"{k}__{i}": v for i, f in enumerate(feeds) for k, v in f.items()}
    np.savez(tmp / "feeds.npz", __n__=np.array(len(feeds)), **arrays)
    args = {
        "inputs": sorted(feeds[0]),
        "ops": list(ops),
        "nodes": [f"^{re.escape(n)}$" for n in nodes],
        "method": "max" if options.method == "minmax" else "entropy",
    }
    (tmp / "args.json").write_text(json.dumps(args))
    # Model Optimizer patches ONNX Runtime's quantizer process-wide: run it in a child process
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emorph_deploy.calibration._modelopt_worker",
            str(src),
            str(out),
            str(tmp / "feeds.npz"),
            str(tmp / "args.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        last = [ln for ln in (proc.stderr or "").splitlines() if ln.strip()][-1:] or ["no output"]
        raise ProcessingError(
            f"Model Optimizer quantization failed: {last[0][:200]}; fix: try --quantizer onnxruntime"
        )


def restrict_qdq(model: Any, quantized: set[str]) -> int:
    """Only the selected nodes may read a DequantizeLinear output of an activation.

    ONNX Runtime (and Model Optimizer through it) rewires *every* consumer of a quantized tensor to the DQ
    output, so residual Adds, shape ops or the warp would see the int8-rounded tensor. Point those consumers
    back at the FP32 tensor and drop Q/DQ nodes left without consumers. Returns the number of inputs rewired
    (in place).
    """
    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rewired = 0
    for node in graph.node:
        if node.name in quantized or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = prod.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue  # a weight DQ (constant int8): leave it
            node.input[k] = q.input[0]
            rewired += 1
    # graph outputs must be FP32 tensors, not Q/DQ-rounded ones (ORT quantizes a quantized node's graph
    # output)
    for out_name in outputs:
        dq = prod.get(out_name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = prod.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        fp32 = q.input[0]
        src = prod.get(fp32)
        if src is None:
            continue
        graph.node.remove(dq)
        graph.node.remove(q)
        for k, o in enumerate(src.output):
            if o == fp32:
                src.output[k] = out_name
        for node in graph.node:
            for k, i in enumerate(node.input):
                if i == fp32:
                    node.input[k] = out_name
        rewired += 1
    # drop dangling Q/DQ
    changed = True
    while changed:
        changed = False
        used = {i for n in graph.node for i in n.input} | outputs
        for node in list(graph.node):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not (set(node.output) & used):
                graph.node.remove(node)
                changed = True
    used = {i for n in graph.node for i in n.input}
    for init in list(graph.initializer):
        if init.name not in used and init.name not in outputs:
            graph.initializer.remove(init)
    return rewired


# ---------------------------------------------------------------------------------------------- inspection
def _constant_tensors(graph: Any) -> dict[str, Any]:
    """name → TensorProto of every initializer and ``Constant`` node value (initializers first); converted
    to numpy only when looked up (:func:`_const_value`)."""
    out = {t.name: t for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out.setdefault(n.output[0], a.t)
    return out


def _const_value(consts: dict[str, Any], name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    t = consts.get(name)
    return None if t is None else numpy_helper.to_array(t)


def inspect_qdq(model: Any, excluded_nodes: list[str] | None = None) -> dict[str, Any]:
    """Properties TensorRT needs, checked on a QDQ graph; ``problems`` lists every violation."""
    import onnx

    graph = model.graph
    prod = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name for t in graph.initializer}
    consts = _constant_tensors(graph)

    def is_constant(name: str) -> bool:  # an initializer or a Constant node's output (weights)
        return name in inits or (name in prod and prod[name].op_type == "Constant")

    problems: list[str] = []
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    activations: dict[str, float] = {}
    weights: dict[str, dict[str, Any]] = {}
    for n in q_nodes + dq_nodes:
        zp = _const_value(consts, n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            if n.op_type == "QuantizeLinear":
                problems.append(f"{n.name}: no zero point (output would be uint8)")
            continue
        if zp.dtype != np.int8:
            problems.append(f"{n.name}: zero point dtype {zp.dtype}, expected int8")
        if np.any(zp != 0):
            problems.append(f"{n.name}: non-zero zero point")
    for n in dq_nodes:
        src = n.input[0]
        scale = _const_value(consts, n.input[1])
        if is_constant(src):  # weight DQ
            w = _const_value(consts, src)
            consumer = consumers.get(n.output[0], [])
            roles = [(c.op_type, list(c.input).index(n.output[0])) for c in consumer]
            if any(idx == 2 for _, idx in roles):
                problems.append(f"{n.name}: a bias is quantized ({w.dtype if w is not None else '?'})")
            if w is not None and w.dtype != np.int8:
                problems.append(f"{n.name}: weight dtype {w.dtype}, expected int8")
            per_channel = scale is not None and scale.size > 1
            weights[src] = {
                "per_channel": per_channel,
                "channels": int(scale.size) if scale is not None else 0,
                "consumers": [c.name for c in consumer],
            }
            if not per_channel:
                problems.append(f"{n.name}: weight scale is per-tensor, expected per-channel")
    for n in q_nodes:
        src = n.input[0]
        scale = _const_value(consts, n.input[1])
        if is_constant(src):
            # FP32 weight + Q/DQ (Model Optimizer form) is fine when it feeds only compute-op weight inputs
            uses = [
                (c, list(c.input).index(d.output[0]))
                for d in consumers.get(n.output[0], [])
                if d.op_type == "DequantizeLinear"
                for c in consumers.get(d.output[0], [])
            ]
            if uses and all(
                c.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and k == 1 for c, k in uses
            ):
                per_channel = scale is not None and scale.size > 1
                weights[src] = {
                    "per_channel": per_channel,
                    "channels": int(scale.size) if scale is not None else 0,
                    "consumers": [c.name for c, _ in uses],
                    "stored": "fp32+QDQ",
                }
                if not per_channel:
                    problems.append(f"{n.name}: weight scale is per-tensor, expected per-channel")
            else:
                problems.append(
                    f"{n.name}: quantizes a constant {src} that is not a Conv/MatMul/Gemm weight "
                    "(TensorRT rejects quantized constants there)"
                )
        elif scale is not None:
            activations[src] = float(np.asarray(scale).reshape(-1)[0])
    # which compute nodes read a DQ output
    quantized_nodes = sorted({c.name for d in dq_nodes for c in consumers.get(d.output[0], [])})
    excluded = set(excluded_nodes or [])
    leaked = sorted(excluded & set(quantized_nodes))
    if leaked:
        problems.append(f"excluded nodes got Q/DQ: {leaked[:3]}")
    elem_types = {onnx.TensorProto.INT8}
    for vi in graph.value_info:
        if vi.type.tensor_type.elem_type == onnx.TensorProto.UINT8:
            elem_types.add(onnx.TensorProto.UINT8)
    if onnx.TensorProto.UINT8 in elem_types:
        problems.append("uint8 tensors present (TensorRT needs int8)")
    return {
        "n_quantize": len(q_nodes),
        "n_dequantize": len(dq_nodes),
        "activation_scales": activations,
        "weights": weights,
        "quantized_nodes": quantized_nodes,
        "problems": problems,
    }


def trt_calibration_cache(scales: dict[str, float], header: str = "TRT-8601-MinMaxCalibration") -> str:
    """Scales in TensorRT's calibration-cache text form (``name: <big-endian float32 hex>``)."""
    lines = [header]
    lines += [f"{name}: {struct.pack('>f', float(s)).hex()}" for name, s in sorted(scales.items())]
    return "\n".join(lines) + "\n"
