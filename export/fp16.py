"""The FP16 variant: ONNX Runtime's float16 converter, with FP32 inputs/outputs and the nodes that
need FP32 (a model's pre/post-processing) kept in FP32 end to end.

`convert_float_to_float16(keep_io_types=True)` casts every FP32 graph input to FP16 before any
node and every output back after, even where the nodes next to them are blocked: the LSTM's raw
CO2 levels (~400 ppm, where FP16 steps by 0.25) would be rounded before the blocked differencing
and again after the blocked de-standardisation. So each FP32 -> FP16 -> FP32 cast pair it leaves
is replaced by the FP32 value itself, and the graph is sorted again (the converter appends its
casts at the end, which ONNX Runtime accepts but `onnx.checker` does not).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx import TensorProto, helper
from onnxruntime.transformers.float16 import convert_float_to_float16

#: Nodes of the serving wrapper's own `forward` (its pre/post-processing: softmax, differencing,
#: de-standardisation, the anomaly score): the legacy exporter names them `/<Op>[_k]`, without the
#: submodule scope (`/net/...`, `/lstm/...`) that the network's own layers carry.
WRAPPER_NODES = r"^/[^/]+$"


def to_fp16(source: Path, target: Path, keep_fp32: str | None = None) -> list[str]:
    """Write `source` converted to FP16 at `target`, FP32 inputs and outputs kept, nodes whose
    name matches the regex `keep_fp32` left in FP32; return the names of those nodes."""
    model = onnx.load(str(source))
    pattern = re.compile(keep_fp32) if keep_fp32 else None
    kept = [n.name for n in model.graph.node if pattern and pattern.search(n.name)]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=kept)
    _drop_round_trips(converted)
    _toposort(converted.graph)
    onnx.checker.check_model(converted, full_check=True)
    onnx.save(converted, str(target))
    return kept


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _drop_round_trips(model: onnx.ModelProto) -> None:
    """Replace `Cast(to=FP32)(Cast(to=FP16)(x))` with `Identity(x)` where `x` is FP32, then
    remove casts nothing reads any more."""
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type != "Cast" or _cast_to(node) != TensorProto.FLOAT:
            continue
        up = producer.get(node.input[0])
        if up is None or up.op_type != "Cast" or _cast_to(up) != TensorProto.FLOAT16:
            continue
        if types.get(up.input[0]) == TensorProto.FLOAT:
            node.CopyFrom(helper.make_node("Identity", [up.input[0]], node.output, name=node.name))
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for node in graph.node for i in _reads(node)} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and not set(n.output) & read]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)


def _reads(node: onnx.NodeProto) -> set[str]:
    """Every value `node` reads: its inputs and what its subgraphs take from outer scopes."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner = {i.name for i in (*sub.input, *sub.initializer)}
            inner |= {o for n in sub.node for o in n.output}
            names |= {i for n in sub.node for i in _reads(n)} - inner
    names.discard("")
    return names


def _toposort(graph: onnx.GraphProto) -> None:
    """Order `graph.node` so every node follows what it reads (Kahn's algorithm, keeping the
    original order wherever it allows)."""
    nodes = list(graph.node)
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    waiting = [{producer[i] for i in _reads(n) if i in producer} for n in nodes]
    readers: list[list[int]] = [[] for _ in nodes]
    for k, deps in enumerate(waiting):
        for d in deps:
            readers[d].append(k)
    ready = [k for k, deps in enumerate(waiting) if not deps]
    order: list[int] = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            waiting[r].discard(k)
            if not waiting[r]:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ValueError("the converted graph has a cycle")
    _replace(graph, (nodes[k] for k in order))


def _replace(graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]) -> None:
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copies.append(copy)
    del graph.node[:]
    graph.node.extend(copies)
