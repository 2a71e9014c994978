"""End to end: a real `onnxserve serve` process over the real repository, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest

from service.codec import decode_response, encode_request
from tests.conftest import MODELS, latest_version, run_server, samples

pytestmark = pytest.mark.e2e

INPUT = {"cnn": "image", "autoencoder": "image", "lstm": "series"}


def reference(repository, model: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """What in-process ONNX Runtime answers for the same model file and input."""
    sess = ort.InferenceSession(str(latest_version(repository, model) / "model.onnx"))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {INPUT[model]: x}), strict=True))


def v2_json(name: str, x: np.ndarray, **extra) -> dict:
    return {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
        ],
        **extra,
    }


def decode(resp: httpx.Response) -> dict[str, np.ndarray]:
    """Outputs of a v2 answer, JSON or binary."""
    return decode_response(resp.content, resp.headers.get("inference-header-content-length"))


# -- metadata and health ------------------------------------------------------------------
def test_server_metadata_and_health(server):
    meta = httpx.get(f"{server.url}/v2").json()
    assert meta["name"] == "onnxserve"
    assert {"model_repository", "binary_tensor_data"} <= set(meta["extensions"])
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True, "error": None}


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_matches_the_config(server, repository, model):
    config = orjson.loads((repository / model / "config.json").read_bytes())
    meta = httpx.get(f"{server.url}/v2/models/{model}").json()
    assert meta["name"] == model and meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]] == [i["name"] for i in config["inputs"]]
    assert [o["shape"] for o in meta["outputs"]] == [o["shape"] for o in config["outputs"]]
    assert meta["parameters"]["provider"] == "CPUExecutionProvider"
    assert meta["parameters"]["batching"]["max_batch_size"] >= 1
    version = meta["versions"][-1]
    assert httpx.get(f"{server.url}/v2/models/{model}/versions/{version}").json()["name"] == model
    assert httpx.get(f"{server.url}/v2/models/{model}/ready").json()["ready"] is True
    ready = httpx.get(f"{server.url}/v2/models/{model}/versions/{version}/ready")
    assert ready.status_code == 200


# -- inference equals in-process ONNX Runtime ----------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_v2_json_equals_in_process_onnxruntime(server, repository, model):
    x = samples(repository, model)[:8]
    resp = httpx.post(f"{server.url}/v2/models/{model}/infer", json=v2_json(INPUT[model], x))
    assert resp.status_code == 200, resp.text
    got, want = decode(resp), reference(repository, model, x)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_v2_binary_in_and_out(server, repository):
    x = samples(repository, "cnn")[:5].astype(np.float32)
    head = orjson.dumps(
        {
            "inputs": [
                {"name": "image", "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": x.nbytes}},
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                        {"name": "label", "parameters": {"binary_data": False}}],
        }
    )  # fmt: skip
    resp = httpx.post(
        f"{server.url}/v2/models/cnn/infer",
        content=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/octet-stream"
    got, want = decode(resp), reference(repository, "cnn", x)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["label"], want["label"])


def test_id_parameters_timing_and_output_subset(server, repository):
    x = samples(repository, "cnn")[:1]
    body = v2_json(
        "image", x, id="req-42", parameters={"trace": "abc"}, outputs=[{"name": "label"}]
    )
    resp = httpx.post(f"{server.url}/v2/models/cnn/infer", json=body)
    doc = resp.json()
    assert doc["id"] == "req-42" and doc["model_name"] == "cnn"
    assert [o["name"] for o in doc["outputs"]] == ["label"]
    assert doc["parameters"]["trace"] == "abc"
    assert doc["parameters"]["batch_size"] >= 1
    assert doc["parameters"]["provider"] == "CPUExecutionProvider"
    timing = resp.headers["server-timing"]
    assert re.fullmatch(r"queue;dur=[\d.]+, compute;dur=[\d.]+, total;dur=[\d.]+", timing)


async def test_concurrent_callers_each_get_their_own_rows_and_outputs(server, repository):
    xs = samples(repository, "cnn")[:48]
    want = reference(repository, "cnn", xs)
    before = httpx.get(f"{server.url}/metrics").text
    wanted_outputs = [["label"], ["probabilities"], ["label", "probabilities"]]

    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

        async def one(i):
            outs = [{"name": n} for n in wanted_outputs[i % 3]]
            r = await client.post(
                "/v2/models/cnn/infer", json=v2_json("image", xs[i : i + 1], outputs=outs)
            )
            assert r.status_code == 200, r.text
            return decode(r)

        results = await asyncio.gather(*(one(i) for i in range(len(xs))))
    for i, got in enumerate(results):
        assert sorted(got) == sorted(wanted_outputs[i % 3])
        if "label" in got:
            assert got["label"][0] == want["label"][i]
        if "probabilities" in got:
            np.testing.assert_allclose(got["probabilities"][0], want["probabilities"][i], atol=1e-6)
    after = httpx.get(f"{server.url}/metrics").text
    rows = _metric(after, "onnxserve_inference_count_total", "cnn") - _metric(
        before, "onnxserve_inference_count_total", "cnn"
    )
    execs = _metric(after, "onnxserve_inference_exec_count_total", "cnn") - _metric(
        before, "onnxserve_inference_exec_count_total", "cnn"
    )
    assert rows == len(xs)
    assert execs <= rows


async def test_lstm_windows_of_different_lengths_each_get_their_forecast(server, repository):
    series = samples(repository, "lstm")
    windows = [series[i : i + 1, : 8 + 11 * (i % 5)] for i in range(20)]
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        resps = await asyncio.gather(
            *(client.post("/v2/models/lstm/infer", json=v2_json("series", w)) for w in windows)
        )
    for w, r in zip(windows, resps, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(
            decode(r)["forecast"], reference(repository, "lstm", w)["forecast"], rtol=1e-5
        )


# -- v1 ------------------------------------------------------------------------------------
def test_v1_cnn_gives_labels_and_probabilities(server, repository):
    x = samples(repository, "cnn")[:4]
    resp = httpx.post(f"{server.url}/v1/models/cnn:predict", json={"instances": x.tolist()})
    assert resp.status_code == 200, resp.text
    preds = resp.json()["predictions"]
    want = reference(repository, "cnn", x)
    for p, probs in zip(preds, want["probabilities"], strict=True):
        assert p["label"] == str(int(probs.argmax()))
        np.testing.assert_allclose(p["probabilities"], probs, atol=1e-6)
        assert abs(sum(p["probabilities"]) - 1) < 1e-4


def test_v1_autoencoder_flags_corrupted_digits(server, repository):
    clean = samples(repository, "autoencoder")[:16]
    rng = np.random.default_rng(0)
    noisy = clean.copy()
    mask = rng.random(noisy.shape) < 0.3
    noisy[mask] = rng.integers(0, 2, mask.sum()).astype(np.float32)
    threshold = orjson.loads((repository / "autoencoder" / "config.json").read_bytes())["threshold"]
    preds = httpx.post(
        f"{server.url}/v1/models/autoencoder:predict",
        json={"instances": np.concatenate([clean, noisy]).tolist()},
    ).json()["predictions"]
    scores = np.array([p["score"] for p in preds])
    assert all(p["is_anomaly"] == (p["score"] > threshold) for p in preds)
    np.testing.assert_allclose(
        scores[:16], reference(repository, "autoencoder", clean)["score"], rtol=1e-5
    )
    assert sum(p["is_anomaly"] for p in preds[16:]) > sum(p["is_anomaly"] for p in preds[:16])


def test_v1_lstm_forecast_is_in_ppm(server, repository):
    w = samples(repository, "lstm")[:3, :52]
    preds = httpx.post(
        f"{server.url}/v1/models/lstm:predict", json={"instances": w[:, :, 0].tolist()}
    ).json()["predictions"]
    want = reference(repository, "lstm", w)["forecast"][:, 0]
    np.testing.assert_allclose([p["forecast"] for p in preds], want, rtol=1e-5)
    assert all(abs(p["forecast"] - last) < 5 for p, last in zip(preds, w[:, -1, 0], strict=True))


# -- errors: each case, and never a 500 ----------------------------------------------------
def _cnn_body(**tensor) -> dict:
    base = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    return {"inputs": [{**base, **tensor}]}


ERROR_CASES = [
    ("malformed JSON", "/v2/models/cnn/infer", b"{nope", 400, "malformed JSON"),
    ("unknown input", "/v2/models/cnn/infer", _cnn_body(name="pix"), 400, "unknown input 'pix'"),
    ("missing input", "/v2/models/cnn/infer", {"inputs": []}, 400, "non-empty 'inputs'"),
    ("datatype", "/v2/models/cnn/infer", _cnn_body(datatype="FP64"), 400, "takes FP32"),
    ("count", "/v2/models/cnn/infer", _cnn_body(data=[0.0] * 783), 400, "needs 784 elements"),
    ("rank", "/v2/models/cnn/infer", _cnn_body(shape=[1, 784], data=[0.0] * 784), 400, "rank 2"),
    ("dimension", "/v2/models/cnn/infer", _cnn_body(shape=[1, 1, 28, 27], data=[0.0] * 756), 400,
     "dimension 3 is 27"),
    ("output", "/v2/models/cnn/infer", {**_cnn_body(), "outputs": [{"name": "nope"}]}, 400,
     "unknown output 'nope'"),
    ("model", "/v2/models/resnet/infer", _cnn_body(), 404, "unknown model 'resnet'"),
    ("version", "/v2/models/cnn/versions/999/infer", _cnn_body(), 404, "no version 999"),
    ("version text", "/v2/models/cnn/versions/abc/infer", _cnn_body(), 400, "positive integer"),
    ("v1 shape", "/v1/models/cnn:predict", {"instances": [[1.0, 2.0]]}, 400, "cannot be shaped"),
    ("v1 body", "/v1/models/cnn:predict", {"rows": []}, 400, "instances"),
    ("v1 text", "/v1/models/lstm:predict", {"instances": [["a", "b"]]}, 400, "FP32 numbers"),
    ("short window", "/v2/models/lstm/infer",
     {"inputs": [{"name": "series", "shape": [1, 1, 1], "datatype": "FP32", "data": [300.0]}]},
     400, ""),
    ("metadata", "/v2/models/resnet", None, 404, "unknown model"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "path", "body", "status", "message"), ERROR_CASES)
def test_errors_are_clear_4xx(server, case, path, body, message, status):
    if body is None:
        resp = httpx.get(server.url + path)
    elif isinstance(body, bytes):
        resp = httpx.post(server.url + path, content=body)
    else:
        resp = httpx.post(server.url + path, json=body)
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]


def test_body_over_the_limit_is_413(server):
    resp = httpx.post(f"{server.url}/v2/models/cnn/infer", content=b"x" * 2_100_000)
    assert resp.status_code == 413
    assert "limit" in resp.json()["error"]


def test_model_control_is_refused_in_the_default_mode(server):
    for action in ("load", "unload"):
        resp = httpx.post(f"{server.url}/v2/repository/models/cnn/{action}")
        assert resp.status_code == 403, resp.text
        assert "--api-keys-file" in resp.json()["error"]
    assert httpx.post(f"{server.url}/v2/models/cnn/infer", json=_cnn_body()).status_code == 200


def test_unloaded_model_is_503_until_loaded_again(repository, tmp_path):
    explicit = ("--model-control-mode", "explicit", "--load-model", "*", "--unsafe-anonymous-admin")
    with run_server(repository, tmp_path, *explicit) as srv:
        _unload_and_reload(srv.url)


def _unload_and_reload(url: str) -> None:
    assert httpx.post(f"{url}/v2/repository/models/autoencoder/unload", json={}).status_code == 200
    try:
        index = {e["name"]: e["state"] for e in httpx.post(f"{url}/v2/repository/index").json()}
        assert index["autoencoder"] == "UNLOADED" and index["cnn"] == "READY"
        resp = httpx.post(f"{url}/v2/models/autoencoder/infer", json=_cnn_body())
        assert resp.status_code == 503 and "not loaded" in resp.json()["error"]
        assert httpx.get(f"{url}/v2/models/autoencoder/ready").status_code == 503
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        loaded = httpx.post(f"{url}/v2/repository/models/autoencoder/load", json={}, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["state"] == "READY"
    assert httpx.post(f"{url}/v2/models/autoencoder/infer", json=_cnn_body()).status_code == 200
    assert httpx.post(f"{url}/v2/repository/models/nope/load", json={}).status_code == 404
    # reloading a loaded model swaps it in place; its gauges stay with the new one
    reloaded = httpx.post(f"{url}/v2/repository/models/autoencoder/load", json={}, timeout=60)
    assert reloaded.status_code == 200 and httpx.get(f"{url}/v2/health/ready").status_code == 200
    text = httpx.get(f"{url}/metrics").text
    provider = {"provider": "CPUExecutionProvider"}
    assert _metric(text, "onnxserve_model_provider", "autoencoder", **provider) == 1
    assert "onnxserve_pending_request_count{" in text


def test_overload_refuses_fast_and_times_out_queued_requests(repository, tmp_path):
    overrides = '{"lstm": {"max_batch_size": 1, "max_queue_size": 3, "max_dim": 4000}}'
    long_window = np.linspace(300, 420, 4000, dtype=np.float32).reshape(1, -1, 1)
    body = orjson.dumps(v2_json("series", long_window))
    timed = orjson.dumps(v2_json("series", long_window, parameters={"timeout": 2000}))

    async def flood(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            send = [client.post("/v2/models/lstm/infer", content=timed if i % 2 else body)
                    for i in range(40)]  # fmt: skip
            return await asyncio.gather(*send)

    with run_server(repository, tmp_path, env={"ONNXSERVE_MODEL_OVERRIDES": overrides}) as srv:
        resps = asyncio.run(flood(srv.url))
        metrics = httpx.get(f"{srv.url}/metrics").text
    codes = [r.status_code for r in resps]
    assert 500 not in codes
    assert set(codes) <= {200, 503, 504}, codes
    assert 503 in codes and 504 in codes and 200 in codes, codes
    for r in resps:
        if r.status_code == 503:
            assert r.headers["retry-after"] and "queue is full" in r.json()["error"]
        if r.status_code == 504:
            assert "was not run" in r.json()["error"]
    assert 'reason="queue_full"' in metrics and 'reason="timeout"' in metrics


# -- metrics -------------------------------------------------------------------------------
def _metric(text: str, name: str, model: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_follow_triton_names(server, repository):
    x = samples(repository, "cnn")[:2]
    httpx.post(f"{server.url}/v2/models/cnn/infer", json=v2_json("image", x))
    httpx.post(f"{server.url}/v2/models/cnn/infer", json=_cnn_body(datatype="FP64"))
    text = httpx.get(f"{server.url}/metrics").text
    assert _metric(text, "onnxserve_request_success_total", "cnn") >= 1
    assert _metric(text, "onnxserve_request_failure_total", "cnn", reason="bad_request") >= 1
    assert _metric(text, "onnxserve_inference_count_total", "cnn") >= 2
    assert _metric(text, "onnxserve_inference_exec_count_total", "cnn") >= 1
    for hist in ("request_duration_seconds", "queue_duration_seconds",
                 "compute_infer_duration_seconds", "batch_size"):  # fmt: skip
        assert _metric(text, f"onnxserve_{hist}_count", "cnn") >= 1, hist
    assert "onnxserve_pending_request_count{" in text
    assert _metric(text, "onnxserve_model_provider", "cnn", provider="CPUExecutionProvider") == 1


def _binary_series(window: np.ndarray) -> tuple[bytes, dict[str, str]]:
    body, head = encode_request({"series": window}, binary_output=False)
    return body, {"Inference-Header-Content-Length": str(head)}


def test_a_client_that_hangs_up_is_never_computed(repository, tmp_path):
    short_body = orjson.dumps(v2_json("series", samples(repository, "lstm")[:1]))
    overrides = '{"lstm": {"max_batch_size": 1, "max_dim": 2000000, "max_elements": 2000000}}'

    async def scenario(url: str) -> int:
        host, port = url.removeprefix("http://").split(":")
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            # size a request that keeps the only instance busy for about a second
            probe = np.linspace(300, 420, 20_000, dtype=np.float32).reshape(1, -1, 1)
            body, headers = _binary_series(probe)
            r = await client.post("/v2/models/lstm/infer", content=body, headers=headers)
            ms = float(re.search(r"compute;dur=([\d.]+)", r.headers["server-timing"])[1])
            steps = int(min(2_000_000, 20_000 * max(1.0, 1000 / ms)))
            long = np.linspace(300, 420, steps, dtype=np.float32).reshape(1, -1, 1)
            body, headers = _binary_series(long)
            busy = asyncio.ensure_future(
                client.post("/v2/models/lstm/infer", content=body, headers=headers)
            )
            await asyncio.sleep(0.3)  # the long request now holds the only instance
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v2/models/lstm/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n" % len(short_body) + short_body
            )
            await writer.drain()
            writer.close()  # hang up while the request waits in the queue
            await writer.wait_closed()
            return (await busy).status_code

    with run_server(repository, tmp_path, env={"ONNXSERVE_MODEL_OVERRIDES": overrides}) as srv:
        assert asyncio.run(scenario(srv.url)) == 200
        after = httpx.get(f"{srv.url}/metrics").text
    assert _metric(after, "onnxserve_request_failure_total", "lstm", reason="cancelled") == 1
    assert _metric(after, "onnxserve_inference_count_total", "lstm") == 2, "it was computed"
