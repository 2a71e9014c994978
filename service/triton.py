"""Triton's model-configuration extension: a loaded version as Triton's model-config JSON.

Field names follow Triton's `model_config.proto` in its JSON form, so Triton tooling
(`tritonclient`'s `get_model_config`, Model Analyzer, dashboards) reads them. onnxserve's own
fields (task, labels, threshold, provider...) travel under `parameters` as Triton's
`{"key": {"string_value": "..."}}`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.model_config import TensorSpec, VersionPolicy
    from service.repository import LoadedModel

#: Open Inference Protocol datatype -> Triton's model-config data_type.
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


def _tensors(specs: list[TensorSpec], batched: bool) -> list[dict[str, Any]]:
    """Triton's `input`/`output` entries: dims without the batch axis when batching."""
    return [
        {
            "name": s.name,
            "data_type": TRITON_TYPES[s.datatype],
            "dims": list(s.shape[1:] if batched else s.shape),
        }
        for s in specs
    ]


def _parameters(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {
        k: {"string_value": v if isinstance(v, str) else json.dumps(v)}
        for k, v in values.items()
        if v is not None
    }


def model_config(model: LoadedModel, policy: VersionPolicy) -> dict[str, Any]:
    """Triton's model-config JSON for one loaded version."""
    config, batching, runtime = model.config, model.batching, model.runtime
    batched = config.batchable
    gpu = runtime.on_gpu
    doc: dict[str, Any] = {
        "name": config.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": policy.model_dump(exclude_none=True),
        "max_batch_size": batching.max_batch_size if batched else 0,
        "input": _tensors(config.inputs, batched),
        "output": _tensors(config.outputs, batched),
        "instance_group": [
            {
                "name": f"{config.name}_0",
                "kind": "KIND_GPU" if gpu else "KIND_CPU",
                "count": model.instances,
                "gpus": list(runtime.gpus) if gpu else [],
            }
        ],
        "default_model_filename": model.model_file,
        "parameters": _parameters(
            {
                "task": config.task,
                "description": config.description or None,
                "labels": config.labels,
                "threshold": config.threshold,
                "normalization": config.normalization.model_dump()
                if config.normalization
                else None,
                "provider": runtime.provider,
                "intra_op_threads": runtime.threads,
            }
        ),
    }
    if batched:
        timeout_us = int(batching.timeout_ms * 1000)
        doc["dynamic_batching"] = {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": timeout_us,
                "allow_timeout_override": True,
                "max_queue_size": batching.max_queue_size,
            },
        }
    return doc
