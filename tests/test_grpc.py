"""gRPC (Triton's `inference.GRPCInferenceService`) end to end: `tritonclient.grpc`, unmodified,
against a real `onnxserve serve` with a gRPC port; a plain grpc channel with our own messages for
what the client library will not send (malformed tensors, typed contents as grpcurl sends)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from loadtests.bench.grpcload import grpc_command
from loadtests.bench.payloads import manifest_text
from loadtests.bench.wrk import parse_wrk_output
from loadtests.payloads import GRPC, make_payload
from service.errors import NotFound, QueueFull
from service.grpc import messages as pb
from service.grpc.generate import stale
from service.grpc.status import CODES, status_of
from service.grpc.tensors import infer_outputs, infer_request
from service.model_config import MODEL_FILE
from tests import foreign
from tests.conftest import MODELS, latest_version, run_server, samples, write_tensor_models
from tests.test_server import reference

pytestmark = pytest.mark.e2e
StatusCode = grpc.StatusCode
KEYS = {
    "reader": ("reader-key-0123456789", ["read"]),
    "inferrer": ("infer-key-0123456789", ["infer", "read"]),
    "admin": ("admin-key-0123456789", ["admin", "read"]),
}


def cnn_version(repository: Path) -> str:
    """The CNN version the server serves (the highest built)."""
    return latest_version(repository, "cnn").name


def bearer(who: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture(scope="module")
def repo(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our three models (linked), iris (BYTES labels out), tagged (BYTES in and out), half
    (FP16) and fixed (no batch axis)."""
    root = tmp_path_factory.mktemp("grpc-repo")
    for model in MODELS:
        (root / model).symlink_to(repository / model, target_is_directory=True)
    foreign.iris_pipeline(root / "iris" / "1" / MODEL_FILE)
    foreign.half(root / "half" / "1" / MODEL_FILE)
    write_tensor_models(root)
    return root


@pytest.fixture(scope="module")
def served(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """Default model control (none), no keys file; 2 MB messages and 64 rows at most."""
    env = {"ONNXSERVE_MAX_BODY_BYTES": "2000000"}
    args = ("--max-rows", "64", "--unsafe-anonymous-admin")
    with run_server(repo, tmp_path_factory.mktemp("grpc"), *args, env=env, grpc=True) as s:
        yield s


@pytest.fixture(scope="module")
def client(served):
    c = grpcclient.InferenceServerClient(served.grpc)
    yield c
    c.close()


def infer_input(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    return inp


def run_onnx(repo: Path, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """In-process ONNX Runtime on the model file the server serves."""
    session = ort.InferenceSession(str(latest_version(repo, model) / MODEL_FILE))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def image(rows: int, offset: int = 0) -> np.ndarray:
    return np.random.default_rng(offset).random((rows, 1, 28, 28), dtype=np.float32)


def fails_with(code: StatusCode, call, *args, match: str = "", **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        call(*args, **kwargs)
    assert info.value.status() == str(code), info.value
    assert match in info.value.message()
    return info.value.message()


# -- protobufs ----------------------------------------------------------------------------------
def test_descriptors_are_compiled_from_the_vendored_protos():
    assert stale() is None


def test_our_messages_and_tritonclients_live_in_one_process():
    """Our pool is private: tritonclient's generated modules (default pool) load beside it and
    the wire format is the same."""
    ours = infer_request("cnn", {"image": image(2)}, ["label"], "2", "r1")
    theirs = service_pb2.ModelInferRequest.FromString(ours.SerializeToString())
    assert theirs.model_name == "cnn" and theirs.inputs[0].shape == [2, 1, 28, 28]
    assert theirs.outputs[0].name == "label" and theirs.id == "r1"


def test_status_map():
    assert status_of(NotFound("x"))[0] == StatusCode.NOT_FOUND
    assert status_of(QueueFull("full", 2)) == (
        StatusCode.RESOURCE_EXHAUSTED,
        "full",
        (("retry-after", "2"),),
    )
    assert (
        CODES[413] == StatusCode.RESOURCE_EXHAUSTED and CODES[504] == StatusCode.DEADLINE_EXCEEDED
    )


# -- every RPC through tritonclient ---------------------------------------------------------------
def test_health_and_metadata_rpcs_answer_as_rest_does(served, client, repository):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cnn") and client.is_model_ready("cnn", cnn_version(repository))
    fails_with(StatusCode.NOT_FOUND, client.is_model_ready, "nope")
    meta = client.get_server_metadata(as_json=True)
    rest = httpx.get(f"{served.url}/v2").json()
    assert meta["name"] == rest["name"] == "onnxserve" and meta["extensions"] == rest["extensions"]
    for model in (*MODELS, "iris", "tagged"):
        got = client.get_model_metadata(model, as_json=True)
        want = httpx.get(f"{served.url}/v2/models/{model}").json()
        assert got["versions"] == want["versions"] and got["platform"] == want["platform"]
        for kind in ("inputs", "outputs"):
            assert [{**t, "shape": [int(d) for d in t["shape"]]} for t in got[kind]] == want[kind]


def test_model_config_and_statistics_equal_rests(served, client):
    x = image(3)
    client.infer("cnn", [infer_input("image", x, "FP32")])
    for model in ("cnn", "lstm", "iris", "fixed"):
        got = client.get_model_config(model).config
        want = httpx.get(f"{served.url}/v2/models/{model}/config").json()
        assert got == json_format.ParseDict(want, model_config_pb2.ModelConfig())
    stats = client.get_inference_statistics("cnn")
    rest = httpx.get(f"{served.url}/v2/models/cnn/stats").json()
    assert stats == json_format.ParseDict(rest, service_pb2.ModelStatisticsResponse())
    assert stats.model_stats[0].inference_count >= 3
    every = client.get_inference_statistics()  # no name: every loaded model
    assert {s.name for s in every.model_stats} >= {*MODELS, "iris"}


def test_repository_index_and_model_control_refused_in_the_default_mode(client, repository):
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {"name": "cnn", "version": cnn_version(repository), "state": "READY"} in index
    for call in (client.load_model, client.unload_model):
        fails_with(StatusCode.PERMISSION_DENIED, call, "cnn", match="--model-control-mode")
    assert client.is_model_ready("cnn")


@pytest.mark.parametrize("rows", [1, 9])
def test_cnn_lstm_and_autoencoder_answers_equal_in_process_onnxruntime(client, repository, rows):
    x = samples(repository, "cnn")[:rows].astype(np.float32)
    result = client.infer("cnn", [infer_input("image", x, "FP32")], request_id="g-1")
    want = reference(repository, "cnn", x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
    response = result.get_response()
    assert response.id == "g-1" and response.model_version == cnn_version(repository)
    assert response.parameters["batch_size"].int64_param >= rows

    w = samples(repository, "lstm")[:rows, :52].astype(np.float32)
    got = client.infer("lstm", [infer_input("series", w, "FP32")]).as_numpy("forecast")
    np.testing.assert_allclose(got, reference(repository, "lstm", w)["forecast"], rtol=1e-5)

    a = samples(repository, "autoencoder")[:rows].astype(np.float32)
    outputs = [grpcclient.InferRequestedOutput("score")]
    result = client.infer("autoencoder", [infer_input("image", a, "FP32")], outputs=outputs)
    assert result.as_numpy("reconstruction") is None
    want = reference(repository, "autoencoder", a)["score"]
    np.testing.assert_allclose(result.as_numpy("score"), want, rtol=1e-5)


def test_bytes_and_fp16_models(client, repo):
    x = foreign.iris_inputs(12)
    result = client.infer("iris", [infer_input("X", x, "FP32")])
    want = run_onnx(repo, "iris", {"X": x})
    assert [v.decode() for v in result.as_numpy("label")] == list(want["label"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], rtol=1e-5)

    tags = np.array([["ä-one"], [""], ["three"]], dtype=object)
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    inputs = [infer_input("x", values, "FP32"), infer_input("tag", tags, "BYTES")]
    result = client.infer("tagged", inputs)
    np.testing.assert_array_equal(result.as_numpy("y"), 2 * values)
    assert [[v.decode() for v in row] for row in result.as_numpy("tag_copy")] == tags.tolist()

    h = np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4)
    got = client.infer("half", [infer_input("x", h, "FP16")]).as_numpy("y")
    np.testing.assert_array_equal(got, run_onnx(repo, "half", {"x": h})["y"])
    fixed = np.array([[-1, 2, -3], [4, -5, 6]], np.float32)
    got = client.infer("fixed", [infer_input("x", fixed, "FP32")]).as_numpy("y")
    np.testing.assert_array_equal(got, np.maximum(fixed, 0))


async def test_64_concurrent_calls_each_get_their_own_answer(served, repository):
    x = samples(repository, "cnn")[:64].astype(np.float32)
    want = reference(repository, "cnn", x)["probabilities"]
    async with aioclient.InferenceServerClient(served.grpc) as c:

        async def one(i: int) -> np.ndarray:
            inp = aioclient.InferInput("image", [1, 1, 28, 28], "FP32")
            inp.set_data_from_numpy(x[i : i + 1])
            result = await c.infer("cnn", [inp], request_id=str(i))
            assert result.get_response().id == str(i)
            return result.as_numpy("probabilities")[0]

        got = await asyncio.gather(*(one(i) for i in range(64)))
    np.testing.assert_allclose(np.stack(got), want, atol=1e-6)


# -- refusals -----------------------------------------------------------------------------------
def test_bad_requests_get_their_status_and_the_server_still_serves(served, client, repository):
    x = image(2)
    v = cnn_version(repository)
    cases = [
        (StatusCode.INVALID_ARGUMENT, "FP64", ("cnn", [infer_input("image", x.astype(np.float64),
                                                                   "FP64")])),
        (StatusCode.NOT_FOUND, "unknown model 'nope'", ("nope", [infer_input("image", x, "FP32")])),
        (StatusCode.NOT_FOUND, "no version 9", ("cnn", [infer_input("image", x, "FP32")], "9")),
        (StatusCode.INVALID_ARGUMENT, "unknown input 'pixels'",
         ("cnn", [infer_input("pixels", x, "FP32")])),
        (StatusCode.INVALID_ARGUMENT, "dimension 2", ("cnn", [infer_input("image", x[:, :, :27],
                                                                          "FP32")])),
        (StatusCode.RESOURCE_EXHAUSTED, "limits.max_rows",
         ("cnn", [infer_input("image", image(65), "FP32")])),
        (StatusCode.RESOURCE_EXHAUSTED, "larger than max",  # gRPC's own size limit (2 MB)
         ("cnn", [infer_input("image", image(700), "FP32")])),
    ]  # fmt: skip
    nan = x.copy()
    nan[1, 0, 3, 4] = np.nan
    cases.append(
        (StatusCode.INVALID_ARGUMENT, "non-finite", ("cnn", [infer_input("image", nan, "FP32")]))
    )
    for code, match, args in cases:
        fails_with(code, client.infer, *args, match=match)
    assert client.infer("cnn", [infer_input("image", x, "FP32")]).as_numpy("label").shape == (2,)
    metrics = httpx.get(f"{served.url}/metrics").text
    assert (
        f'onnxserve_request_failure_total{{model="cnn",reason="bad_request",version="{v}"}}'
        in metrics
    )


async def late_call(client: aioclient.InferenceServerClient, **kwargs) -> Exception | None:
    """A one-row call sent behind four 64-row calls (so it finds the batcher busy): what it
    raised, or None if it was answered (the calls may reach the batcher in any order: retried)."""
    for _ in range(5):
        busy = [client.infer("cnn", [infer_input("image", image(64, k), "FP32")]) for k in range(4)]
        late = client.infer("cnn", [infer_input("image", image(1), "FP32")], **kwargs)
        *done, answer = await asyncio.gather(*busy, late, return_exceptions=True)
        assert not any(isinstance(d, Exception) for d in done), done
        if isinstance(answer, Exception):
            return answer
    return None


async def test_deadlines_map_to_deadline_exceeded(served, repository):
    async with aioclient.InferenceServerClient(served.grpc) as c:
        # Triton's `timeout` request parameter (microseconds) caps a call's time in the queue:
        # the server refuses it at its deadline, never run
        refused = await late_call(c, timeout=1)
        assert isinstance(refused, InferenceServerException), refused
        assert refused.status() == str(StatusCode.DEADLINE_EXCEEDED)
        assert "in the queue" in refused.message()
        # the call's own deadline (the server caps the queue wait by it, the client gives up)
        refused = await late_call(c, client_timeout=0.001)
        assert isinstance(refused, InferenceServerException), refused
        assert refused.status() == str(StatusCode.DEADLINE_EXCEEDED)
        answer = await c.infer("cnn", [infer_input("image", image(1), "FP32")])
        assert answer.as_numpy("label").shape == (1,)
    metrics = httpx.get(f"{served.url}/metrics").text
    v = cnn_version(repository)
    assert (
        f'onnxserve_request_failure_total{{model="cnn",reason="timeout",version="{v}"}}' in metrics
    )


def test_malformed_tensors_and_typed_contents_over_a_plain_channel(served, repository):
    """What grpcurl-like tools send (typed `contents`, answered typed) and what tritonclient
    never would (a byte count that does not fit the shape)."""
    x = samples(repository, "cnn")[:2].astype(np.float32)
    with grpc.insecure_channel(served.grpc) as channel:
        infer = channel.unary_unary(
            pb.method_path("ModelInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        typed = pb.ModelInferRequest(model_name="cnn")
        typed.inputs.add(name="image", datatype="FP32", shape=x.shape).contents.fp32_contents[:] = (
            x.ravel().tolist()
        )
        answer = infer(typed)
        assert not answer.raw_output_contents and answer.outputs[1].contents.int64_contents
        want = reference(repository, "cnn", x)
        np.testing.assert_array_equal(infer_outputs(answer)["label"], want["label"])

        raw = infer_request("cnn", {"image": x})
        np.testing.assert_allclose(infer_outputs(infer(raw))["probabilities"],
                                   want["probabilities"], atol=1e-6)  # fmt: skip
        short = infer_request("cnn", {"image": x})
        short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
        both = infer_request("cnn", {"image": x})
        both.inputs[0].contents.fp32_contents.append(1.0)
        few = pb.ModelInferRequest(model_name="cnn")
        few.inputs.add(name="image", datatype="FP32", shape=[1, 1, 28, 28])
        for bad, match in (
            (short, "needs 6272 bytes, raw_input_contents has 6268"),
            (both, "contents and raw_input_contents both given"),
            (few, "needs 784 elements, contents.fp32_contents has 0"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                infer(bad)
            assert info.value.code() == StatusCode.INVALID_ARGUMENT
            assert match in info.value.details()


# -- keys, model control, a full queue ------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """A keys file, explicit model control, and a cnn whose queue holds one request."""
    tmp = tmp_path_factory.mktemp("grpc-keys")
    keys = [{"name": n, "key": k, "scopes": s} for n, (k, s) in KEYS.items()]
    (tmp / "keys.json").write_text(json.dumps({"keys": keys}))
    args = ("--api-keys-file", str(tmp / "keys.json"), "--model-control-mode", "explicit",
            "--load-model", "cnn")  # fmt: skip
    env = {"ONNXSERVE_MODEL_OVERRIDES": '{"cnn": {"max_queue_size": 1, "max_batch_size": 1}}'}
    with run_server(repository, tmp, *args, env=env, grpc=True) as s:
        c = grpcclient.InferenceServerClient(s.grpc)
        yield s, c
        c.close()


def test_keys_come_from_the_authorization_metadata(guarded):
    _, c = guarded
    inp = [infer_input("image", image(1), "FP32")]
    assert c.is_server_live() and c.is_server_ready()  # health needs no key
    fails_with(StatusCode.UNAUTHENTICATED, c.infer, "cnn", inp, match="'infer' scope")
    fails_with(StatusCode.UNAUTHENTICATED, c.get_model_metadata, "cnn")
    fails_with(StatusCode.PERMISSION_DENIED, c.infer, "cnn", inp, headers=bearer("reader"),
               match="key 'reader' lacks the 'infer' scope")  # fmt: skip
    fails_with(StatusCode.UNAUTHENTICATED, c.infer, "cnn", inp,
               headers={"authorization": "Bearer not-a-key"}, match="unknown API key")  # fmt: skip
    assert c.infer("cnn", inp, headers=bearer("inferrer")).as_numpy("label").shape == (1,)
    assert c.get_model_metadata("cnn", headers=bearer("reader")).name == "cnn"


def test_explicit_model_control_with_an_admin_key(guarded):
    _, c = guarded
    fails_with(StatusCode.PERMISSION_DENIED, c.unload_model, "cnn", headers=bearer("inferrer"))
    c.unload_model("cnn", headers=bearer("admin"))
    assert not c.is_model_ready("cnn", headers=bearer("reader"))
    inp = [infer_input("image", image(1), "FP32")]
    fails_with(StatusCode.UNAVAILABLE, c.infer, "cnn", inp, headers=bearer("inferrer"))
    c.load_model("cnn", headers=bearer("admin"))
    assert c.is_model_ready("cnn", headers=bearer("reader"))
    fails_with(StatusCode.NOT_FOUND, c.load_model, "nope", headers=bearer("admin"))


async def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(guarded):
    server, _ = guarded
    x = image(32)
    codes: list[StatusCode] = []
    hints: list[str] = []
    async with grpc.aio.insecure_channel(server.grpc) as channel:
        infer = channel.unary_unary(
            pb.method_path("ModelInfer"),
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        metadata = tuple(bearer("inferrer").items())

        async def one(i: int) -> None:
            # 32 rows a call: each runs long enough (a batch of one call) for others to queue
            call = infer(infer_request("cnn", {"image": x}), metadata=metadata)
            try:
                await call
                codes.append(StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                hints.extend(v for k, v in exc.trailing_metadata() or () if k == "retry-after")

        await asyncio.gather(*(one(i) for i in range(32)))
    assert StatusCode.OK in codes and StatusCode.RESOURCE_EXHAUSTED in codes, codes
    assert set(codes) <= {StatusCode.OK, StatusCode.RESOURCE_EXHAUSTED}
    assert hints and hints.count("1") == codes.count(StatusCode.RESOURCE_EXHAUSTED)


# -- the benchmark's generator, and shutdown ------------------------------------------------------
def test_the_benchmarks_grpc_generator_reports_wrks_fields(served, tmp_path):
    entries = []
    for k in range(3):
        payload = make_payload("cnn", GRPC, {"image": image(1, k)})
        (tmp_path / f"{k}.body").write_bytes(payload.body)
        entries.append((payload.path, tmp_path / f"{k}.body", payload.headers))
    (tmp_path / "m.tsv").write_text(manifest_text(entries))
    done = subprocess.run(grpc_command(served.grpc, tmp_path / "m.tsv", 4, 1), capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    doc = parse_wrk_output(done.stdout)
    assert doc["requests"] > 0 and doc["non2xx"] == doc["socket_errors"] == 0, done.stderr
    assert 0 < doc["latency_us"]["p50"] <= doc["latency_us"]["p99"] <= doc["latency_us"]["max"]


async def test_admitted_calls_finish_at_shutdown(repository, tmp_path):
    """SIGTERM with calls in flight: every admitted call is answered, then the server exits 0."""
    env = {"ONNXSERVE_MODEL_OVERRIDES": '{"lstm": {"max_batch_size": 1}}'}
    with run_server(repository, tmp_path, "--models", "lstm", env=env, grpc=True) as s:
        x = np.random.default_rng(0).random((64, 1000, 1), dtype=np.float32)
        async with grpc.aio.insecure_channel(s.grpc) as channel:
            infer = channel.unary_unary(
                pb.method_path("ModelInfer"),
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            calls = [infer(infer_request("lstm", {"series": x})) for _ in range(12)]
            await asyncio.sleep(0.3)
            s.process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*calls, return_exceptions=True)
        assert all(a.outputs[0].shape[0] == 64 for a in answers), answers
        assert s.process.wait(30) == 0


def test_grpcios_server_stays_selectable(repository, tmp_path):
    """`--grpc-server grpcio` serves the same RPCs through grpc.aio (the default is ours)."""
    with run_server(repository, tmp_path, "--grpc-server", "grpcio", grpc=True) as s:
        c = grpcclient.InferenceServerClient(s.grpc)
        x = samples(repository, "cnn")[:3].astype(np.float32)
        got = c.infer("cnn", [infer_input("image", x, "FP32")]).as_numpy("probabilities")
        np.testing.assert_allclose(got, reference(repository, "cnn", x)["probabilities"],
                                   atol=1e-6)  # fmt: skip
        fails_with(StatusCode.NOT_FOUND, c.infer, "nope", [infer_input("image", x, "FP32")])
        assert health(s.grpc) == pb.HealthCheckResponse.SERVING
        c.close()
    assert "grpcio server" in s.log.read_text()


def health(target: str, service: str = "") -> int:
    """grpc.health.v1's Check, as Kubernetes' gRPC probes call it: the status number."""
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(
            pb.method_path("Check", pb.HEALTH),
            request_serializer=pb.HealthCheckRequest.SerializeToString,
            response_deserializer=pb.HealthCheckResponse.FromString,
        )
        return check(pb.HealthCheckRequest(service=service)).status


def test_the_standard_health_check_follows_readiness(guarded):
    server, c = guarded
    serving, not_serving = pb.HealthCheckResponse.SERVING, pb.HealthCheckResponse.NOT_SERVING
    assert health(server.grpc) == health(server.grpc, pb.SERVICE) == serving  # no key needed
    with pytest.raises(grpc.RpcError) as info:
        health(server.grpc, "some.Other")
    assert info.value.code() == StatusCode.NOT_FOUND
    c.unload_model("cnn", headers=bearer("admin"))
    try:
        ready = c.is_server_ready()
        assert health(server.grpc) == (serving if ready else not_serving)
    finally:
        c.load_model("cnn", headers=bearer("admin"))
    assert health(server.grpc) == serving


async def test_the_health_check_is_not_serving_while_a_model_is_not_ready():
    from types import SimpleNamespace

    from service.grpc.inference import GRPCInferenceService

    for ready, status in ((False, pb.HealthCheckResponse.NOT_SERVING),
                          (True, pb.HealthCheckResponse.SERVING)):  # fmt: skip
        dataplane = SimpleNamespace(repository=SimpleNamespace(all_ready=lambda r=ready: r))
        service = GRPCInferenceService(dataplane, guard=None)  # type: ignore[arg-type]
        assert (await service.health_check(pb.HealthCheckRequest(), None)).status == status
