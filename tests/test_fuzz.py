"""A property-based fuzzer over the infer routes, against one real server on the real repository.

Hypothesis draws hostile requests of every kind the infer routes take — v2 JSON tensors, v2
binary tensors (Triton's extension, with lying lengths and sizes), gzip / deflate bodies (corrupt,
mislabelled, and small bombs), v1 `:predict` bodies, and odd model names and versions in the URL
— and checks the server's contract for each: never a 5xx; every 4xx a JSON `{"error": "..."}`;
every 200 a well-formed answer; and afterwards the server still answers `/v2/health/live`.

Bounded for CI: a fixed number of examples per property, derandomized (the same requests every
run), a per-example deadline, and a 1 MiB body limit so that bombs and oversized bodies stay cheap.
"""

from __future__ import annotations

import gzip
import json
import math
import struct
import zlib
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.codec import NP_TYPES
from tests.conftest import run_server

pytestmark = pytest.mark.e2e

MAX_BODY = 1 << 20
#: Model -> (input name, declared shape) of the real repository.
MODELS = {
    "cnn": ("image", [-1, 1, 28, 28]),
    "lstm": ("series", [-1, -1, 1]),
    "autoencoder": ("image", [-1, 1, 28, 28]),
}
DATATYPES = [*NP_TYPES, "FP8", "fp32", "", "BF16", "STRING"]

FUZZ = settings(
    max_examples=250,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def client(repository, tmp_path_factory):
    """A keep-alive client on one real server (default settings, 1 MiB body limit)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    env = {"ONNXSERVE_MAX_BODY_BYTES": str(MAX_BODY)}
    with (
        run_server(repository, tmp, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield http
        assert http.get("/v2/health/live").status_code == 200, server.output()[-3000:]
        assert "Traceback" not in server.output(), server.output()[-3000:]  # nothing swallowed


def check(
    resp: httpx.Response, request: str, timeout_asked: bool = False, infer: bool = True
) -> None:
    """The contract: no 5xx; a 4xx has a JSON error body; a 200 a well-formed (infer) answer.

    A 504 is the protocol's answer to a request whose own `timeout` parameter ran out before it
    was run, so it is accepted only when the request set one."""
    status = resp.status_code
    where = f"{resp.request.method} {resp.request.url.raw_path[:200]!r} {request[:600]}"
    assert status < 500 or (status == 504 and timeout_asked), (
        f"{status} {resp.text[:300]} for {where}"
    )
    if status >= 400:
        assert resp.headers.get("content-type", "").startswith("application/json"), where
        body = resp.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), str), (status, where)
        return
    assert status == 200, f"{status} for {where}"
    head = resp.headers.get("inference-header-content-length")
    doc = json.loads(resp.content[: int(head)] if head else resp.content)
    assert not infer or "outputs" in doc or "predictions" in doc, where


def _timeout_asked(doc: Any) -> bool:
    params = doc.get("parameters") if isinstance(doc, dict) else None
    return isinstance(params, dict) and "timeout" in params


def _dump(doc: Any) -> bytes:
    """JSON as a hostile client writes it: big integers, and NaN / Infinity literals, pass."""
    return json.dumps(doc, allow_nan=True).encode()


# -- pieces of requests ---------------------------------------------------------------------
def often(likely: st.SearchStrategy, rarely: st.SearchStrategy, odds: int = 5) -> st.SearchStrategy:
    """`likely` about `odds` times in `odds + 1`, else `rarely`: most requests get deep enough
    to reach the model, the rest probe each refusal."""
    return st.sampled_from(range(odds + 1)).flatmap(lambda k: rarely if k == odds else likely)


def seldom(draw: st.DrawFn, odds: int) -> bool:
    """True about once in `odds + 1` draws (Hypothesis favours small integers, so not `== 0`)."""
    return draw(st.sampled_from(range(odds + 1))) == odds


model_names = often(st.sampled_from(list(MODELS)), st.sampled_from(["nope", "CNN", "..", "%2F"]))
versions = st.one_of(
    st.none(),
    st.sampled_from(["1", "2", "0", "3", "-1", "01", "1.0", "+1", " 1", "\u0663", "1e3", ".."]),
    st.integers(0, 10**30).map(str),
    st.integers(1, 6000).map(lambda n: "9" * n),  # Python's int() refuses over 4,300 digits
    st.text(min_size=1, max_size=30),
)
dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([1, 28, 1024, 1025, 4096, 4097, 2**31, 2**32 + 1, 2**63 - 1, 2**64, 10**30]),
    st.integers(-3, -1),
    st.integers(0, 2**70),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-10, max_value=1e6),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
shapes = st.one_of(
    st.lists(dims, max_size=8),
    st.lists(st.integers(0, 3), min_size=30, max_size=100),  # ranks past NumPy's 64
    st.just([]),
    st.text(max_size=5),
    st.integers(),
)
scalars = st.one_of(
    st.floats(width=32),
    st.floats(),  # NaN, infinities, values that overflow FP32
    st.integers(-(2**70), 2**70),
    st.sampled_from([1e39, -1e39, 3.5e38, 5e-324, 0, 1, True, False, None, "1", "x", "NaN"]),
)
parameters = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["binary_data_output", "timeout", "priority", "x", "binary_data_size"]),
        scalars | st.lists(scalars, max_size=3) | st.dictionaries(st.text(max_size=3), scalars),
        max_size=3,
    ),
    scalars,
)


@st.composite
def tensors(draw: st.DrawFn, model: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """An input spec: mostly near-legal (the model's own name, datatype and a shape it could
    take, with data that fits or almost fits), sometimes anything. Returns the spec and the
    array it describes (None when the spec is junk)."""
    name, declared = MODELS.get(model, ("image", [-1, 1, 28, 28]))
    if seldom(draw, 9):  # anything at all
        spec = {
            "name": draw(st.sampled_from([name, "x", ""]) | st.text(max_size=5) | st.none()),
            "datatype": draw(st.sampled_from(DATATYPES) | st.integers()),
            "shape": draw(shapes),
        }
        if draw(st.booleans()):
            spec["data"] = draw(st.lists(scalars, max_size=8) | scalars)
        return spec, None
    rows = draw(often(st.integers(1, 3), st.sampled_from([0, 4097, 2**40])))
    window = draw(often(st.integers(1, 40), st.sampled_from([0, 1024, 1025, 5000, 2**33])))
    shape = [
        rows if d == -1 and i == 0 else window if d == -1 else d for i, d in enumerate(declared)
    ]
    if seldom(draw, 5):  # one dimension off
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(dims)
    datatype = draw(often(st.just("FP32"), st.sampled_from(["FP16", "FP64", "INT64", "BYTES"])))
    spec = {
        "name": draw(often(st.just(name), st.just("x"), 9)),
        "datatype": datatype,
        "shape": shape,
    }
    count = math.prod(shape) if all(type(d) is int and d >= 0 for d in shape) else -1
    if not 0 <= count <= 20_000:
        spec["data"] = draw(st.lists(scalars, max_size=4))
        return spec, None
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if datatype == "BYTES":
        array = np.array([f"s{i}" for i in range(count)], dtype=object).reshape(shape)
    else:
        array = rng.random(count).astype(NP_TYPES[datatype]).reshape(shape)
    spec["array"] = array
    return spec, array


def _json_data(spec: dict[str, Any], draw: st.DrawFn) -> None:
    """Give a near-legal spec its JSON `data`, perhaps with one hostile element or length."""
    array = spec.pop("array")
    flat = array.ravel().tolist()
    damage = draw(
        often(st.just("none"), st.sampled_from(["element", "short", "long", "nested"]), 2)
    )
    if damage == "element" and flat:
        flat[draw(st.integers(0, len(flat) - 1))] = draw(scalars | st.lists(scalars, max_size=2))
    elif damage == "short":
        flat = flat[: draw(st.integers(0, max(0, len(flat) - 1)))]
    elif damage == "long":
        flat = flat + [0.0] * draw(st.integers(1, 3))
    elif damage == "nested":
        spec["data"] = array.tolist()
        return
    spec["data"] = flat


@st.composite
def v2_json(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], bool]:
    """A v2 JSON request: path, body, headers, and whether it set a `timeout` parameter."""
    model = draw(model_names)
    doc: dict[str, Any] = {}
    specs = []
    for _ in range(draw(often(st.just(1), st.integers(0, 3)))):
        spec, array = draw(tensors(model))
        if array is not None:
            _json_data(spec, draw)
        specs.append(spec)
    doc["inputs"] = draw(often(st.just(specs), st.sampled_from([None, {}, "x", [1], [[]]]), 9))
    if draw(st.booleans()):
        doc["parameters"] = draw(parameters)
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["label", "probabilities", "forecast", "score", "x"])},
                    optional={"parameters": parameters},
                ),
                max_size=3,
            )
            | scalars
        )
    if draw(st.booleans()):
        doc["id"] = draw(scalars | st.text(max_size=20) | st.lists(scalars, max_size=2))
    path = f"/v2/models/{quote(model, safe='')}/infer"
    return path, _dump(doc), {"Content-Type": "application/json"}, _timeout_asked(doc)


def _bytes_blob(array: np.ndarray) -> bytes:
    parts = []
    for value in array.ravel().tolist():
        raw = str(value).encode()
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts)


@st.composite
def v2_binary(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], bool]:
    """A v2 binary request: a JSON header, then tensors, with any of the lengths lying."""
    model = draw(model_names)
    specs, blobs = [], []
    for _ in range(draw(often(st.just(1), st.just(2)))):
        spec, array = draw(tensors(model))
        spec.pop("array", None)
        spec.pop("data", None)
        if array is None:
            blob = draw(st.binary(max_size=64))
        elif array.dtype.kind == "O":
            blob = _bytes_blob(array)
        else:
            blob = array.tobytes()
            if blob and seldom(draw, 5):  # NaN / inf bit patterns
                raw = bytearray(blob)
                at = draw(st.integers(0, len(raw) - 1))
                raw[at : at + 4] = draw(st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f"]))
                blob = bytes(raw[: len(blob)])
        if seldom(draw, 7):
            blob = blob[: draw(st.integers(0, len(blob)))] + draw(st.binary(max_size=8))
        size: Any = len(blob)
        if seldom(draw, 7):
            size = draw(
                st.integers(-5, 2**70) | st.sampled_from([None, "4", 1.5, True, [4]]) | st.just(0)
            )
        spec["parameters"] = {"binary_data_size": size}
        specs.append(spec)
        blobs.append(blob)
    doc: dict[str, Any] = {"inputs": specs}
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    head = _dump(doc)
    body = head + b"".join(blobs) + draw(often(st.just(b""), st.binary(min_size=1, max_size=8)))
    length: Any = len(head)
    if seldom(draw, 7):
        length = draw(
            st.integers(-10, len(body) + 10)
            | st.sampled_from(["", "x", "-0", "+5", "5_0", "1e3", "0x10", "9" * 5000, "\xd9\xa3"])
        )
    headers = {"Content-Type": "application/octet-stream"}
    headers["Inference-Header-Content-Length"] = str(length)
    path = f"/v2/models/{quote(model, safe='')}/infer"
    return path, body, headers, False


def _compress(raw: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(raw, compresslevel=6)
    if how == "zlib":
        return zlib.compress(raw)
    deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, no zlib header
    return deflater.compress(raw) + deflater.flush()


@st.composite
def compressed(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], bool]:
    """A gzip / deflate body: a real request compressed, corrupted, mislabelled, or a bomb."""
    kind = draw(st.sampled_from(["json", "json", "binary", "bomb", "garbage"]))
    if kind == "bomb":  # inflates past the body limit from a few KiB
        path = f"/v2/models/{draw(model_names)}/infer"
        raw = b"0," * draw(st.sampled_from([MAX_BODY // 2 + 1, MAX_BODY, 8 * MAX_BODY]))
        raw = b'{"inputs":[{"name":"image","shape":[1],"datatype":"FP32","data":[' + raw
        headers, asked = {"Content-Type": "application/json"}, False
    elif kind == "garbage":
        path, raw = "/v2/models/cnn/infer", draw(st.binary(max_size=200))
        headers, asked = {"Content-Type": "application/json"}, False
    else:
        path, raw, headers, asked = draw(v2_json() if kind == "json" else v2_binary())
    how = draw(st.sampled_from(["gzip", "zlib", "raw"]))
    body = _compress(raw, how)
    if seldom(draw, 4):
        cut = draw(st.integers(0, len(body)))
        body = body[:cut] + draw(st.binary(max_size=16))
    encoding = {"gzip": "gzip", "zlib": "deflate", "raw": "deflate"}[how]
    if seldom(draw, 4):
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "identity", "GZIP", "gzip, x"]))
    return path, body, {**headers, "Content-Encoding": encoding}, asked


@st.composite
def v1_predict(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], bool]:
    """A v1 `{"instances": [...]}` body, rows right, wrong, ragged, nested or non-numeric."""
    model = draw(model_names)
    name, declared = MODELS.get(model, ("image", [-1, 1, 28, 28]))
    size = draw(st.sampled_from([math.prod(declared[1:]) if -1 not in declared[1:] else 7]))
    size = draw(often(st.just(size), st.integers(0, 30) | st.just(1025), 3))
    rows = draw(often(st.integers(1, 3), st.just(0)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    instances: list[Any] = [rng.random(size).tolist() for _ in range(rows)]
    damage = draw(
        often(st.just("none"), st.sampled_from(["element", "ragged", "dicts", "junk"]), 2)
    )
    if damage == "element" and instances and size:
        instances[0][draw(st.integers(0, size - 1))] = draw(scalars | st.lists(scalars, max_size=2))
    elif damage == "ragged" and instances:
        instances[-1] = instances[-1][: max(0, size - 1)]
    elif damage == "dicts":
        key = draw(st.sampled_from([name, "x"]))
        instances = [{key: row} if draw(st.booleans()) else row for row in instances]
    elif damage == "junk":
        instances = draw(st.lists(scalars | st.lists(scalars, max_size=3), max_size=4))
    doc: Any = {"instances": instances}
    if seldom(draw, 5):
        doc = draw(st.sampled_from([{"instances": None}, {"inputs": instances}, [], "x", {}]))
    version = draw(often(st.none(), versions, 3))
    path = f"/v1/models/{quote(model, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    return path + ":predict", _dump(doc), {"Content-Type": "application/json"}, False


def _send(client: httpx.Client, request: tuple[str, bytes, dict[str, str], bool]) -> None:
    path, body, headers, asked = request
    raw_headers = {k: v.encode("latin-1") for k, v in headers.items()}  # any bytes may go
    resp = client.post(path, content=body, headers=raw_headers)
    check(resp, f"{headers} {body[:400]!r}", asked)


@FUZZ
@given(request=v2_json())
def test_v2_json_bodies(client, request):
    _send(client, request)


@settings(FUZZ, max_examples=200)
@given(request=v2_binary())
def test_v2_binary_bodies(client, request):
    _send(client, request)


@settings(FUZZ, max_examples=120)
@given(request=compressed())
def test_compressed_bodies_and_bombs(client, request):
    _send(client, request)


@settings(FUZZ, max_examples=150)
@given(request=v1_predict())
def test_v1_predict_bodies(client, request):
    _send(client, request)


@settings(FUZZ, max_examples=150)
@given(
    model=model_names | st.text(max_size=10),
    version=versions,
    route=st.sampled_from(["infer", "predict", "metadata", "ready"]),
    body=st.sampled_from([b"{}", b'{"inputs":[]}', b'{"instances":[[0.5]]}', b"\xff", b""]),
)
def test_odd_model_names_and_versions_in_the_url(client, model, version, route, body):
    base = f"/v2/models/{quote(model, safe='')}"
    if version is not None:
        base += f"/versions/{quote(version, safe='')}"
    if route == "predict":
        v1 = f"/v1/models/{quote(model, safe='')}"
        v1 += "" if version is None else f"/versions/{quote(version, safe='')}"
        resp = client.post(v1 + ":predict", content=body)
    elif route == "infer":
        resp = client.post(base + "/infer", content=body)
    else:
        resp = client.get(base + ("/ready" if route == "ready" else ""))
    if resp.status_code == 404 and not resp.content:
        pytest.fail(f"404 without a body for {resp.request.url}")
    check(resp, f"{route} {body!r}", infer=route in ("infer", "predict"))
