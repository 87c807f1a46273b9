"""ONNX graph analysis shared by the FP16 converter, the INT8 quantizer and the builder.

Regions of an emorph graph (found from the structure, not from node names, so any exporter naming works):

* **network**: every node needed to compute the ``flow`` output (its backward cone);
* **warp**: every node *not* needed for ``flow`` (the sampling of ``moving`` by ``flow`` and its coordinate
  arithmetic; empty for a flow-only export);
* **flow head**: the nodes between the last Conv before ``flow`` and ``flow`` itself (the head conv and its
  upsampling), Conv included;
* **input convs**: Conv nodes that see a graph input without any Conv/MatMul/Gemm in between (the first conv
  and the skip conv on the pooled input): they stay unquantized so the raw images are never rounded to int8.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def name_nodes(model: Any) -> Any:
    """Give every unnamed node a unique name (in place) so regions can be named; returns model."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            base = f"{node.op_type}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
            seen.add(name)
    return model


def named_copy(source: Any) -> Any:
    """A fresh ModelProto with every node named (:func:`name_nodes`) from an ONNX path or an already loaded
    model (copied: the caller's model is never modified; its external data must already be loaded)."""
    import onnx

    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
    else:
        model = onnx.load(str(source))
    return name_nodes(model)


@dataclass(frozen=True)
class Regions:
    network: frozenset[str]
    warp: frozenset[str]
    flow_head: frozenset[str]
    input_convs: frozenset[str]
    op_types: dict[str, str]

    def names(self, *ops: str) -> list[str]:
        return sorted(n for n, t in self.op_types.items() if t in ops)


def _producers(graph: Any) -> dict[str, Any]:
    return {out: node for node in graph.node for out in node.output}


def _backward_cone(
    graph: Any, tensors: list[str], stop_ops: tuple[str, ...] = (), skip_ops: tuple[str, ...] = ()
) -> set[str]:
    """Nodes feeding ``tensors``; ``stop_ops`` included but not walked past; ``skip_ops`` excluded."""
    prod = _producers(graph)
    seen: set[str] = set()
    stack = [prod[t] for t in tensors if t in prod]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in stop_ops:
            continue
        stack.extend(prod[i] for i in node.input if i in prod and prod[i].op_type not in skip_ops)
    return seen


def flow_output_name(model: Any) -> str | None:
    outs = [o.name for o in model.graph.output]
    if "flow" in outs:
        return "flow"
    return None


def find_regions(model: Any) -> Regions:
    """Split a named graph (see :func:`name_nodes`) into network / warp / flow head / input convs."""
    graph = model.graph
    op_types = {n.name: n.op_type for n in graph.node}
    flow = flow_output_name(model)
    all_nodes = set(op_types)
    if flow is None:
        network, warp, head = all_nodes, set(), set()
    else:
        network = _backward_cone(graph, [flow])
        warp = all_nodes - network
        # the head conv and what follows it (upsampling); shape computations do not make a node part of it
        head = _backward_cone(graph, [flow], stop_ops=("Conv", "ConvTranspose"), skip_ops=("Shape",))
        head = {n for n in head if op_types[n] not in ("MatMul", "Gemm")}
    # input convs: walk forward from graph inputs, stopping at compute ops
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for i in node.input:
            consumers[i].append(node)
    init = {t.name for t in graph.initializer}
    frontier = [i.name for i in graph.input if i.name not in init]
    seen_t: set[str] = set()
    input_convs: set[str] = set()
    while frontier:
        t = frontier.pop()
        if t in seen_t:
            continue
        seen_t.add(t)
        for node in consumers.get(t, []):
            if node.name in warp:
                continue
            if node.op_type in COMPUTE_OPS:
                if node.op_type in ("Conv", "ConvTranspose"):
                    input_convs.add(node.name)
                continue
            frontier.extend(node.output)
    return Regions(frozenset(network), frozenset(warp), frozenset(head), frozenset(input_convs), op_types)


def tensor_ranks(model: Any) -> dict[str, int]:
    """Rank of every tensor whose shape ONNX shape inference knows (best-effort inference)."""
    import onnx

    from emorph_deploy.export.trt_ops import value_ranks

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best-effort here
        inferred = model
    return value_ranks(inferred)


def grid_sample_5d_nodes(model: Any) -> list[str]:
    """GridSample nodes whose input is rank 5 (3D volumes)."""
    nodes = [n for n in model.graph.node if n.op_type == "GridSample"]
    if not nodes:
        return []
    ranks = tensor_ranks(model)
    return [n.name or n.output[0] for n in nodes if ranks.get(n.input[0], ranks.get(n.input[1], 0)) == 5]


def is_linear_matmul(node: Any, initializers: set[str], constants: set[str]) -> bool:
    """A MatMul with a constant weight operand (nn.Linear), not attention's activation x activation."""
    return node.op_type == "MatMul" and any(i in initializers or i in constants for i in node.input[1:2])
