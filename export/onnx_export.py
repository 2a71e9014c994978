"""`torch.onnx.export` (the legacy TorchScript exporter) with dynamic axes, then `onnx.checker`'s
full check and a check of the graph's I/O against the declared specs."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from service.model_config import DATATYPES, TensorSpec

OPSET = 17
AXIS_NAMES = {0: "batch", 1: "time"}


class ExportError(RuntimeError):
    """The module cannot be exported, or its graph does not match the declared inputs/outputs."""


def dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    """Named dynamic axes for every `-1` dimension (axis 0 is `batch`, axis 1 `time`)."""
    return {
        s.name: {i: AXIS_NAMES.get(i, f"dim{i}") for i, d in enumerate(s.shape) if d == -1}
        for s in specs
    }


def torch_export(
    module: nn.Module,
    path: Path,
    examples: Sequence[np.ndarray],
    input_names: Sequence[str],
    output_names: Sequence[str],
    axes: Mapping[str, Mapping[int, str]],
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export `module` (eval mode) traced on `examples` (its positional arguments) with the named
    dynamic `axes` per tensor, then run `onnx.checker`'s full check; ExportError if either fails."""
    module.eval()
    try:
        with warnings.catch_warnings():
            # The legacy exporter is ~10x faster here than dynamo; its warnings about itself and
            # about traced shapes are answered by the parity check over several shapes.
            for category in (DeprecationWarning, UserWarning, torch.jit.TracerWarning):
                warnings.simplefilter("ignore", category)
            torch.onnx.export(
                module,
                tuple(torch.from_numpy(np.ascontiguousarray(x)) for x in examples),
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes={k: dict(v) for k, v in axes.items() if v},
                opset_version=opset,
                dynamo=False,
            )
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    return onnx.load(str(path))


def export_onnx(
    module: nn.Module,
    path: Path,
    example: np.ndarray,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export a single-input `module` traced on `example` (`-1` dims dynamic, see `dynamic_axes`),
    run the full checker, and verify that the graph's inputs and outputs have the declared names,
    datatypes and shapes."""
    names = ([s.name for s in inputs], [s.name for s in outputs])
    axes = dynamic_axes([*inputs, *outputs])
    model = torch_export(module, path, [example], *names, axes, opset)
    check_io(model, inputs, outputs)
    return model


def _declared(value_info: onnx.ValueInfoProto) -> tuple[str, list[int]]:
    tensor = value_info.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return dtype, dims


def check_io(
    model: onnx.ModelProto, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> None:
    """Raise ExportError unless the graph's I/O match the specs (name, datatype, shape)."""
    for kind, graph_io, specs in (
        ("input", model.graph.input, inputs),
        ("output", model.graph.output, outputs),
    ):
        found = {v.name: _declared(v) for v in graph_io}
        for spec in specs:
            want = (DATATYPES[spec.datatype], list(spec.shape))
            if found.get(spec.name) != want:
                raise ExportError(
                    f"{kind} {spec.name!r}: graph declares {found.get(spec.name)}, config says "
                    f"{want} (dtype, shape); fix the model's forward or the spec"
                )
        if len(found) != len(specs):
            raise ExportError(f"graph {kind}s {sorted(found)} != spec {[s.name for s in specs]}")
