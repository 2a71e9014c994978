"""Config auto-complete for ONNX models, as Triton does it: what the graph says, completed by what
`config.json` adds, refused where the two disagree.

- Tensor names, datatypes (ONNX STRING -> `BYTES`) and shapes (symbolic or unknown dims -> -1)
  come from the graph.
- A first axis that is dynamic on every input and output makes the model batchable
  (`max_batch_size` > 0, from the config or the server default); otherwise `max_batch_size` is 0:
  no batch axis, no batching, requests carry the model's whole shape.
- A partial `config.json` (only batching knobs, labels, a description, some tensors...) is
  completed from the graph; a name, datatype or rank that the graph does not have is refused with
  the field and both values named.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from service.model_config import ConfigError, ModelConfig, describe_errors

#: ONNX Runtime's type strings -> Open Inference Protocol datatypes.
ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class NodeArg(Protocol):
    """What ONNX Runtime tells of a graph input or output (`session.get_inputs()[i]`)."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[int | str | None]: ...


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output in the protocol's terms."""

    name: str
    datatype: str
    shape: list[int]


def graph_tensors(kind: str, args: Iterable[NodeArg]) -> list[GraphTensor]:
    """The graph's tensors of one kind ("input"/"output"); ConfigError for a type the protocol
    cannot carry (a sequence, a map, bfloat16...)."""
    tensors = []
    for arg in args:
        datatype = ORT_TYPES.get(arg.type)
        if datatype is None:
            hint = (
                " (for a scikit-learn classifier, convert with options={'zipmap': False})"
                if arg.type.startswith(("seq(", "map("))
                else ""
            )
            raise ConfigError(
                f"graph {kind} '{arg.name}' is {arg.type}, which the Open Inference Protocol "
                f"cannot carry{hint}"
            )
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in (arg.shape or [])]
        tensors.append(GraphTensor(arg.name, datatype, shape))
    return tensors


def batchable(inputs: Sequence[GraphTensor], outputs: Sequence[GraphTensor]) -> bool:
    """True when the first axis is dynamic on every input and output (Triton's rule)."""
    return all(t.shape and t.shape[0] == -1 for t in (*inputs, *outputs))


def _complete_tensors(kind: str, given: Any, graph: Sequence[GraphTensor]) -> list[dict[str, Any]]:
    """The config's tensors checked against the graph, then the graph's others appended."""
    field = f"{kind}s"
    if given is None:
        given = []
    if not isinstance(given, list):
        raise ConfigError(f"{field}: must be a list of tensors")
    by_name = {t.name: t for t in graph}
    done: list[dict[str, Any]] = []
    for i, spec in enumerate(given):
        where = f"{field}[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ConfigError(f"{where}.name: each {kind} needs a name")
        name = spec["name"]
        tensor = by_name.get(name)
        if tensor is None:
            raise ConfigError(
                f"{where}.name: config names '{name}', the graph's {field} are "
                f"{[t.name for t in graph]}"
            )
        datatype = spec.get("datatype", tensor.datatype)
        if datatype != tensor.datatype:
            raise ConfigError(
                f"{where}.datatype: config says {datatype}, graph {kind} '{name}' is "
                f"{tensor.datatype}"
            )
        shape = spec.get("shape", tensor.shape)
        if not isinstance(shape, list) or len(shape) != len(tensor.shape):
            raise ConfigError(
                f"{where}.shape: config says {shape}, graph {kind} '{name}' has rank "
                f"{len(tensor.shape)} (shape {tensor.shape})"
            )
        for axis, (want, have) in enumerate(zip(shape, tensor.shape, strict=True)):
            if have != -1 and want != have:
                raise ConfigError(
                    f"{where}.shape: config says {shape}, graph {kind} '{name}' has "
                    f"{tensor.shape} (dimension {axis}: {want} vs {have})"
                )
        done.append({**spec, "name": name, "datatype": datatype, "shape": shape})
    named = {d["name"] for d in done}
    done += [
        {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        for t in graph
        if t.name not in named
    ]
    return done


def complete_config(
    name: str,
    doc: dict[str, Any] | None,
    inputs: Sequence[GraphTensor],
    outputs: Sequence[GraphTensor],
    default_max_batch_size: int,
) -> ModelConfig:
    """`config.json`'s content (or None when there is none) completed from the graph.

    ConfigError names the field and both values where the config contradicts the graph.
    """
    doc = dict(doc or {})
    given_name = doc.setdefault("name", name)
    if given_name != name:
        raise ConfigError(f"name: config says '{given_name}', the model's folder is '{name}'")
    doc["inputs"] = _complete_tensors("input", doc.get("inputs"), inputs)
    doc["outputs"] = _complete_tensors("output", doc.get("outputs"), outputs)
    batching = doc.get("batching") or {}
    if not isinstance(batching, dict):
        raise ConfigError("batching: must be an object")
    can_batch = batchable(inputs, outputs)
    size = batching.get("max_batch_size")
    if size is None:
        size = default_max_batch_size if can_batch else 0
    elif isinstance(size, int) and size > 0 and not can_batch:
        fixed = next(t for t in (*inputs, *outputs) if not t.shape or t.shape[0] != -1)
        raise ConfigError(
            f"batching.max_batch_size: config says {size}, but the graph has no dynamic first "
            f"axis on every tensor ('{fixed.name}' has shape {fixed.shape}); use 0 (no batching)"
        )
    doc["batching"] = {**batching, "max_batch_size": size}
    try:
        return ModelConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {describe_errors(exc)}") from None
