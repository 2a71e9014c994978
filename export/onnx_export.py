"""`torch.onnx.export` with dynamic axes, then `onnx.checker` and a check of the graph's I/O."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from service.model_config import DATATYPES, TensorSpec

OPSET = 17
AXIS_NAMES = {0: "batch", 1: "time"}


class ExportError(RuntimeError):
    """The exported graph does not match the declared inputs and outputs."""


def dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    """Named dynamic axes for every `-1` dimension (axis 0 is `batch`, axis 1 `time`)."""
    return {
        s.name: {i: AXIS_NAMES.get(i, f"dim{i}") for i, d in enumerate(s.shape) if d == -1}
        for s in specs
    }


def export_onnx(
    module: nn.Module,
    path: Path,
    example: np.ndarray,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    opset: int = OPSET,
) -> onnx.ModelProto:
    """Export `module` (eval mode) traced on `example`, run the full checker, and verify that the
    graph's inputs and outputs have the declared names, datatypes and shapes."""
    module.eval()
    with warnings.catch_warnings():
        # The legacy exporter is ~10x faster here than dynamo; its warnings about itself and about
        # LSTM batch sizes are answered by the parity check over several batch sizes.
        for category in (DeprecationWarning, UserWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        torch.onnx.export(
            module,
            (torch.from_numpy(example),),
            str(path),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_axes=dynamic_axes([*inputs, *outputs]),
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
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
