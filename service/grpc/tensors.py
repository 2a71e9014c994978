"""The gRPC binding's tensor codec: `ModelInferRequest` <-> `InferRequest`, arrays -> response.

Pure functions over protobuf messages and NumPy arrays, beside `service.codec` (REST), whose
rules they share: each input's declared name, datatype and shape go through `check` (the model's
`Bounds`) before its array is built, and BYTES in raw form are Triton's length-prefixed
serialisation (`service.codec`'s own reader and writer). A request carries its tensors either in
`raw_input_contents` (one bytes entry per input, in order: what tritonclient sends) or in each
input's typed `contents`; the answer comes in the same form (raw unless the request was typed and
every output has a typed field), as KServe's servers do. The client's side (`infer_request`,
`infer_outputs`) serves the load generator, `onnxserve score --url grpc://` and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from service.codec import (
    MAX_RANK,
    NP_TYPES,
    Check,
    InferRequest,
    RequestedOutput,
    _binary_strings,
    datatype_of,
    tensor_bytes,
)
from service.errors import BadRequest
from service.grpc import messages as pb

#: OIP datatype -> the typed `InferTensorContents` field that carries it (FP16: raw only).
TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# -- parameters -------------------------------------------------------------------------------
def parameter_values(parameters: Any) -> dict[str, Any]:
    """A protobuf `map<string, InferParameter>` as plain values."""
    out = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind is not None else None
    return out


def set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Fill a `map<string, InferParameter>` from plain values (anything else goes as text)."""
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            if value >= 1 << 63:
                slot.uint64_param = value
            else:
                slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        else:
            slot.string_param = value if isinstance(value, str) else str(value)


# -- the server's side ------------------------------------------------------------------------
def _shape(tensor: Any) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise BadRequest(f"input '{tensor.name}': 'shape' must hold non-negative integers")
    if len(shape) > MAX_RANK:
        raise BadRequest(
            f"input '{tensor.name}': rank {len(shape)} is over the limit of {MAX_RANK}"
        )
    return shape


def _raw_tensor(raw: bytes, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype, count = NP_TYPES[datatype], math.prod(shape)
    if dtype.kind == "O":
        return _binary_strings(memoryview(raw), name, count).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} of {datatype} needs {count * dtype.itemsize} "
            f"bytes, raw_input_contents has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _typed_tensor(contents: Any, name: str, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise BadRequest(
            f"input '{name}': {datatype} has no typed contents: send raw_input_contents"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} needs {count} elements, contents.{field} "
            f"has {len(values)}"
        )
    dtype = NP_TYPES[datatype]
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        try:
            array[:] = [v.decode() for v in values]
        except UnicodeDecodeError:
            raise BadRequest(f"input '{name}': BYTES contents must be UTF-8") from None
        return array.reshape(shape)
    try:
        return np.array(values, dtype=dtype).reshape(shape)
    except (OverflowError, ValueError):
        raise BadRequest(
            f"input '{name}': a value of contents.{field} is outside {datatype}"
        ) from None


def decode_request(request: Any, check: Check | None = None) -> InferRequest:
    """A `ModelInferRequest` as an InferRequest; `check` sees each input's declared name,
    datatype and shape before its array is built."""
    specs, raw = request.inputs, request.raw_input_contents
    if not specs:
        raise BadRequest("request needs at least one input")
    if raw and len(raw) != len(specs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(specs)} inputs: one per input, "
            "in order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(specs):
        name, datatype = tensor.name, tensor.datatype
        if not name:
            raise BadRequest("each input needs a 'name'")
        if name in inputs:
            raise BadRequest(f"input '{name}' given twice")
        if datatype not in NP_TYPES:
            supported = ", ".join(NP_TYPES)
            raise BadRequest(
                f"input '{name}': unsupported datatype {datatype!r} (supported: {supported})"
            )
        shape = _shape(tensor)
        if check is not None:
            check(name, datatype, shape)
        if raw:
            if tensor.HasField("contents"):
                raise BadRequest(f"input '{name}': contents and raw_input_contents both given")
            inputs[name] = _raw_tensor(raw[i], name, datatype, shape)
        else:
            inputs[name] = _typed_tensor(tensor.contents, name, datatype, shape)
    outputs = [RequestedOutput(o.name, True) for o in request.outputs] or None
    return InferRequest(
        inputs=inputs,
        id=request.id or None,
        parameters=parameter_values(request.parameters),
        outputs=outputs,
        binary_output=True,
    )


def wants_raw(request: Any) -> bool:
    """Whether to answer in raw_output_contents: unless the request sent typed contents."""
    return bool(request.raw_input_contents)


def encode_response(
    model: str,
    version: str,
    outputs: list[tuple[str, np.ndarray]],
    request_id: str | None,
    parameters: Mapping[str, Any],
    raw: bool = True,
) -> Any:
    """A `ModelInferResponse` with these outputs: raw, or typed where every output has a typed
    field (else raw)."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    set_parameters(response.parameters, parameters)
    types = [datatype_of(array) for _, array in outputs]
    raw = raw or any(t not in TYPED_FIELDS for t in types)
    for (name, array), datatype in zip(outputs, types, strict=True):
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if raw:
            response.raw_output_contents.append(tensor_bytes(array))
        elif datatype == "BYTES":
            tensor.contents.bytes_contents.extend(
                v if isinstance(v, bytes) else str(v).encode() for v in array.ravel().tolist()
            )
        else:
            getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.ravel().tolist())
    return response


# -- the client's side ------------------------------------------------------------------------
def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: list[str] | None = None,
    version: str | None = None,
    request_id: str | None = None,
) -> Any:
    """A `ModelInferRequest` carrying `inputs` as raw_input_contents (as tritonclient sends),
    asking for `outputs` (default: all)."""
    request = pb.ModelInferRequest(
        model_name=model, model_version=version or "", id=request_id or ""
    )
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=datatype_of(array), shape=array.shape)
        request.raw_input_contents.append(tensor_bytes(array))
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


def infer_outputs(response: Any) -> dict[str, np.ndarray]:
    """The output arrays of a `ModelInferResponse`, raw or typed."""
    raw = response.raw_output_contents
    outputs = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if raw:
            outputs[tensor.name] = _raw_tensor(raw[i], tensor.name, tensor.datatype, shape)
        else:
            outputs[tensor.name] = _typed_tensor(
                tensor.contents, tensor.name, tensor.datatype, shape
            )
    return outputs
