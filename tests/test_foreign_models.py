"""Models onnxserve did not train, dropped into a repository with no config.json, served by the
real server and checked against in-process ONNX Runtime through `tritonclient`, JSON and binary."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from service.model_config import latest_version_dir
from tests import foreign
from tests.conftest import run_server
from tests.test_app import client_for

pytestmark = pytest.mark.e2e


def reference(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


@pytest.fixture(scope="module")
def foreign_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("foreign")
    foreign.iris_pipeline(root / "iris" / "1" / "model.onnx")
    foreign.two_inputs(root / "two_inputs" / "1" / "model.onnx")
    foreign.fixed_shape(root / "fixed" / "1" / "model.onnx")
    foreign.half(root / "half" / "1" / "model.onnx")
    foreign.ragged(root / "ragged" / "1" / "model.onnx")
    # a partial config: batching knobs and a description, the rest from the graph
    partial = {"description": "two inputs", "batching": {"max_batch_size": 8}}
    (root / "two_inputs" / "config.json").write_text(json.dumps(partial))
    # a config that contradicts its graph, and a file that is not ONNX
    foreign.half(root / "contradicts" / "1" / "model.onnx")
    wrong = {"inputs": [{"name": "x", "datatype": "FP32"}]}
    (root / "contradicts" / "config.json").write_text(json.dumps(wrong))
    (root / "corrupt" / "1").mkdir(parents=True)
    (root / "corrupt" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    return root


@pytest.fixture(scope="module")
def served(foreign_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("foreign-server")
    with run_server(foreign_repo, tmp, "--strict-readiness", "false") as server:
        yield server


@pytest.fixture(scope="module")
def client(served):
    c = httpclient.InferenceServerClient(served.url.removeprefix("http://"))
    yield c
    c.close()


def _infer(client, model: str, inputs: dict[str, np.ndarray], binary: bool) -> dict:
    tensors = []
    for name, array in inputs.items():
        datatype = "BYTES" if array.dtype == object else _OIP[array.dtype]
        t = httpclient.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array, binary_data=binary)
        tensors.append(t)
    meta = client.get_model_metadata(model)
    outputs = [
        httpclient.InferRequestedOutput(o["name"], binary_data=binary) for o in meta["outputs"]
    ]
    result = client.infer(model, tensors, outputs=outputs)
    return {o["name"]: result.as_numpy(o["name"]) for o in meta["outputs"]}


_OIP = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.int64): "INT64",
}

CASES = {
    "iris": lambda: {"X": foreign.iris_inputs(12)},
    "two_inputs": lambda: {
        "x": np.arange(15, dtype=np.float32).reshape(5, 3),
        "k": np.arange(5, dtype=np.int64).reshape(5, 1),
    },
    "fixed": lambda: {"x": np.array([[-1, 2, -3], [4, -5, 6]], np.float32)},
    "half": lambda: {"x": np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)},
    "ragged": lambda: {"x": np.ones((2, 5, 2), np.float32)},
}


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("model", sorted(CASES))
def test_foreign_model_equals_in_process_onnxruntime(client, foreign_repo, model, binary):
    inputs = CASES[model]()
    got = _infer(client, model, inputs, binary)
    want = reference(latest_version_dir(foreign_repo / model) / "model.onnx", inputs)
    assert set(got) == set(want)
    for name, expected in want.items():
        if expected.dtype == object:  # strings: tritonclient gives bytes (binary) or str (JSON)
            text = [v.decode() if isinstance(v, bytes) else v for v in got[name].ravel()]
            assert text == list(expected.ravel())
        else:
            assert got[name].dtype == expected.dtype and got[name].shape == expected.shape
            np.testing.assert_allclose(got[name], expected, rtol=1e-6)


INFERRED = {
    "iris": (32, [("X", "FP32", [-1, 4])],
             [("label", "BYTES", [-1]), ("probabilities", "FP32", [-1, 3])]),
    "two_inputs": (8, [("x", "FP32", [-1, 3]), ("k", "INT64", [-1, 1])],
                   [("y", "FP32", [-1, 3]), ("k_next", "INT64", [-1, 1])]),
    "fixed": (0, [("x", "FP32", [2, 3])], [("y", "FP32", [2, 3])]),
    "half": (32, [("x", "FP16", [-1, 4])], [("y", "FP16", [-1, 4])]),
    "ragged": (32, [("x", "FP32", [-1, -1, 2])], [("y", "FP32", [-1, 2])]),
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(INFERRED))
def test_config_is_inferred_from_the_graph(served, client, model):
    max_batch, inputs, outputs = INFERRED[model]
    meta = client.get_model_metadata(model)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == inputs
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == outputs
    assert meta["parameters"]["batching"]["max_batch_size"] == max_batch
    assert "task" not in meta["parameters"]
    config = client.get_model_config(model)
    assert config["max_batch_size"] == max_batch and config["platform"] == "onnxruntime_onnx"
    dims = [t[2][1:] if max_batch else t[2] for t in inputs]
    assert [i["dims"] for i in config["input"]] == dims
    assert ("dynamic_batching" in config) == (max_batch > 0)
    if model == "iris":
        assert config["output"][0]["data_type"] == "TYPE_STRING"


def test_partial_config_is_completed(client):
    config = client.get_model_config("two_inputs")
    assert config["max_batch_size"] == 8
    assert [i["name"] for i in config["input"]] == ["x", "k"]
    assert json.loads(json.dumps(config["parameters"]["description"])) == {
        "string_value": "two inputs"
    }


def test_broken_models_are_listed_with_their_reason_while_the_others_serve(served):
    index = {e["name"]: e for e in httpx.post(f"{served.url}/v2/repository/index").json()}
    assert index["corrupt"]["state"] == "UNAVAILABLE" and index["corrupt"]["reason"]
    assert "/tmp" not in index["corrupt"]["reason"]  # no absolute server paths
    contradiction = index["contradicts"]["reason"]
    assert "inputs[0].datatype" in contradiction and "FP32" in contradiction
    assert "FP16" in contradiction
    assert all(index[m]["state"] == "READY" for m in CASES)
    r = httpx.post(f"{served.url}/v2/models/corrupt/infer", json={"inputs": []})
    assert r.status_code == 503 and r.json()["error"]
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200  # not strict
    log = served.output()
    assert "ERROR" in log and "corrupt" in log


async def test_strict_readiness_names_the_broken_model(foreign_repo, tmp_path):
    from service.config import Settings

    shutil.copytree(foreign_repo / "corrupt", tmp_path / "corrupt")
    shutil.copytree(foreign_repo / "half", tmp_path / "half")
    async with client_for(Settings(repository=tmp_path)) as c:
        ready = await c.get("/v2/health/ready")
        assert ready.status_code == 503 and "corrupt" in ready.json()["error"]
        assert (await c.get("/v2/models/half/ready")).status_code == 200


def test_concurrent_requests_of_different_lengths_get_their_own_rows(served):
    lengths = [1, 3, 7, 3, 12, 1, 5, 7] * 4

    async def send():
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as c:
            calls = []
            for i, t in enumerate(lengths):
                x = np.full((2, t, 2), i, np.float32)
                body = {"inputs": [{"name": "x", "shape": [2, t, 2], "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}  # fmt: skip
                calls.append(c.post("/v2/models/ragged/infer", json=body))
            return await asyncio.gather(*calls)

    answers = asyncio.run(send())
    for i, (t, resp) in enumerate(zip(lengths, answers, strict=True)):
        assert resp.status_code == 200, resp.text
        out = resp.json()["outputs"][0]
        assert out["shape"] == [2, 2] and out["data"] == [float(i * t)] * 4


def test_statistics_count_what_was_served(client):
    before = client.get_inference_statistics("half")["model_stats"][0]
    x = {"x": np.ones((3, 4), np.float16)}
    for _ in range(3):
        _infer(client, "half", x, binary=True)
    stats = client.get_inference_statistics("half")["model_stats"][0]
    assert stats["name"] == "half" and stats["version"] == "1"
    assert stats["inference_count"] - before["inference_count"] == 9
    assert stats["execution_count"] - before["execution_count"] == 3
    success = stats["inference_stats"]["success"]
    assert success["count"] - before["inference_stats"]["success"]["count"] == 3
    assert success["ns"] > 0 and stats["last_inference"] > 0
    assert any(b["batch_size"] == 3 for b in stats["batch_stats"])
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} >= set(CASES)


def test_v1_predict_on_a_model_without_a_task(served):
    rows = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    body = {"instances": [{"x": r, "k": [i + 2]} for i, r in enumerate(rows)]}
    r = httpx.post(f"{served.url}/v1/models/two_inputs:predict", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == [
        {"y": [2.0, 4.0, 6.0], "k_next": [3]},
        {"y": [12.0, 15.0, 18.0], "k_next": [4]},
    ]
    iris = httpx.post(
        f"{served.url}/v1/models/iris:predict",
        json={"instances": foreign.iris_inputs(2).tolist()},
    )
    assert iris.status_code == 200, iris.text
    first = iris.json()["predictions"][0]
    assert first["label"] == "setosa" and len(first["probabilities"]) == 3
