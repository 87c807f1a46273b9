"""Compare an ONNX graph's op set with what the TensorRT ONNX parser supports.

The supported list ships with the package (``trt_onnx_ops.txt``, from onnx-tensorrt ``docs/operators.md`` for
TensorRT 10.15). One known restriction is checked on top of the list: TensorRT's GridSample is 4D only before
TensorRT 11.2 (rank-5 GridSample arrived in 11.2.1), so a 5D GridSample fails unless ``trt_version >= 11.2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

from emorph_deploy.errors import ProcessingError

if TYPE_CHECKING:
    import onnx

DEFAULT_TRT_VERSION = "10.15"
GRIDSAMPLE_5D_MIN_TRT = (11, 2)
_DEFAULT_DOMAINS = ("", "ai.onnx")


@lru_cache(maxsize=1)
def supported_ops() -> frozenset[str]:
    """The ONNX op types the TensorRT parser supports (packaged list, comment lines skipped)."""
    text = resources.files("emorph_deploy.export").joinpath("trt_onnx_ops.txt").read_text()
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    )


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0, 26); non-numeric tails are dropped."""
    out: list[int] = []
    for part in str(text).split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def gridsample_5d_supported(trt_version: str) -> bool:
    """Full TensorRT >= 11.2 parses rank-5 GridSample (TensorRT 11.2.1 release notes)."""
    return parse_version(trt_version) >= GRIDSAMPLE_5D_MIN_TRT


@dataclass(frozen=True)
class TrtOpReport:
    """Result of :func:`tensorrt_op_report`: op types used, those not supported, and why."""

    ops: tuple[str, ...]
    unsupported: tuple[str, ...] = ()
    reasons: dict[str, str] = field(default_factory=dict)
    trt_version: str = DEFAULT_TRT_VERSION

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def to_dict(self) -> dict:
        return {
            "trt_version": self.trt_version,
            "ops": list(self.ops),
            "unsupported": list(self.unsupported),
            "reasons": dict(self.reasons),
            "ok": self.ok,
        }


def value_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every graph input/output/value_info and initializer whose shape the graph records."""
    ranks: dict[str, int] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    for init in graph.initializer:
        ranks[init.name] = len(init.dims)
    return ranks


def tensorrt_op_report(model: onnx.ModelProto, trt_version: str = DEFAULT_TRT_VERSION) -> TrtOpReport:
    """List the graph's op types and those TensorRT ``trt_version`` cannot parse (run shape inference
    first)."""
    supported = supported_ops()
    ranks = value_ranks(model)
    ops: set[str] = set()
    reasons: dict[str, str] = {}

    def visit(graph) -> None:
        for node in graph.node:
            op = node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
            ops.add(op)
            if node.domain not in _DEFAULT_DOMAINS:
                reasons[op] = f"custom domain '{node.domain}' (needs a TensorRT plugin)"
            elif op not in supported:
                reasons[op] = "not in the TensorRT ONNX parser's supported list"
            elif op == "GridSample":
                rank = ranks.get(node.input[0]) if node.input else None
                if rank != 4 and not gridsample_5d_supported(trt_version):
                    got = f"{rank}D" if rank is not None else "unknown-rank"
                    reasons[op] = f"{got} GridSample is unsupported by TensorRT < 11.2 (4D only)"
            for attr in node.attribute:  # If/Loop/Scan bodies
                if attr.g is not None and attr.g.node:
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(model.graph)
    unsupported = tuple(sorted(reasons))
    return TrtOpReport(
        ops=tuple(sorted(ops)), unsupported=unsupported, reasons=reasons, trt_version=str(trt_version)
    )


def check_tensorrt_ops(model: onnx.ModelProto, trt_version: str = DEFAULT_TRT_VERSION) -> TrtOpReport:
    """Raise :class:`ProcessingError` naming the first offending op if TensorRT cannot parse the graph."""
    report = tensorrt_op_report(model, trt_version)
    if not report.ok:
        details = "; ".join(f"{op}: {report.reasons[op]}" for op in report.unsupported)
        raise ProcessingError(
            f"graph is not TensorRT {trt_version} compatible: expected only ops the TensorRT ONNX parser "
            f"supports, got {details}; fix: --grid-sample gather (or --target onnxruntime if the graph "
            "is not for TensorRT)"
        )
    return report
