"""Request bodies from real samples (v2 JSON, v2 binary, v1) and the manifest post.lua reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from service.codec import encode_request

DISTINCT_BODIES = 16  # real samples cycled per cell


@dataclass(frozen=True)
class Payload:
    """One ready-to-send POST request."""

    path: str
    body: bytes
    headers: dict[str, str]


def v2_json_body(input_name: str, array: np.ndarray) -> bytes:
    """A v2 JSON infer request with one FP32 input (all outputs answered as JSON)."""
    body, _ = encode_request({input_name: as_fp32(array)}, binary=False, binary_output=False)
    return body


def v2_binary_body(input_name: str, array: np.ndarray) -> tuple[bytes, int]:
    """A v2 binary request (JSON header + little-endian FP32 bytes, all outputs binary).

    Returns the body and the header's length (the Inference-Header-Content-Length)."""
    body, head = encode_request({input_name: as_fp32(array)})
    assert head is not None
    return body, head


def as_fp32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype="<f4")


def v1_body(array: np.ndarray) -> bytes:
    """A v1 predict request: one instance per row."""
    return orjson.dumps({"instances": array}, option=orjson.OPT_SERIALIZE_NUMPY)


def make_payload(model: str, protocol: str, input_name: str, array: np.ndarray) -> Payload:
    """The request for `array` (rows on the first axis) in one protocol."""
    if protocol == "v2_json":
        body = v2_json_body(input_name, array)
        return Payload(f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
    if protocol == "v2_binary":
        body, head = v2_binary_body(input_name, array)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(head),
        }
        return Payload(f"/v2/models/{model}/infer", body, headers)
    if protocol == "v1":
        body = v1_body(array)
        return Payload(f"/v1/models/{model}:predict", body, {"Content-Type": "application/json"})
    raise ValueError(f"unknown protocol {protocol!r}")


def request_rows(samples: np.ndarray, rows: int, count: int) -> list[np.ndarray]:
    """`count` arrays of `rows` consecutive real samples (wrapping round the samples)."""
    n = len(samples)
    return [np.take(samples, (k * rows + np.arange(rows)) % n, axis=0) for k in range(count)]


def manifest_text(entries: list[tuple[str, Path, dict[str, str]]]) -> str:
    """The request manifest that loadtests/wrk/post.lua reads: path, body file, headers per line."""
    lines = []
    for path, body_file, headers in entries:
        fields = [path, str(body_file), *(f"{k}: {v}" for k, v in headers.items())]
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"tab or newline in a manifest field: {fields}")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"
