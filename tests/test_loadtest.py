"""Load tests: the pure parts (payloads, random inputs, answer checks, Locust files, /metrics
deltas, capacity rule) as unit tests, and short real Locust runs through `onnxserve loadtest`
against a real server: our models with their samples, and models without a task or samples.

Locust monkey-patches at import, so it only ever runs in a subprocess here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest

from loadtests import capacity, report
from loadtests.payloads import (
    GRPC,
    GRPC_OK,
    HTTP_PROTOCOLS,
    INT_HIGH,
    PROTOCOLS,
    RANDOM_ROWS,
    STRING_LENGTHS,
    V1,
    V2_BINARY,
    V2_JSON,
    ModelTraffic,
    grpc_target,
    parse_mix,
    parse_server_timing,
    parse_shapes,
    random_inputs,
    samples_path,
    traffic_for,
    unknown_shapes,
)
from loadtests.prom import batch_histogram, metric_delta, parse_metrics, server_view
from loadtests.runner import LoadSpec, LocustRun, warnings_for
from loadtests.timing import TimingLog
from service.codec import decode_request as decode_v2
from service.grpc import messages as pb
from service.grpc.tensors import decode_request as decode_grpc
from service.grpc.tensors import encode_response as encode_grpc
from service.model_config import CONFIG_FILE
from tests.conftest import FOREIGN, MODELS, ROOT, samples

e2e, unit = pytest.mark.e2e, pytest.mark.unit


def metadata(repository: Path, model: str) -> dict:
    """What `GET /v2/models/{m}` says, rebuilt from the repository's config (for unit tests)."""
    config = orjson.loads((repository / model / CONFIG_FILE).read_bytes())
    return {
        "name": model,
        "inputs": config["inputs"],
        "outputs": config["outputs"],
        "parameters": {"task": config["task"]},
    }


def decode_request(payload) -> np.ndarray:
    """The rows a request carries, read back the way the server reads them."""
    if payload.path == pb.method_path("ModelInfer"):
        request = decode_grpc(pb.ModelInferRequest.FromString(payload.body))
        return next(iter(request.inputs.values()))
    n = payload.headers.get("Inference-Header-Content-Length")
    if n:
        head = orjson.loads(payload.body[: int(n)])
        spec = head["inputs"][0]
        return np.frombuffer(payload.body[int(n) :], np.float32).reshape(spec["shape"])
    doc = orjson.loads(payload.body)
    if "instances" in doc:
        return np.asarray(doc["instances"], np.float32)
    spec = doc["inputs"][0]
    return np.asarray(spec["data"], np.float32).reshape(spec["shape"])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`onnxserve loadtest ARGS` in a subprocess (Locust must not be imported in pytest)."""
    return subprocess.run(
        [sys.executable, "-m", "loadtests.cli", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


# -- payloads and answer checks ----------------------------------------------------------------
@unit
def test_server_timing_header_is_parsed():
    header = "queue;dur=0.512, compute;dur=1.250, total;dur=2.004"
    assert parse_server_timing(header) == {"queue": 0.512, "compute": 1.25, "total": 2.004}
    assert parse_server_timing(None) == {}
    assert parse_server_timing("cache;desc=hit, db;dur=x") == {}


@unit
def test_mix_weights_are_parsed_and_checked():
    assert parse_mix("cnn:6, autoencoder:3,lstm:0", MODELS) == {"cnn": 6.0, "autoencoder": 3.0}
    assert parse_mix("lstm", MODELS) == {"lstm": 1.0}
    assert parse_mix("mymodel:2,cnn") == {"mymodel": 2.0, "cnn": 1.0}  # any model of the server
    for bad, message in (("resnet:1", "unknown model"), ("cnn:x", "not a number"),
                         ("cnn:0", "positive"), ("", "positive")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            parse_mix(bad, MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        parse_mix("no/such:1")


@unit
@pytest.mark.parametrize("model", MODELS)
def test_payloads_carry_held_out_rows_in_every_protocol(repository, model):
    traffic = traffic_for(metadata(repository, model), repository)  # auto: the samples
    assert traffic.source == f"samples: {samples_path(repository, model)}"
    samples = traffic.samples[traffic.input["name"]]
    rng = np.random.default_rng(0)
    for protocol in PROTOCOLS:
        pool = traffic.pool(protocol, 3, rng, size=4)
        assert len(pool) == 4 and all(p.rows == 3 for p in pool)
        for payload in pool:
            rows = decode_request(payload)
            assert rows.shape == (3, *samples.shape[1:])
            for row in rows:  # every row is one of the real samples, bit for bit
                assert any(np.array_equal(row, s) for s in samples)
        paths = {p.path for p in pool}
        assert paths == {
            V1: {f"/v1/models/{model}:predict"},
            GRPC: {"/inference.GRPCInferenceService/ModelInfer"},
        }.get(protocol, {f"/v2/models/{model}/infer"})
    assert traffic.pool(V2_JSON, 3, rng) is traffic.pool(V2_JSON, 3, rng)  # cached


@unit
def test_samples_that_do_not_fit_the_metadata_are_refused(repository, tmp_path):
    meta = metadata(repository, "cnn")
    with pytest.raises(ValueError, match="is the repository the one it serves"):
        ModelTraffic(meta, samples(repository, "lstm"))
    with pytest.raises(FileNotFoundError, match="onnxserve build"):
        samples_path(repository / "nowhere", "cnn")
    with pytest.raises(FileNotFoundError, match="--inputs random"):
        traffic_for(meta, tmp_path, "samples")
    assert traffic_for(meta, tmp_path).source.startswith("random")  # auto, without samples
    assert traffic_for(meta, repository, "random").source.startswith("random")


# -- random inputs for models that ship no samples ---------------------------------------------
FOREIGN_META = {
    "name": "mine",
    "inputs": [
        {"name": "series", "datatype": "FP32", "shape": [-1, -1, 3]},
        {"name": "ids", "datatype": "INT64", "shape": [-1, 4]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, 2]},
        {"name": "words", "datatype": "BYTES", "shape": [-1, 2]},
        {"name": "half", "datatype": "FP16", "shape": [-1]},
    ],
    "outputs": [
        {"name": "total", "datatype": "FP32", "shape": [-1]},
        {"name": "doubled", "datatype": "FP32", "shape": [-1, -1, 3]},
        {"name": "tag", "datatype": "BYTES", "shape": [-1, 1]},
    ],
    "parameters": {"batching": {"max_batch_size": 8}},
}


@unit
def test_shapes_are_parsed_like_perf_analyzers():
    assert parse_shapes("series:52,3") == {"series": [52, 3]}
    assert parse_shapes("a:1,2; b:3") == parse_shapes(["a:1,2", "b:3"]) == {"a": [1, 2], "b": [3]}
    assert parse_shapes("") == parse_shapes(None) == parse_shapes([]) == {}
    for bad in ("series", "series:", "series:x", "series:0,3", ":3"):
        with pytest.raises(ValueError, match="NAME:D1,D2"):
            parse_shapes(bad)


@unit
def test_random_inputs_take_each_inputs_datatype_and_shape():
    with pytest.raises(ValueError, match=r"dynamic axes \[-1, -1, 3\]: .*--shape series:52,3"):
        random_inputs(FOREIGN_META)
    with pytest.raises(ValueError, match="does not fit its shape"):
        random_inputs(FOREIGN_META, {"series": [5, 4]})
    with pytest.raises(ValueError, match="names no input 'seriez' \\(inputs: half, ids, "):
        unknown_shapes({"seriez": [5, 3]}, [FOREIGN_META])
    unknown_shapes({"series": [5, 3]}, [FOREIGN_META, {"name": "other", "inputs": []}])
    x = random_inputs(FOREIGN_META, {"series": [5, 3]}, seed=0)
    assert {k: (v.shape, v.dtype.kind) for k, v in x.items()} == {
        "series": ((RANDOM_ROWS, 5, 3), "f"),
        "ids": ((RANDOM_ROWS, 4), "i"),
        "mask": ((RANDOM_ROWS, 2), "b"),
        "words": ((RANDOM_ROWS, 2), "O"),
        "half": ((RANDOM_ROWS,), "f"),
    }
    assert x["series"].dtype == np.float32 and x["half"].dtype == np.float16
    assert x["ids"].dtype == np.int64 and 0 <= x["ids"].min() and x["ids"].max() < INT_HIGH
    assert 0 <= x["series"].min() and x["series"].max() < 1 and x["mask"].any()
    lengths = {len(w) for w in x["words"].ravel()}
    assert all(isinstance(w, str) for w in x["words"].ravel())
    assert min(lengths) >= STRING_LENGTHS[0] and max(lengths) <= STRING_LENGTHS[1]


@unit
def test_random_requests_decode_as_the_server_reads_them(tmp_path):
    traffic = traffic_for(FOREIGN_META, tmp_path, "auto", {"series": [5, 3]})
    assert traffic.source.startswith("random") and traffic.protocols == HTTP_PROTOCOLS
    rng = np.random.default_rng(3)
    for protocol in (V2_JSON, V2_BINARY):
        payload = traffic.pool(protocol, 2, rng, size=2)[0]
        inputs = decode_v2(payload.body, payload.headers.get("Inference-Header-Content-Length"))
        got = {k: (list(v.shape), v.dtype.kind) for k, v in inputs.inputs.items()}
        assert got == {"series": ([2, 5, 3], "f"), "ids": ([2, 4], "i"), "mask": ([2, 2], "b"),
                       "words": ([2, 2], "O"), "half": ([2], "f")}  # fmt: skip
        bank = traffic.samples["words"]
        assert all(any(np.array_equal(row, b) for b in bank) for row in inputs.inputs["words"])
    instances = orjson.loads(traffic.pool(V1, 3, rng, size=1)[0].body)["instances"]
    assert len(instances) == 3 and set(instances[0]) == {"series", "ids", "mask", "words", "half"}
    assert np.asarray(instances[0]["series"]).shape == (5, 3)
    assert all(isinstance(w, str) for w in instances[0]["words"])


@unit
def test_a_model_without_a_batch_axis_gets_whole_tensors(tmp_path):
    meta = {
        "name": "fixed",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3]}],
        "parameters": {"batching": {"max_batch_size": 0}},
    }
    traffic = traffic_for(meta, tmp_path)
    assert traffic.protocols == (V2_JSON, V2_BINARY)
    payload = traffic.pool(V2_BINARY, 1, np.random.default_rng(0), size=1)[0]
    assert payload.rows == 1
    x = decode_v2(payload.body, payload.headers["Inference-Header-Content-Length"]).inputs["x"]
    assert x.shape == (2, 3)
    with pytest.raises(ValueError, match="v1 `instances` need one"):
        traffic.can_send(V1, 1)
    with pytest.raises(ValueError, match="one row per request"):
        traffic.pool(V2_JSON, 2, np.random.default_rng(0))
    traffic.can_send("mixed", 1)
    good = orjson.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3],
                                      "data": [0.0] * 6}]})  # fmt: skip
    assert traffic.check(V2_JSON, 1, 200, good) is None
    batched = good.replace(b"[2,3]", b"[1,2,3]")
    assert "expected [2, 3]" in traffic.check(V2_JSON, 1, 200, batched)


@unit
def test_v1_answers_of_a_model_without_a_task_carry_every_output(tmp_path):
    traffic = traffic_for(FOREIGN_META, tmp_path, "random", {"series": [5, 3]})
    row = {"total": 1.0, "doubled": [[0.0] * 3] * 5, "tag": ["a"]}
    assert traffic.check(V1, 2, 200, orjson.dumps({"predictions": [row, row]})) is None
    partial = orjson.dumps({"predictions": [{"total": 1.0}]})
    assert "lacks ['doubled', 'tag', 'total']" in traffic.check(V1, 1, 200, partial)
    tensor = {"name": "tag", "datatype": "BYTES", "shape": [2, 1]}
    outputs = [
        {"name": "total", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]},
        {"name": "doubled", "datatype": "FP32", "shape": [2, 5, 3], "data": [0.0] * 30},
        {**tensor, "parameters": {"binary_data_size": 11}},
    ]
    head = orjson.dumps({"outputs": outputs})
    blob = b"\x01\0\0\0a" + b"\x02\0\0\0bc"  # BYTES: 4-byte length, then the bytes
    assert traffic.check(V2_BINARY, 2, 200, head + blob, str(len(head))) is None


def v2_answer(meta: dict, rows: int, binary: bool, rng) -> tuple[bytes, str | None]:
    """A well-formed v2 answer with `rows` rows for every output the metadata lists."""
    outputs, blobs = [], []
    for spec in meta["outputs"]:
        shape = [rows, *[d if d != -1 else 1 for d in spec["shape"][1:]]]
        dtype = np.float32 if spec["datatype"] == "FP32" else np.int64
        array = (rng.random(shape) * 10).astype(dtype)
        tensor = {"name": spec["name"], "datatype": spec["datatype"], "shape": shape}
        if binary:
            tensor["parameters"] = {"binary_data_size": array.nbytes}
            blobs.append(array.tobytes())
        else:
            tensor["data"] = array.ravel().tolist()
        outputs.append(tensor)
    head = orjson.dumps({"model_name": meta["name"], "outputs": outputs})
    return head + b"".join(blobs), (str(len(head)) if binary else None)


@unit
def test_answer_check_accepts_right_answers_and_names_what_is_wrong(repository):
    meta = metadata(repository, "cnn")
    traffic = ModelTraffic(meta, samples(repository, "cnn"))
    rng = np.random.default_rng(1)
    for binary, protocol in ((False, V2_JSON), (True, V2_BINARY)):
        body, n = v2_answer(meta, 4, binary, rng)
        assert traffic.check(protocol, 4, 200, body, n) is None
        assert "expected [-1, 10] with 3 rows" in traffic.check(protocol, 3, 200, body, n)
    body, n = v2_answer(meta, 2, True, rng)
    assert "bytes of binary data" in traffic.check(V2_BINARY, 2, 200, body + b"\0", n)
    short = orjson.dumps(
        {"outputs": orjson.loads(v2_answer(meta, 2, False, rng)[0])["outputs"][:1]}
    )
    assert "metadata lists" in traffic.check(V2_JSON, 2, 200, short)
    assert traffic.check(V2_JSON, 1, 503, b'{"error": "queue full"}') == (
        'HTTP 503: {"error": "queue full"}'
    )
    assert "malformed answer" in traffic.check(V2_JSON, 1, 200, b"not json")
    good_v1 = orjson.dumps(
        {"predictions": [{"label": "7", "class_index": 7, "probabilities": [0.1] * 10}] * 2}
    )
    assert traffic.check(V1, 2, 200, good_v1) is None
    assert "expected 3 predictions" in traffic.check(V1, 3, 200, good_v1)
    assert "lacks" in traffic.check(V1, 1, 200, b'{"predictions": [{"score": 1.0}]}')


@unit
def test_grpc_answer_check(repository):
    meta = metadata(repository, "cnn")
    traffic = ModelTraffic(meta, samples(repository, "cnn"))
    outputs = [("probabilities", np.zeros((4, 10), np.float32)), ("label", np.zeros(4, np.int64))]
    for raw in (True, False):
        answer = encode_grpc("cnn", "2", outputs, None, {}, raw=raw).SerializeToString()
        assert traffic.check(GRPC, 4, GRPC_OK, answer) is None
        assert "gRPC: output 'probabilities' has shape [4, 10]" in traffic.check(GRPC, 3, 0, answer)
    short = encode_grpc("cnn", "2", outputs[:1], None, {}).SerializeToString()
    assert "metadata lists" in traffic.check(GRPC, 4, GRPC_OK, short)
    code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert traffic.check(GRPC, 1, code, b"queue is full") == "gRPC status 8: queue is full"
    assert "malformed answer" in traffic.check(GRPC, 1, GRPC_OK, b"\xff\xff")
    assert grpc_target("http://example.com:8000") == "example.com:8001"
    assert grpc_target("http://[::1]:8000") == "[::1]:8001"
    assert grpc_target("http://h:8000", "grpc://h:9001/") == "h:9001"


@unit
def test_timing_log_keeps_a_bounded_uniform_sample():
    log = TimingLog(capacity=100, seed=0)
    for i in range(1000):
        log.add((float(i), f"cnn {V2_JSON}", 1, 1.0, 0.1, 0.2, 0.5))
    assert len(log.rows) == 100 and log.seen == 1000
    kept = sorted(r[0] for r in log.rows)
    assert kept[-1] > 500  # later rows replace earlier ones, not just the first 100 kept
    assert len(log.drain()) == 100 and log.rows == [] and log.seen == 0


@unit
def test_a_cpu_bound_load_generator_is_warned_about():
    total = {"requests": 1000, "failures": 0, "failure_ratio": 0.0}
    calm = LocustRun(0, False, 10.0, {"mean_percent": 40.0}, cpu_warning_logged=False)
    assert warnings_for(calm, total, 1000) == []
    logged = LocustRun(0, False, 10.0, {"mean_percent": 40.0}, cpu_warning_logged=True)
    assert ["CPU-bound" in w for w in warnings_for(logged, total, 1000)] == [True]
    busy = LocustRun(0, False, 10.0, {"mean_percent": 93.0}, cpu_warning_logged=False)
    assert "averaged 93% of a core" in warnings_for(busy, total, 1000)[0]
    failed = {"requests": 1000, "failures": 5, "failure_ratio": 0.005}
    late = LocustRun(None, True, 200.0, {}, cpu_warning_logged=False)
    found = warnings_for(late, failed, 100)
    assert any("overran" in w for w in found) and any("5 of 1000" in w for w in found)
    assert any("sample of 100" in w for w in found)


# -- Locust's files --------------------------------------------------------------------------
STATS_CSV = """\
Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%
POST,cnn v2-binary,1989,2,3,3.5059743966869585,0.979457000084949,26.567616999955135,378.79989944695825,994.1367658153505,1.0,3,3,4,5,7,8,11,14,27,27,27
POST,lstm v1,0,0,0,0.0,0,0,0,0.0,0.0,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A
,Aggregated,1989,2,3,3.5059743966869585,0.979457000084949,26.567616999955135,378.79989944695825,994.1367658153505,1.0,3,3,4,5,7,8,11,14,27,27,27
"""  # noqa: E501 (Locust's own header)
HISTORY_CSV = """\
Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,100%,Total Request Count,Total Failure Count,Total Median Response Time,Total Average Response Time,Total Min Response Time,Total Max Response Time,Total Average Content Size
1795459836,0,,Aggregated,0.000000,0.000000,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,N/A,0,0,0,0.0,0,0,0
1795459837,4,POST,cnn v2-binary,0.000000,0.000000,2,2,3,3,5,6,8,9,15,15,15,1188,0,2,2.9,0.97,15.4,378.7
1795459837,4,,Aggregated,0.000000,0.000000,2,2,3,3,5,6,8,9,15,15,15,1188,0,2,2.9,0.97,15.4,378.7
1795459839,4,,Aggregated,600.000000,0.000000,3,3,4,5,7,8,11,14,27,27,27,1989,2,3,3.5,0.97,26.5,378.8
"""  # noqa: E501


@unit
def test_locust_stats_and_history_csv_are_read(tmp_path):
    (tmp_path / "s.csv").write_text(STATS_CSV)
    (tmp_path / "h.csv").write_text(HISTORY_CSV)
    stats = report.read_stats(tmp_path / "s.csv")
    assert stats["total"]["requests"] == 1989 and stats["total"]["failures"] == 2
    assert stats["total"]["failure_ratio"] == pytest.approx(2 / 1989)
    assert stats["total"]["rps"] == pytest.approx(994.137, abs=1e-3)
    assert stats["total"]["latency_ms"]["p50"] == 3 and stats["total"]["latency_ms"]["p99"] == 14
    assert stats["endpoints"]["lstm v1"]["latency_ms"]["p99"] is None
    history = report.read_history(tmp_path / "h.csv")
    assert [r["t"] for r in history] == [0, 1, 3]  # Aggregated rows only
    assert [r["users"] for r in history] == [0, 4, 4]
    assert history[1]["rps"] == 1188 and history[2]["rps"] == pytest.approx((1989 - 1188) / 2)
    assert history[2]["failures_per_s"] == 1.0 and history[0]["p99"] is None


@unit
def test_locust_final_json_gives_the_same_figures_as_its_rule(tmp_path):
    entries = [
        {"name": "cnn v1", "method": "POST", "start_time": 100.0, "last_request_timestamp": 110.0,
         "num_requests": 100, "num_failures": 1, "total_response_time": 500.0,
         "max_response_time": 40.2, "response_times": {"2": 60, "5": 36, "40": 4}},
        {"name": "lstm v1", "method": "POST", "start_time": 101.0, "last_request_timestamp": 105.0,
         "num_requests": 100, "num_failures": 0, "total_response_time": 300.0,
         "max_response_time": 9.0, "response_times": {"3": 99, "9": 1}},
    ]  # fmt: skip
    (tmp_path / "final.json").write_text(json.dumps(entries))
    stats = report.read_stats_json(tmp_path / "final.json")
    cnn = stats["endpoints"]["cnn v1"]
    assert cnn["rps"] == 10.0 and cnn["failure_ratio"] == 0.01
    assert cnn["latency_ms"]["p50"] == 2 and cnn["latency_ms"]["p95"] == 5
    assert cnn["latency_ms"]["p99"] == 40 and cnn["latency_ms"]["max"] == 40.2
    total = stats["total"]
    assert total["requests"] == 200 and total["failures"] == 1 and total["rps"] == 20.0
    assert total["latency_ms"]["p50"] == 3 and total["latency_ms"]["avg"] == 4.0


@unit
def test_step_table_splits_timings_by_step():
    rows = [
        {"timestamp": 1000.0 + i * 0.1, "name": "cnn v1", "ok": 1.0, "client_ms": 2.0}
        for i in range(20)  # 10 requests/s for 2 s
    ] + [
        {"timestamp": 1002.0 + i * 0.05, "name": "cnn v1", "ok": float(i != 0), "client_ms": 8.0}
        for i in range(40)  # 20 requests/s for 2 s, one failure
    ]  # fmt: skip
    table = report.step_table(rows, [1, 4], step_s=2.0)
    assert [s["users"] for s in table] == [1, 4]
    assert table[0]["requests"] == 20 and table[0]["rps"] == 10.0 and table[0]["p99_ms"] == 2.0
    assert table[1]["requests"] == 40 and table[1]["failures"] == 1 and table[1]["p50_ms"] == 8.0


# -- the server's /metrics ----------------------------------------------------------------------
METRICS_BEFORE = """\
# HELP onnxserve_inference_count_total Rows inferred (batch rows summed).
# TYPE onnxserve_inference_count_total counter
onnxserve_inference_count_total{model="cnn",version="1"} 10.0
onnxserve_inference_count_total{model="lstm",version="1"} 5.0
onnxserve_inference_exec_count_total{model="cnn",version="1"} 10.0
onnxserve_inference_exec_count_total{model="lstm",version="1"} 5.0
onnxserve_queue_duration_seconds_sum{model="cnn",version="1"} 0.01
onnxserve_queue_duration_seconds_count{model="cnn",version="1"} 10.0
onnxserve_batch_size_bucket{le="1.0",model="cnn",version="1"} 10.0
onnxserve_batch_size_bucket{le="2.0",model="cnn",version="1"} 10.0
onnxserve_batch_size_bucket{le="4.0",model="cnn",version="1"} 10.0
onnxserve_batch_size_bucket{le="+Inf",model="cnn",version="1"} 10.0
onnxserve_request_success_total{model="cnn",version="1"} 10.0
"""
METRICS_AFTER = """\
onnxserve_inference_count_total{model="cnn",version="1"} 110.0
onnxserve_inference_count_total{model="lstm",version="1"} 25.0
onnxserve_inference_exec_count_total{model="cnn",version="1"} 50.0
onnxserve_inference_exec_count_total{model="lstm",version="1"} 25.0
onnxserve_queue_duration_seconds_sum{model="cnn",version="1"} 0.21
onnxserve_queue_duration_seconds_count{model="cnn",version="1"} 110.0
onnxserve_batch_size_bucket{le="1.0",model="cnn",version="1"} 20.0
onnxserve_batch_size_bucket{le="2.0",model="cnn",version="1"} 30.0
onnxserve_batch_size_bucket{le="4.0",model="cnn",version="1"} 50.0
onnxserve_batch_size_bucket{le="+Inf",model="cnn",version="1"} 50.0
onnxserve_request_success_total{model="cnn",version="1"} 108.0
onnxserve_request_failure_total{model="cnn",reason="queue_full",version="1"} 2.0
"""


@unit
def test_metric_deltas_give_mean_batch_size_queue_wait_and_histogram():
    delta = metric_delta(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER))
    cnn = server_view(delta, {"cnn"})
    assert cnn["rows_inferred"] == 100 and cnn["batches_executed"] == 40
    assert cnn["mean_batch_size"] == 2.5
    assert cnn["mean_queue_ms"] == pytest.approx(2.0)  # 0.2 s over 100 requests
    assert cnn["requests_succeeded"] == 98 and cnn["requests_failed"] == {"queue_full": 2}
    assert [(b["bucket"], b["batches"]) for b in cnn["batch_histogram"]] == [
        ("1", 10), ("2", 10), ("3-4", 20), (">4", 0)
    ]  # fmt: skip
    both = server_view(delta)
    assert both["rows_inferred"] == 120 and both["mean_batch_size"] == pytest.approx(120 / 60)
    assert batch_histogram(delta, {"lstm"}) == []


# -- capacity rule --------------------------------------------------------------------------
def row(users: int, rps: float, p99: float | None, failures: int = 0, requests: int = 1000):
    ratio = failures / requests if requests else 0.0
    return {"users": users, "rps": rps, "p99_ms": p99, "requests": requests,
            "failures": failures, "failure_ratio": ratio}  # fmt: skip


@unit
def test_capacity_rule():
    assert capacity.doubling(8) == [1, 2, 4, 8] and capacity.doubling(6) == [1, 2, 4, 6]
    assert capacity.doubling(1) == [1]
    assert capacity.meets_slo(row(1, 100, 50.0), 50, 0.001)  # the SLO's bound is included
    assert not capacity.meets_slo(row(1, 100, 50.1), 50, 0.001)
    assert not capacity.meets_slo(row(1, 100, 10.0, failures=1), 50, 0.001)  # 0.1% is too many
    assert capacity.meets_slo(row(1, 100, 10.0, failures=1, requests=1001), 50, 0.001)
    assert not capacity.meets_slo(row(1, 0, None, requests=0), 50, 0.001)
    rows = [row(1, 100, 5), row(2, 180, 9), row(4, 170, 20), row(8, 400, 80)]
    assert capacity.decide(rows, 50)["users"] == 2  # highest RPS within the SLO, not the last
    assert capacity.decide([row(1, 100, 90)], 50) is None


@unit
def test_capacity_search_stops_at_the_first_broken_step(tmp_path, monkeypatch):
    ran = []

    def fake_run_once(spec, out, plots=True):
        ran.append(spec.users)
        p99 = {1: 4.0, 2: 7.0, 4: 30.0}[spec.users]
        assert spec.reset_stats and spec.duration_s == spec.step_s and not plots
        return {
            "total": {"requests": 500, "rps": 100.0 * spec.users, "failures": 0,
                      "failure_ratio": 0.0, "latency_ms": {"p50": p99 / 2, "p99": p99}},
            "server": {"mean_batch_size": 1.5, "mean_queue_ms": 0.4},
            "load_generator": {"mean_percent": 40.0},
            "warnings": [],
        }  # fmt: skip

    monkeypatch.setattr(capacity, "run_once", fake_run_once)
    spec = LoadSpec(url="http://x", repository=tmp_path, step_s=3)
    result = capacity.find_capacity(spec, [1, 2, 4, 8], 20.0, tmp_path)
    assert ran == [1, 2, 4]  # 8 never ran
    assert result["capacity"]["users"] == 2 and result["stopped_early"] == "4 users broke the SLO"
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert [s["meets_slo"] for s in saved["steps"]] == [True, True, False]
    text = (tmp_path / "capacity.md").read_text()
    assert "| 4 | 400.0 | 15.0 | 30.0 | 0 (0.00%) | 1.50 | 0.40 | 40 | no |" in text
    assert "**Capacity: 200.0 requests/s** at 2 users" in text
    assert (tmp_path / "capacity.png").read_bytes()[:4] == b"\x89PNG"


# -- against a real server ------------------------------------------------------------------
@e2e
@pytest.mark.parametrize("model", MODELS)
def test_checks_pass_on_the_servers_real_answers(server, repository, model):
    meta = httpx.get(f"{server.url}/v2/models/{model}").json()
    traffic = ModelTraffic(meta, samples(repository, model))
    rng = np.random.default_rng(2)
    for protocol in HTTP_PROTOCOLS:
        payload = traffic.pool(protocol, 2, rng, size=1)[0]
        answer = httpx.post(server.url + payload.path, content=payload.body,
                            headers=payload.headers)  # fmt: skip
        length = answer.headers.get("inference-header-content-length")
        assert traffic.check(protocol, 2, answer.status_code, answer.content, length) is None
        assert traffic.check(protocol, 3, answer.status_code, answer.content, length)
        timing = parse_server_timing(answer.headers["server-timing"])
        assert set(timing) == {"queue", "compute", "total"}
    payload = traffic.pool(GRPC, 2, rng, size=1)[0]
    with grpc.insecure_channel(server.grpc) as channel:
        content, call = channel.unary_unary(payload.path).with_call(payload.body, timeout=30)
    assert traffic.check(GRPC, 2, GRPC_OK, content) is None
    timing = parse_server_timing(dict(call.trailing_metadata())["server-timing"])
    assert set(timing) == {"queue", "compute", "total"}


@e2e
def test_headless_grpc_run_through_the_cli(server, repository, tmp_path):
    out = tmp_path / "grpc-run"
    done = run_cli(
        "--url", server.url, "--grpc-url", f"grpc://{server.grpc}", "--repository",
        str(repository), "--model", "mixed", "--protocol", "grpc", "--rows", "2", "--users", "2",
        "--duration", "2s", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    total = summary["total"]
    assert total["requests"] > 0 and total["failures"] == 0
    assert {name for name in summary["endpoints"]} <= {f"{m} grpc" for m in MODELS}
    assert summary["server"]["requests_succeeded"] >= total["requests"]
    timing = summary["server_timing"]["total"]
    assert timing["with_server_timing"] == timing["requests"] == total["requests"]
    wrong = run_cli("--url", server.url, "--grpc-url", "127.0.0.1:9", "--protocol", "grpc",
                    "--repository", str(repository), "--out", str(tmp_path / "x"))  # fmt: skip
    assert wrong.returncode == 2 and "no gRPC server at 127.0.0.1:9" in wrong.stderr


@e2e
def test_headless_run_writes_summary_plots_and_locust_files(server, repository, tmp_path):
    out = tmp_path / "run"
    done = run_cli(
        "--url", server.url, "--repository", str(repository), "--model", "mixed",
        "--protocol", "mixed", "--users", "3", "--duration", "3s", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    total = summary["total"]
    assert total["requests"] > 0 and total["failures"] == 0 and total["failure_ratio"] == 0
    assert (
        0 < total["latency_ms"]["p50"] <= total["latency_ms"]["p99"] <= total["latency_ms"]["max"]
    )
    assert {name.split()[0] for name in summary["endpoints"]} <= set(MODELS)
    server_view = summary["server"]
    assert server_view["mean_batch_size"] >= 1 and server_view["mean_queue_ms"] >= 0
    assert server_view["requests_succeeded"] >= total["requests"]
    assert (
        sum(b["batches"] for b in server_view["batch_histogram"])
        == (server_view["batches_executed"])
    )
    timing = summary["server_timing"]["total"]
    assert timing["requests"] == total["requests"] == timing["with_server_timing"]
    assert timing["server_total_p50_ms"] <= timing["client_p50_ms"]
    assert summary["load_generator"]["samples"] > 0
    for name in ("timeline.png", "batch_sizes.png", "latency_split.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    for name in ("locust_stats.csv", "locust_stats_history.csv", "report.html", "locust.log"):
        assert (out / name).stat().st_size > 0
    assert "TOTAL" in done.stdout and "mean batch size" in done.stdout


@e2e
def test_step_load_with_locust_workers_reports_each_step(server, repository, tmp_path):
    out = tmp_path / "steps"
    done = run_cli(
        "--url", server.url, "--repository", str(repository), "--model", "lstm",
        "--protocol", V2_BINARY, "--rows", "2", "--step-users", "1,3", "--step-duration", "2",
        "--processes", "2", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["endpoints"]) == [f"lstm {V2_BINARY}"]
    assert [s["users"] for s in summary["steps"]] == [1, 3]
    assert all(s["requests"] > 0 and s["failures"] == 0 for s in summary["steps"])
    # Timings came from the worker processes to the master: one row per request.
    assert summary["server_timing"]["total"]["requests"] == summary["total"]["requests"]
    assert summary["server"]["rows_inferred"] >= 2 * summary["total"]["requests"]
    assert max(r["users"] for r in report.read_history(out / "locust_stats_history.csv")) == 3


@e2e
def test_capacity_search_writes_the_step_table(server, repository, tmp_path):
    out = tmp_path / "capacity"
    done = run_cli(
        "--url", server.url, "--repository", str(repository), "--model", "cnn",
        "--protocol", V2_JSON, "--find-capacity", "--step-users", "1,2", "--step-duration", "2",
        "--slo-p99-ms", "10000", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "capacity.json").read_text())
    assert [s["users"] for s in result["steps"]] == [1, 2]
    assert all(s["meets_slo"] and s["rps"] > 0 and s["mean_batch_size"] >= 1
               for s in result["steps"])  # fmt: skip
    assert result["capacity"]["rps"] == max(s["rps"] for s in result["steps"])
    assert "| users | RPS |" in (out / "capacity.md").read_text()
    assert (out / "capacity.png").read_bytes()[:4] == b"\x89PNG"
    for step in ("01-users-1", "02-users-2"):
        assert (out / "steps" / step / "summary.json").is_file()


@e2e
def test_a_missing_repository_is_a_clear_error(server, tmp_path):
    done = run_cli("--url", server.url, "--repository", str(tmp_path / "none"), "--duration", "1",
                   "--inputs", "samples")  # fmt: skip
    assert done.returncode == 2
    assert "onnxserve build" in done.stderr and "Traceback" not in done.stderr


# -- models without a task, config.json or samples ----------------------------------------------
@e2e
def test_models_without_a_task_are_load_tested_with_random_inputs(
    foreign_server, foreign_repository, tmp_path
):
    out = tmp_path / "foreign"
    done = run_cli(
        "--url", foreign_server.url, "--repository", str(foreign_repository), "--model", "mixed",
        "--mix", ",".join(FOREIGN), "--protocol", "mixed", "--rows", "1", "--shape", "series:6,3",
        "--users", "3", "--duration", "3s", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for model in FOREIGN:
        assert f"{model} inputs: random (from the metadata)" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    total = summary["total"]
    assert total["requests"] > 0 and total["failures"] == 0, summary["errors"]
    endpoints = set(summary["endpoints"])
    assert {name.split()[0] for name in endpoints} == set(FOREIGN)
    assert f"fixed {V1}" not in endpoints  # no batch axis: v1 is never sent to it
    assert summary["server"]["requests_succeeded"] >= total["requests"]


@e2e
def test_random_inputs_need_the_sizes_of_dynamic_axes(foreign_server, foreign_repository):
    common = ("--url", foreign_server.url, "--repository", str(foreign_repository))
    done = run_cli(*common, "--model", "tensors", "--duration", "1")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "give their sizes, e.g. --shape series:52,3 (without the batch axis)" in done.stderr
    done = run_cli(*common, "--model", "fixed", "--protocol", V1, "--duration", "1")
    assert done.returncode == 2 and "v1 `instances` need one" in done.stderr
    done = run_cli(*common, "--model", "nosuch", "--duration", "1")
    assert done.returncode == 2 and "404" in done.stderr
