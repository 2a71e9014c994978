"""Open Inference Protocol v2 codec: JSON tensors and Triton's binary tensor extension.

Pure functions over bytes and NumPy arrays; nothing here knows HTTP or models. `BYTES` tensors
are object arrays of `str` (UTF-8 on the wire): a JSON list of strings, or in binary form each
element as a 4-byte little-endian length followed by its bytes (Triton's serialisation).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service.errors import BadRequest, PayloadTooLarge
from service.model_config import DATATYPES

#: OIP datatype -> NumPy dtype, and back.
NP_TYPES: dict[str, np.dtype] = {k: np.dtype(v) for k, v in DATATYPES.items()}
OIP_TYPES: dict[np.dtype, str] = {v: k for k, v in NP_TYPES.items()}
BYTES = "BYTES"
MAX_RANK = 32  # NumPy's own limit is 64; no model here needs more than a handful
#: Called with (name, datatype, shape) for each input before its array is built: it raises to
#: refuse the input (unknown name, wrong datatype or rank, over a limit).
Check = Callable[[str, str, tuple[int, ...]], None]
_LENGTH = struct.Struct("<I")

HEADER_LENGTH = "inference-header-content-length"
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    """A decoded v2 request: named input arrays plus the request's metadata."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of an array (BadRequest for a dtype the protocol has no name for)."""
    try:
        return OIP_TYPES[array.dtype]
    except KeyError:
        if array.dtype.kind in "US":  # NumPy fixed-width strings
            return BYTES
        raise BadRequest(f"no Open Inference Protocol datatype for dtype {array.dtype}") from None


def _loads(raw: bytes | memoryview, what: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in {what}: {exc}") from None


def _parameters(spec: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"{what}: 'parameters' must be an object")
    return parameters


def _shape(spec: dict[str, Any], name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadRequest(f"input '{name}': 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_RANK:
        raise BadRequest(f"input '{name}': rank {len(shape)} is over the limit of {MAX_RANK}")
    return tuple(shape)


def _dtype(spec: dict[str, Any], name: str) -> np.dtype:
    datatype = spec.get("datatype")
    if datatype not in NP_TYPES:
        supported = ", ".join(NP_TYPES)
        raise BadRequest(
            f"input '{name}': unsupported datatype {datatype!r} (supported: {supported})"
        )
    return NP_TYPES[datatype]


def _strings(data: Any, name: str) -> np.ndarray:
    """A BYTES tensor's JSON data (a flat or nested list of strings) as a flat object array."""
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            flat.append(item)
        else:
            raise BadRequest(f"input '{name}': BYTES 'data' must hold strings only")
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array


def _json_tensor(spec: dict[str, Any], name: str, dtype: np.dtype, shape: tuple[int, ...]):
    if "data" not in spec:
        raise BadRequest(f"input '{name}': no 'data' and no binary_data_size")
    data = spec["data"]
    if dtype.kind == "O":
        array = _strings(data, name)
        if array.size != math.prod(shape):
            raise BadRequest(
                f"input '{name}': shape {list(shape)} needs {math.prod(shape)} elements, "
                f"data has {array.size}"
            )
        return array.reshape(shape)
    try:
        if isinstance(data, list) and data and not isinstance(data[0], list):
            array = np.fromiter(data, dtype=dtype, count=len(data))  # flat: the common case
        else:
            array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(
            f"input '{name}': 'data' must hold {spec['datatype']} numbers only"
        ) from None
    count = math.prod(shape)
    if array.size != count:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} needs {count} elements, data has {array.size}"
        )
    return array.reshape(shape)


def _binary_strings(raw: memoryview, name: str, count: int) -> np.ndarray:
    """Triton's serialised BYTES: per element a 4-byte little-endian length, then the bytes."""
    out = np.empty(count, dtype=object)
    offset, size = 0, len(raw)
    for i in range(count):
        if offset + 4 > size:
            raise BadRequest(f"input '{name}': BYTES data ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise BadRequest(f"input '{name}': BYTES element {i} overruns the data")
        try:
            out[i] = bytes(raw[offset : offset + length]).decode()
        except UnicodeDecodeError:
            raise BadRequest(f"input '{name}': BYTES element {i} is not UTF-8") from None
        offset += length
    if offset != size:
        raise BadRequest(f"input '{name}': {size - offset} bytes of BYTES data left over")
    return out


def _binary_tensor(raw: memoryview, name: str, dtype: np.dtype, shape: tuple[int, ...]):
    count = math.prod(shape)
    if dtype.kind == "O":
        return _binary_strings(raw, name, count).reshape(shape)
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"input '{name}': shape {list(shape)} of {dtype.name} needs "
            f"{count * dtype.itemsize} bytes, binary_data_size gives {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo a request's Content-Encoding (gzip or deflate, as tritonclient may send), refusing
    (413) a body that inflates past `limit` bytes."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r} (use gzip or deflate)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"{encoding} body inflates past the {limit}-byte limit")
    return out


def decode_request(
    body: bytes, header_length: str | None = None, check: Check | None = None
) -> InferRequest:
    """Decode a v2 infer request: pure JSON, or a JSON header followed by binary tensors.

    `check` sees each input's declared name, datatype and shape before its array is built.
    """
    view = memoryview(body)
    if header_length is None:
        head, rest = view, view[len(view) :]
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest("Inference-Header-Content-Length must be an integer") from None
        if not 0 < n <= len(view):
            raise BadRequest(
                f"Inference-Header-Content-Length {n} is outside the body of {len(view)} bytes"
            )
        head, rest = view[:n], view[n:]
    doc = _loads(head, "request body")
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise BadRequest("request needs a non-empty 'inputs' list")

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest("each input needs a 'name'")
        name = spec["name"]
        if name in inputs:
            raise BadRequest(f"input '{name}' given twice")
        shape, dtype = _shape(spec, name), _dtype(spec, name)
        if check is not None:
            check(name, spec["datatype"], shape)
        size = _parameters(spec, f"input '{name}'").get("binary_data_size")
        if size is None:
            inputs[name] = _json_tensor(spec, name, dtype, shape)
            continue
        if type(size) is not int or size < 0 or offset + size > len(rest):
            raise BadRequest(f"input '{name}': binary_data_size {size!r} overruns the body")
        inputs[name] = _binary_tensor(rest[offset : offset + size], name, dtype, shape)
        offset += size
    if offset != len(rest):
        raise BadRequest(f"{len(rest) - offset} bytes of binary data belong to no input")

    parameters = _parameters(doc, "request")
    binary_all = bool(parameters.get("binary_data_output", False))
    outputs = None
    if doc.get("outputs") is not None:
        if not isinstance(doc["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = []
        for out in doc["outputs"]:
            if not isinstance(out, dict) or not isinstance(out.get("name"), str):
                raise BadRequest("each requested output needs a 'name'")
            binary = _parameters(out, f"output '{out['name']}'").get("binary_data", binary_all)
            outputs.append(RequestedOutput(out["name"], bool(binary)))
    request_id = doc.get("id")
    return InferRequest(
        inputs=inputs,
        id=None if request_id is None else str(request_id),
        parameters=parameters,
        outputs=outputs,
        binary_output=binary_all,
    )


def _as_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def tensor_data(array: np.ndarray) -> Any:
    """A tensor's flat JSON `data`: the array itself (orjson serialises it) or, for BYTES, a
    list of strings."""
    flat = np.ascontiguousarray(array).ravel()
    if flat.dtype.kind in "OUS":
        return [_as_text(v) for v in flat.tolist()]
    return flat


def tensor_bytes(array: np.ndarray) -> bytes:
    """A tensor in Triton's binary form (BYTES: length-prefixed UTF-8 elements)."""
    if array.dtype.kind in "OUS":
        parts = []
        for value in np.asarray(array).ravel().tolist():
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts += [_LENGTH.pack(len(raw)), raw]
        return b"".join(parts)
    return np.ascontiguousarray(array).tobytes()


def encode_response(
    model: str,
    version: str,
    outputs: list[tuple[str, np.ndarray, bool]],
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode (name, array, binary?) outputs; returns the body and the JSON header's length.

    The header length is None when every output went as JSON (a plain JSON body).
    """
    doc: dict[str, Any] = {"model_name": model, "model_version": version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    tensors, blobs = [], []
    for name, array, binary in outputs:
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if binary:
            blob = tensor_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = tensor_data(array)
        tensors.append(tensor)
    doc["outputs"] = tensors
    head = orjson.dumps(doc, option=_JSON_OPTS)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def encode_request(
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    *,
    binary: bool = True,
    binary_output: bool = True,
) -> tuple[bytes, int | None]:
    """The client's side: a v2 request for `inputs` (binary tensors or flat JSON data), asking for
    `outputs` (default: all) as binary or JSON. Returns the body and the JSON header's length
    (None for a plain JSON body)."""
    tensors, blobs = [], []
    for name, array in inputs.items():
        tensor: dict[str, Any] = {
            "name": name,
            "shape": list(array.shape),
            "datatype": datatype_of(array),
        }
        if binary:
            blob = tensor_bytes(array)
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = tensor_data(array)
        tensors.append(tensor)
    doc: dict[str, Any] = {"inputs": tensors}
    if outputs is None:
        if binary_output:
            doc["parameters"] = {"binary_data_output": True}
    else:
        doc["outputs"] = [
            {"name": n, "parameters": {"binary_data": binary_output}} for n in outputs
        ]
    head = orjson.dumps(doc, option=_JSON_OPTS)
    if not binary:
        return head, None
    return b"".join([head, *blobs]), len(head)


def decode_response(body: bytes, header_length: str | None = None) -> dict[str, np.ndarray]:
    """The client's side: the output arrays of a v2 answer, JSON or binary."""
    n = int(header_length) if header_length else len(body)
    head, blob, offset = orjson.loads(body[:n]), memoryview(body)[n:], 0
    outputs = {}
    for tensor in head["outputs"]:
        name, shape = tensor["name"], tensor["shape"]
        dtype = NP_TYPES[tensor["datatype"]]
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = tensor["data"]
            if dtype.kind == "O":
                outputs[name] = _strings(data, name).reshape(shape)
            else:
                outputs[name] = np.asarray(data, dtype).reshape(shape)
        else:
            outputs[name] = _binary_tensor(blob[offset : offset + size], name, dtype, shape)
            offset += size
    return outputs
