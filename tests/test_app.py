"""The app in-process (httpx over ASGI): settings, the FastAPI routes beside the fast lane,
require_gpu readiness, and disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.dataplane import Answer
from service.transport import run_watching
from tests.conftest import samples

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def client_for(settings: Settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def cnn_body(repository, rows: int = 3) -> dict:
    x = samples(repository, "cnn")[:rows]
    return {
        "id": "same",
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                    "data": x.ravel().tolist()}],
    }  # fmt: skip


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ONNXSERVE_PORT", "9100")
    monkeypatch.setenv("ONNXSERVE_PROVIDERS", '["CPUExecutionProvider"]')
    monkeypatch.setenv("ONNXSERVE_MODEL_OVERRIDES", '{"cnn": {"max_batch_size": 4}}')
    monkeypatch.setenv("ONNXSERVE_DEFAULT_BATCHING", '{"max_queue_size": 9, "max_batch_size": 2}')
    s = Settings()
    assert s.port == 9100 and s.providers == ["CPUExecutionProvider"]
    assert s.batching_for("cnn").max_batch_size == 4
    assert s.batching_for("cnn").max_queue_size == 9
    assert s.batching_for("lstm").max_batch_size == 2


async def test_fastapi_routes_and_fast_lane_answer_alike(repository):
    base = {"repository": repository, "models": ["cnn"]}
    answers = []
    for lane in (True, False):
        async with client_for(Settings(**base, fast_lane=lane)) as client:
            r = await client.post("/v2/models/cnn/infer", json=cnn_body(repository))
            assert r.status_code == 200, r.text
            bad = await client.post("/v2/models/cnn/infer", content=b"{")
            assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
            v1 = await client.post("/v1/models/cnn:predict", json={"instances": [[0.0] * 784]})
            assert v1.status_code == 200
            doc = r.json()
            answers.append([(o["name"], o["data"]) for o in doc["outputs"]])
    assert answers[0] == answers[1]


async def test_openapi_documents_the_infer_routes(repository):
    async with client_for(Settings(repository=repository, models=["cnn"])) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/v2/models/{model}/infer" in paths and "/v1/models/{model}:predict" in paths
    body = paths["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(body)


async def test_batching_off_runs_single_rows(repository):
    async with client_for(Settings(repository=repository, models=["cnn"], batching=False)) as c:
        meta = (await c.get("/v2/models/cnn")).json()
        assert meta["parameters"]["batching"]["max_batch_size"] == 1


async def test_require_gpu_on_a_cpu_machine_fails_readiness_with_the_reason(repository):
    async with client_for(Settings(repository=repository, models=["cnn"], require_gpu=True)) as c:
        ready = await c.get("/v2/models/cnn/ready")
        assert ready.status_code == 503
        assert "require_gpu" in ready.json()["error"]
        assert (await c.get("/v2/health/ready")).status_code == 503
        infer = await c.post("/v2/models/cnn/infer", json=cnn_body(repository, 1))
        assert infer.status_code == 503 and "CPUExecutionProvider" in infer.json()["error"]
        index = {e["name"]: e for e in (await c.post("/v2/repository/index")).json()}
        assert index["cnn"]["state"] == "UNAVAILABLE" and "require_gpu" in index["cnn"]["reason"]
        assert index["lstm"]["state"] == "UNLOADED"


async def test_a_broken_config_leaves_the_server_up_and_says_why(repository, tmp_path):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text('{"name": "broken", "task": "classification"}')
    async with client_for(Settings(repository=tmp_path)) as c:
        assert (await c.get("/v2/health/live")).status_code == 200
        r = await c.post("/v2/models/broken/infer", json={"inputs": []})
        assert r.status_code == 503 and "inputs" in r.json()["error"]
        load = await c.post("/v2/repository/models/broken/load")
        assert load.status_code == 400 and "invalid config" in load.json()["error"]


async def test_disconnected_client_cancels_the_work():
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> Answer:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Answer(200, b"")

    async def receive():
        await started.wait()
        return {"type": "http.disconnect"}

    assert await run_watching(work(), receive) is None
    assert cancelled.is_set()


async def test_finished_work_is_answered_and_the_watcher_stopped():
    async def work() -> Answer:
        return Answer(200, b"ok")

    never = asyncio.Event()

    async def receive():
        await never.wait()
        return {"type": "http.disconnect"}

    answer = await run_watching(work(), receive)
    assert answer.body == b"ok"
