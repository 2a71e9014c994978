"""The v2 codec: JSON and binary tensors in and out, and every way a body can be wrong."""

import gzip
import zlib

import numpy as np
import orjson
import pytest

from service.codec import (
    decode_request,
    decode_response,
    decompress,
    encode_request,
    encode_response,
)
from service.errors import BadRequest, PayloadTooLarge

pytestmark = pytest.mark.unit


def _binary_body(header: dict, *arrays: np.ndarray) -> tuple[bytes, str]:
    head = orjson.dumps(header)
    return head + b"".join(a.tobytes() for a in arrays), str(len(head))


def test_json_tensor_is_reshaped_row_major():
    body = orjson.dumps(
        {
            "id": "r1",
            "inputs": [
                {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
            ],
            "outputs": [{"name": "y"}],
            "parameters": {"tag": "a"},
        }
    )
    req = decode_request(body)
    np.testing.assert_array_equal(req.inputs["x"], np.arange(1, 7, dtype=np.float32).reshape(2, 3))
    assert req.inputs["x"].dtype == np.float32
    assert req.id == "r1" and req.parameters == {"tag": "a"}
    assert [(o.name, o.binary) for o in req.outputs] == [("y", False)]


def test_nested_json_data_is_accepted():
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]}]}
    )
    assert decode_request(body).inputs["x"].tolist() == [[1, 2], [3, 4]]


def test_binary_tensors_follow_the_json_header():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([True, False])
    header = {
        "inputs": [
            {
                "name": "a",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 24},
            },
            {"name": "b", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
        ],
        "parameters": {"binary_data_output": True},
    }
    body, n = _binary_body(header, a, b)
    req = decode_request(body, n)
    np.testing.assert_array_equal(req.inputs["a"], a)
    np.testing.assert_array_equal(req.inputs["b"], b)
    assert req.binary_output and req.outputs is None


@pytest.mark.parametrize(
    ("body", "header_len", "message"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty 'inputs'"),
        (
            b'{"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]}',
            None,
            "needs 4 elements, data has 3",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}',
            None,
            "unsupported datatype 'FP99'",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": ["a", "b"]}]}',
            None,
            "FP32 numbers only",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}',
            None,
            "non-negative integers",
        ),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', None, "no 'data'"),
        (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', None, "'name'"),
        (b"{}", "99", "outside the body"),
        (b"{}", "abc", "must be an integer"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(body, header_len, message):
    with pytest.raises(BadRequest, match=message):
        decode_request(body, header_len)


def test_binary_size_that_disagrees_with_the_shape_is_refused():
    header = {
        "inputs": [
            {
                "name": "a",
                "shape": [2, 3],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    body, n = _binary_body(header, np.zeros(2, np.float32))
    with pytest.raises(BadRequest, match="needs 24 bytes"):
        decode_request(body, n)


def test_trailing_or_missing_binary_bytes_are_refused():
    header = {
        "inputs": [
            {"name": "a", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}
        ]
    }
    body, n = _binary_body(header, np.zeros(3, np.float32))
    with pytest.raises(BadRequest, match="belong to no input"):
        decode_request(body, n)
    body, n = _binary_body(header, np.zeros(1, np.float32))
    with pytest.raises(BadRequest, match="overruns"):
        decode_request(body, n)


def test_encode_mixes_json_and_binary_outputs():
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    label = np.array([1], dtype=np.int64)
    body, n = encode_response("m", "1", [("p", probs, True), ("l", label, False)], "id7", {"k": 1})
    head = orjson.loads(body[:n])
    assert head["id"] == "id7" and head["parameters"] == {"k": 1}
    p, lab = head["outputs"]
    assert (
        p["datatype"] == "FP32"
        and p["shape"] == [1, 2]
        and p["parameters"]["binary_data_size"] == 8
    )
    np.testing.assert_array_equal(np.frombuffer(body[n:], np.float32).reshape(1, 2), probs)
    assert lab == {"name": "l", "datatype": "INT64", "shape": [1], "data": [1]}


def test_encode_all_json_has_no_header_length():
    body, n = encode_response("m", "1", [("p", np.ones((2, 2), np.float32), False)])
    assert n is None
    assert orjson.loads(body)["outputs"][0]["data"] == [1.0, 1.0, 1.0, 1.0]


def test_compressed_bodies_are_inflated():
    raw = b'{"inputs": []}'
    assert decompress(gzip.compress(raw), "gzip", 1000) == raw
    assert decompress(zlib.compress(raw), "deflate", 1000) == raw
    with pytest.raises(BadRequest, match="Content-Encoding"):
        decompress(raw, "br", 1000)
    with pytest.raises(BadRequest, match="not valid gzip"):
        decompress(raw, "gzip", 1000)


def test_a_compressed_body_may_not_inflate_past_the_limit():
    bomb = gzip.compress(b"0" * 10_000_000)
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge, match="inflates past the 1000000-byte limit"):
        decompress(bomb, "gzip", 1_000_000)


@pytest.mark.parametrize("where", ["input", "output"])
def test_tensor_parameters_must_be_objects(where):
    tensor = {"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}
    doc = {"inputs": [tensor]}
    if where == "input":
        tensor["parameters"] = "x"
    else:
        doc["outputs"] = [{"name": "y", "parameters": [1]}]
    with pytest.raises(BadRequest, match="'parameters' must be an object"):
        decode_request(orjson.dumps(doc))


@pytest.mark.parametrize("binary", [True, False])
def test_client_encoding_is_what_the_server_decodes(binary):
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    body, n = encode_request({"x": x}, ["y"], binary=binary, binary_output=binary)
    req = decode_request(body, None if n is None else str(n))
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert [(o.name, o.binary) for o in req.outputs] == [("y", binary)]
    answer, n = encode_response("m", "1", [("y", x * 2, binary)])
    np.testing.assert_array_equal(
        decode_response(answer, None if n is None else str(n))["y"], x * 2
    )
