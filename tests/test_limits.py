"""Requests that ask too much, or ask it wrongly, are refused with a 4xx before work is done."""

from __future__ import annotations

import gzip

import httpx
import numpy as np
import orjson
import pytest

from service.codec import encode_request
from tests.conftest import samples

pytestmark = pytest.mark.e2e


def _v2(name: str, x: np.ndarray) -> bytes:
    return encode_request({name: x}, binary=False)[0]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models/cnn/versions/{v}/infer",
        "/v2/models/cnn/versions/{v}",
        "/v2/models/cnn/versions/{v}/ready",
        "/v2/models/cnn/versions/{v}/config",
        "/v2/models/cnn/versions/{v}/stats",
        "/v1/models/cnn/versions/{v}:predict",
    ],
)
def test_an_absurd_version_string_is_a_400(server, path):
    url = server.url + path.format(v="9" * 5000)
    method = httpx.post if path.endswith(("infer", "predict")) else httpx.get
    resp = method(url, **({"content": b"{}"} if method is httpx.post else {}))
    assert resp.status_code == 400, resp.text
    assert "version" in resp.json()["error"]


def test_a_rank_beyond_any_model_is_a_400_in_json_and_binary(server):
    shape = [1] * 70
    body = {"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": [0.5]}]}
    assert httpx.post(f"{server.url}/v2/models/cnn/infer", json=body).status_code == 400
    head = orjson.dumps(
        {"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                     "parameters": {"binary_data_size": 4}}]}
    )  # fmt: skip
    resp = httpx.post(
        f"{server.url}/v2/models/cnn/infer",
        content=head + b"\0\0\0\0",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert resp.status_code == 400 and "rank" in resp.json()["error"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_naming_the_input_and_index(server, repository, bad):
    x = samples(repository, "autoencoder")[:2].copy()
    x[1, 0, 3, 4] = bad
    body, n = encode_request({"image": x}, binary=True)
    resp = httpx.post(
        f"{server.url}/v2/models/autoencoder/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(n)},
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert "'image'" in error and "[1, 0, 3, 4]" in error and "non-finite" in error


def test_a_float_that_overflows_fp32_in_json_is_refused(server):
    body = (
        b'{"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [1e39'
    )
    body += b", 0.0" * 783 + b"]}]}"
    resp = httpx.post(f"{server.url}/v2/models/cnn/infer", content=body)
    assert resp.status_code == 400 and "[0, 0, 0, 0]" in resp.json()["error"]
    v1 = httpx.post(f"{server.url}/v1/models/lstm:predict", json={"instances": [[1e39, 2.0]]})
    assert v1.status_code == 400 and "non-finite" in v1.json()["error"]


def test_a_gzip_bomb_of_a_long_window_is_refused_before_compute(server):
    window = np.zeros((1, 4_000_000, 1), np.float32)
    raw, n = encode_request({"series": window}, binary=True)
    packed = gzip.compress(raw)
    assert len(packed) < 32_000
    resp = httpx.post(
        f"{server.url}/v2/models/lstm/infer",
        content=packed,
        headers={"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(n)},
    )
    assert resp.status_code in (400, 413), resp.text
    assert "max_dim" in resp.json()["error"] or "limit" in resp.json()["error"]


def test_limits_on_rows_and_dynamic_axes(server):
    long_window = np.ones((1, 1025, 1), np.float32) * 350
    resp = httpx.post(f"{server.url}/v2/models/lstm/infer", content=_v2("series", long_window))
    assert resp.status_code == 400 and "at most 1024" in resp.json()["error"]
    rows = np.zeros((4097, 1, 1, 1), np.float32)
    head = orjson.dumps(
        {"inputs": [{"name": "image", "shape": [4097, 1, 28, 28], "datatype": "FP32",
                     "parameters": {"binary_data_size": 4097 * 784 * 4}}]}
    )  # fmt: skip
    del rows
    resp = httpx.post(
        f"{server.url}/v2/models/cnn/infer",
        content=head,  # the body's tensor bytes are missing: refused before they are looked at
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert resp.status_code == 413 and "max_rows" in resp.json()["error"]


def test_a_maximal_legal_lstm_batch_leaves_no_memory_behind(server):
    import psutil

    proc = psutil.Process(server.process.pid)
    window = np.linspace(300, 420, 1024, dtype=np.float32)
    x = np.broadcast_to(window.reshape(1, -1, 1), (128, 1024, 1)).copy()
    body, n = encode_request({"series": x}, binary=True)
    post = lambda: httpx.post(  # noqa: E731
        f"{server.url}/v2/models/lstm/infer",
        content=body,
        headers={"Inference-Header-Content-Length": str(n)},
        timeout=60,
    )
    assert post().status_code == 200  # warm: the first such batch
    before = proc.memory_info().rss
    for _ in range(3):
        assert post().status_code == 200
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 200, f"RSS grew by {grown:.0f} MB"
    too_many = np.zeros((129, 1024, 1), np.float32)
    body, n = encode_request({"series": too_many}, binary=True)
    r = httpx.post(f"{server.url}/v2/models/lstm/infer", content=body,
                   headers={"Inference-Header-Content-Length": str(n)})  # fmt: skip
    assert r.status_code == 413 and "max_elements" in r.json()["error"]


def test_json_bodies_have_their_own_limit_and_binary_goes_further(repository, tmp_path):
    from tests.conftest import run_server

    x = np.zeros((600, 1, 28, 28), np.float32)  # ~2.4 MB as JSON, 1.9 MB as binary
    env = {"ONNXSERVE_MAX_JSON_BODY_BYTES": "1000000"}
    with run_server(repository, tmp_path, "--models", "cnn", env=env) as srv:
        url = f"{srv.url}/v2/models/cnn/infer"
        r = httpx.post(url, content=_v2("image", x))
        assert r.status_code == 413 and "binary" in r.json()["error"]
        packed = gzip.compress(_v2("image", x))
        r = httpx.post(url, content=packed, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413
        body, n = encode_request({"image": x}, binary=True)
        r = httpx.post(url, content=body, headers={"Inference-Header-Content-Length": str(n)})
        assert r.status_code == 200


@pytest.mark.parametrize("size", [784, 2000, 2001, 25088])
def test_non_finite_values_are_found_wherever_they_are(size):
    """Small inputs are checked in pieces that keep the GIL (see validation.GIL_KEPT_ELEMENTS):
    a bad value is found in any piece, at its edges too."""
    from service.errors import BadRequest
    from service.model_config import ModelConfig
    from service.validation import check_finite

    config = ModelConfig.model_validate(
        {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
         "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}]}
    )  # fmt: skip
    check_finite(config, {"x": np.zeros(size, np.float32)})
    for at in sorted({0, 499, 500, 999, 1000, size // 2, size - 1} & set(range(size))):
        for bad in (np.nan, np.inf, -np.inf):
            x = np.zeros(size, np.float32)
            x[at] = bad
            with pytest.raises(BadRequest, match=rf"at index \[{at}\]"):
                check_finite(config, {"x": x})
