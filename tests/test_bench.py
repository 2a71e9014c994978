"""The benchmark's pure parts: wrk output, /metrics and /proc parsing, payloads, targets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import orjson
import pytest

from loadtests.bench.cells import SERVERS, display_order, plan, server_command
from loadtests.bench.cpu import foreign_cpu_pct, parse_cpu_list, parse_cpu_times, parse_proc_stat
from loadtests.bench.grpcload import grpc_command, read_manifest
from loadtests.bench.grpcload import summary as grpc_summary
from loadtests.bench.payloads import manifest_text, request_rows
from loadtests.bench.render import render_docs, render_markdown
from loadtests.bench.targets import (
    TARGETS,
    attach_comparisons,
    evaluate,
    evaluate_targets,
    find_cell,
)
from loadtests.bench.wrk import BENCH_JSON, LUA_SCRIPT, parse_wrk_output
from loadtests.payloads import GRPC, V1, V2_BINARY, V2_JSON, make_payload
from loadtests.prom import counter_total, mean_batch_size, parse_samples
from service.codec import decode_request
from service.grpc import messages as pb
from service.grpc.tensors import decode_request as decode_grpc

pytestmark = pytest.mark.unit

WRK_LINE = (
    'BENCH_JSON {"requests":20000,"duration_us":4000000,"bytes":123456,'
    '"errors":{"connect":1,"read":2,"write":3,"status":7,"timeout":4},'
    '"latency_us":{"min":100.0,"mean":900.5,"stdev":50.0,"max":9000.0,'
    '"p50":800.0,"p75":950.0,"p90":1200.0,"p99":3000.0,"p99.9":5000.0}}'
)


# -- wrk ------------------------------------------------------------------------------------------
def test_wrk_json_line_is_found_among_wrk_chatter():
    text = f"Running 4s test @ http://127.0.0.1:8000\n  1 threads and 64 connections\n{WRK_LINE}\n"
    doc = parse_wrk_output(text)
    assert doc["rps"] == pytest.approx(5000.0)
    assert doc["duration_s"] == pytest.approx(4.0)
    assert doc["latency_us"]["p99"] == 3000.0 and doc["latency_us"]["p99.9"] == 5000.0
    assert doc["non2xx"] == 7
    assert doc["socket_errors"] == 1 + 2 + 3 + 4


def test_wrk_nan_from_an_empty_histogram_becomes_null():
    line = WRK_LINE.replace('"stdev":50.0', '"stdev":-nan').replace('"mean":900.5', '"mean":nan')
    doc = parse_wrk_output(line)
    assert doc["latency_us"]["stdev"] is None and doc["latency_us"]["mean"] is None


def test_wrk_output_without_the_json_line_is_an_error():
    with pytest.raises(ValueError, match="BENCH_JSON"):
        parse_wrk_output("unable to connect to 127.0.0.1:9 Connection refused\n")


def test_lua_script_prints_every_field_the_parser_reads():
    lua = LUA_SCRIPT.read_text()
    assert BENCH_JSON in lua
    for key in ("requests", "duration_us", "connect", "read", "write", "status", "timeout"):
        assert f'"{key}":' in lua
    for p in ("p50", "p75", "p90", "p99", "p99.9"):
        assert f'"{p}":' in lua
    assert "latency:percentile(99)" in lua


def test_manifest_has_path_file_and_headers_per_line(tmp_path: Path):
    text = manifest_text(
        [
            ("/v2/models/cnn/infer", tmp_path / "a.body", {"Content-Type": "application/json"}),
            ("/v1/models/cnn:predict", tmp_path / "b.body", {"A": "1", "B": "2"}),
        ]
    )
    lines = text.splitlines()
    assert lines[0].split("\t") == [
        "/v2/models/cnn/infer",
        str(tmp_path / "a.body"),
        "Content-Type: application/json",
    ]
    assert lines[1].split("\t")[2:] == ["A: 1", "B: 2"]
    assert text.endswith("\n")


def test_manifest_refuses_tabs_in_fields(tmp_path: Path):
    with pytest.raises(ValueError, match="tab"):
        manifest_text([("/x", tmp_path / "a", {"H": "a\tb"})])


# -- payloads -------------------------------------------------------------------------------------
def test_binary_payload_decodes_to_the_same_array_with_the_service_codec():
    x = np.arange(2 * 1 * 28 * 28, dtype=np.float32).reshape(2, 1, 28, 28) / 7
    payload = make_payload("cnn", V2_BINARY, {"image": x})
    assert payload.path == "/v2/models/cnn/infer"
    request = decode_request(payload.body, payload.headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(request.inputs["image"], x)
    assert request.binary_output is True


def test_json_payload_decodes_to_the_same_array_with_the_service_codec():
    x = np.random.default_rng(0).random((1, 52, 1), dtype=np.float32)
    payload = make_payload("lstm", V2_JSON, {"series": x})
    assert payload.headers == {"Content-Type": "application/json"}
    np.testing.assert_array_equal(decode_request(payload.body).inputs["series"], x)


def test_v1_payload_holds_one_instance_per_row():
    x = np.ones((3, 1, 2, 2), dtype=np.float32)
    payload = make_payload("cnn", V1, {"image": x})
    assert payload.path == "/v1/models/cnn:predict"
    assert np.asarray(orjson.loads(payload.body)["instances"]).shape == (3, 1, 2, 2)


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError):
        make_payload("cnn", "thrift", {"image": np.zeros((1, 1), np.float32)})


def test_grpc_payload_is_a_serialized_model_infer_request_in_the_manifest(tmp_path: Path):
    x = np.arange(2 * 784, dtype=np.float32).reshape(2, 1, 28, 28)
    payload = make_payload("cnn", GRPC, {"image": x})
    assert payload.path == "/inference.GRPCInferenceService/ModelInfer" and payload.headers == {}
    request = decode_grpc(pb.ModelInferRequest.FromString(payload.body))
    np.testing.assert_array_equal(request.inputs["image"], x)
    (tmp_path / "b").write_bytes(payload.body)
    (tmp_path / "m.tsv").write_text(manifest_text([(payload.path, tmp_path / "b", {})]))
    assert read_manifest(tmp_path / "m.tsv") == [(payload.path, payload.body)]


def test_grpc_generator_summary_reads_as_wrks():
    errors = {"connect": 0, "read": 0, "write": 0, "status": 2, "timeout": 1}
    doc = grpc_summary([100.0, 300.0, 200.0, 400.0], 2.0, 1234, errors)
    parsed = parse_wrk_output("chatter\n" + BENCH_JSON + json.dumps(doc) + "\n")
    assert parsed["requests"] == 4 and parsed["rps"] == pytest.approx(2.0)
    assert parsed["non2xx"] == 2 and parsed["socket_errors"] == 1
    assert parsed["latency_us"]["p50"] == pytest.approx(250.0)
    assert parsed["latency_us"]["max"] == 400.0
    cmd = grpc_command("127.0.0.1:1", Path("m.tsv"), 64, 8, "1")
    assert cmd[:3] == ["taskset", "-c", "1"] and cmd[-4:] == ["--calls", "64", "--seconds", "8"]


def test_request_rows_wrap_round_the_samples():
    samples = np.arange(5, dtype=np.float32)[:, None]
    parts = request_rows(samples, 3, 2)
    assert [p[:, 0].tolist() for p in parts] == [[0, 1, 2], [3, 4, 0]]


# -- /metrics and /proc ---------------------------------------------------------------------------
def _exposition(rows: float, runs: float) -> str:
    return f"""\
# HELP onnxserve_inference_count_total Rows inferred (batch rows summed).
# TYPE onnxserve_inference_count_total counter
onnxserve_inference_count_total{{model="cnn",version="1"}} {rows}
onnxserve_inference_count_total{{model="lstm",version="1"}} 999.0
onnxserve_inference_count_created{{model="cnn",version="1"}} 1.7e9
# TYPE onnxserve_inference_exec_count_total counter
onnxserve_inference_exec_count_total{{model="cnn",version="1"}} {runs}
onnxserve_inference_exec_count_total{{model="lstm",version="1"}} 10.0
"""


def test_mean_batch_size_is_rows_over_runs_between_scrapes():
    before, after = _exposition(100.0, 50.0), _exposition(100.0 + 640, 50.0 + 20)
    assert mean_batch_size(before, after, "cnn") == pytest.approx(32.0)


def test_mean_batch_size_is_none_when_nothing_ran():
    text = _exposition(10.0, 5.0)
    assert mean_batch_size(text, text, "cnn") is None
    assert mean_batch_size("", "", "cnn") is None


def test_counter_is_summed_over_versions():
    text = (
        'onnxserve_inference_count_total{model="cnn",version="1"} 3\n'
        'onnxserve_inference_count_total{model="cnn",version="2"} 4\n'
    )
    assert counter_total(text, "onnxserve_inference_count_total", "cnn") == 7


def test_prometheus_labels_with_escaped_quotes_and_commas():
    samples = parse_samples('m{a="x\\"y",b="1,2"} 5e0\nbad line\n# comment\nn 2\n')
    assert samples == [("m", {"a": 'x\\"y', "b": "1,2"}, 5.0), ("n", {}, 2.0)]


def test_proc_stat_with_spaces_and_parens_in_the_command_name():
    fields = ["S"] + ["0"] * 10 + ["150", "25"] + ["0"] * 30
    text = "1234 (py (thon) x) " + " ".join(fields)
    assert parse_proc_stat(text) == 175


def test_foreign_cpu_is_busy_time_not_ours():
    before = parse_cpu_times(
        "cpu  1 2 3 4\ncpu0 100 0 50 800 10 0 0 0 0 0\ncpu1 10 0 10 900 0 0 0 0 0 0\n"
    )
    after = parse_cpu_times(
        "cpu  1 2 3 4\ncpu0 160 0 90 800 10 0 0 0 0 0\ncpu1 10 0 10 1000 0 0 0 0 0 0\n"
    )
    assert before[0] == (150, 960)
    # cpu0: 100 ticks busy of 100; we used 80 of them
    assert foreign_cpu_pct(before, after, [0], own_ticks=80) == pytest.approx(20.0)
    assert foreign_cpu_pct(before, after, [1], own_ticks=0) == 0.0
    assert foreign_cpu_pct(before, after, [0], own_ticks=500) == 0.0


@pytest.mark.parametrize(
    ("text", "cpus"), [("0", [0]), ("1,0", [0, 1]), ("0-3", [0, 1, 2, 3]), ("2-3,0", [0, 2, 3])]
)
def test_cpu_lists(text: str, cpus: list[int]):
    assert parse_cpu_list(text) == cpus


def test_empty_cpu_list_is_refused():
    with pytest.raises(ValueError):
        parse_cpu_list(" ")


# -- targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "op", "threshold", "failed", "status"),
    [
        (1.9, ">=", 1.9, 0, "PASS"),
        (1.89, ">=", 1.9, 0, "FAIL"),
        (0.5, "<=", 0.5, 0, "PASS"),
        (0.51, "<=", 0.5, 0, "FAIL"),
        (None, ">=", 1.0, 0, "FAIL"),
        (3.0, ">=", 1.9, 1, "FAIL"),
    ],
)
def test_target_rule(value, op, threshold, failed, status):
    assert evaluate(value, op, threshold, failed) == status


def test_unknown_operator_is_an_error():
    with pytest.raises(ValueError):
        evaluate(1.0, "==", 1.0)


def _fake_cells(rps: dict[tuple, float] | None = None) -> list[dict]:
    """Every planned cell, measured: 1000 req/s, p50 1 ms, p99 10 ms unless `rps` says."""
    cells = []
    for spec in plan():
        key = (spec.server, spec.model, spec.protocol, spec.conns, spec.rows, spec.batching)
        value = (rps or {}).get(key, 1000.0)
        cells.append(
            {
                **spec.__dict__,
                "label": spec.label,
                "error": None,
                "rps": value,
                "samples_per_s": value * spec.rows,
                "latency_us": {"p50": 1000.0, "p99": 10000.0},
                "failed_requests": 0,
                "wrk_saturated": False,
                "noisy": False,
            }
        )
    return cells


INPROCESS = {
    "other_cpu_pct": 2.0,
    "models": {
        "cnn": {
            "ceiling": [{"batch": 32, "samples_per_s": 64_000.0, "ms_per_batch": 0.5}],
            "floor": [
                {
                    "protocol": V2_JSON,
                    "rows": 1,
                    "body_bytes": 7000,
                    "req_per_s": 8000.0,
                    "samples_per_s": 8000.0,
                    "us": {"decode": 60.0, "run": 50.0, "encode": 10.0, "total": 125.0},
                }
            ],
        }
    },
}


def _by_id(targets: list[dict]) -> dict[str, dict]:
    return {t["id"]: t for t in targets}


def test_every_target_finds_its_cells_in_the_plan():
    targets = evaluate_targets(_fake_cells(), INPROCESS)
    assert {t["id"] for t in targets} == {t.id for t in TARGETS}
    for t in targets:
        assert t["value"] is not None, t["id"]
        assert "not measured" not in t["note"]


def test_targets_compare_the_right_cells():
    on, off = "on", "off"
    cells = _fake_cells(
        {
            ("baseline", "cnn", V2_JSON, 64, 1, "n/a"): 2000.0,
            ("onnxserve", "cnn", V2_JSON, 64, 1, on): 4000.0,
            ("onnxserve", "cnn", V2_BINARY, 64, 1, on): 4700.0,
            ("onnxserve", "cnn", V2_BINARY, 16, 32, on): 1500.0,  # 48,000 samples/s
            ("onnxserve", "cnn", GRPC, 64, 1, on): 5170.0,
            ("onnxserve", "cnn", GRPC, 16, 32, on): 1400.0,  # 44,800 samples/s
            ("onnxserve", "lstm", V2_JSON, 64, 1, on): 1800.0,
            ("onnxserve", "lstm", V2_JSON, 64, 1, off): 1000.0,
        }
    )
    targets = _by_id(evaluate_targets(cells, INPROCESS))
    assert targets["cnn_64c_json_rps"]["value"] == pytest.approx(2.0)
    assert targets["cnn_64c_json_rps"]["status"] == "PASS"
    assert targets["cnn_64c_binary_rps"]["value"] == pytest.approx(2.35)
    assert targets["cnn_64c_binary_rps"]["status"] == "FAIL"
    assert targets["cnn_32row_ceiling"]["value"] == pytest.approx(0.75)
    assert targets["cnn_32row_ceiling"]["status"] == "PASS"
    assert targets["cnn_64c_grpc_rps"]["value"] == pytest.approx(1.1)
    assert targets["cnn_64c_grpc_rps"]["status"] == "PASS"
    assert targets["cnn_32row_grpc_ceiling"]["value"] == pytest.approx(0.7)
    assert targets["cnn_32row_grpc_ceiling"]["status"] == "PASS"
    assert targets["lstm_64c_json_batching"]["value"] == pytest.approx(1.8)
    assert targets["lstm_64c_json_batching"]["status"] == "PASS"
    assert targets["cnn_64c_json_p99"]["value"] == pytest.approx(1.0)
    assert targets["cnn_64c_json_p99"]["status"] == "FAIL"
    assert targets["cnn_1c_json_p50"]["status"] == "PASS"


def test_a_missing_or_failing_cell_fails_its_target_with_a_note():
    cells = [
        c
        for c in _fake_cells()
        if not (c["server"] == "baseline" and c["model"] == "cnn" and c["conns"] == 64)
    ]
    for c in cells:
        if c["model"] == "lstm" and c["batching"] == "off" and c["protocol"] == V2_JSON:
            c["failed_requests"] = 3
        if c["model"] == "cnn" and c["conns"] == 1 and c["server"] == "onnxserve":
            c["noisy"] = True
    targets = _by_id(evaluate_targets(cells, INPROCESS))
    assert targets["cnn_64c_json_rps"]["status"] == "FAIL"
    assert "not measured" in targets["cnn_64c_json_rps"]["note"]
    assert targets["lstm_64c_json_batching"]["status"] == "FAIL"
    assert "3 failed requests" in targets["lstm_64c_json_batching"]["note"]
    assert "noisy" in targets["cnn_1c_json_p50"]["note"]


def test_comparisons_are_against_the_baseline_with_the_same_connections():
    cells = _fake_cells({("baseline", "cnn", V2_JSON, 16, 1, "n/a"): 500.0})
    attach_comparisons(cells, INPROCESS)
    cell = find_cell(cells, server="onnxserve", model="cnn", protocol="v1", conns=16, batching="on")
    assert cell["vs_baseline"]["rps"] == pytest.approx(2.0)
    assert cell["vs_batching_off"] == pytest.approx(1.0)
    big = find_cell(cells, server="onnxserve", model="cnn", rows=32, conns=16)
    assert big["vs_ceiling"] == pytest.approx(32_000 / 64_000)


def test_markdown_shows_every_target_and_cell():
    cells = _fake_cells()
    attach_comparisons(cells, INPROCESS)
    for c in cells:
        c.update(cpu_pct={"server": 99.0, "wrk": 20.0}, other_cpu_pct={"server_cpus": 1.0})
    results = {
        "command": ".venv/bin/python -m loadtests.bench --quick",
        "started": "t0",
        "finished": "t1",
        "load_average": {"start": [0.1, 0.1, 0.1], "end": [0.2, 0.2, 0.2]},
        "machine": {
            "cpu": "AMD EPYC",
            "cores": 2,
            "platform": "Linux",
            "python": "3.11.7",
            "wrk": "wrk 4.1.0",
            "packages": {"onnxruntime": "1.2", "numpy": "2", "fastapi": "0.1", "uvicorn": "0.3"},
        },
        "config": {
            "quick": True,
            "seconds": 2,
            "warmup": 1,
            "server_cpus": "0",
            "wrk_cpus": "1",
            "threads": 1,
            "repository": "model_repository",
            "models": {"cnn": {"version": 1}},
        },
        "inprocess": INPROCESS,
        "cells": cells,
        "targets": evaluate_targets(cells, INPROCESS),
    }
    text = render_markdown(results)
    assert "Quick mode" in text and "--quick" in text
    assert len(re.findall(r"\*\*(PASS|FAIL)\*\*", text)) == len(TARGETS)
    table = [
        line
        for line in text.splitlines()
        if line.startswith("| onnxserve") or line.startswith("| baseline")
    ]
    assert len(table) == len(cells)
    assert render_docs(results).startswith("# Benchmarks")


def test_plan_measures_compared_cells_side_by_side():
    specs = plan()
    assert len(set(specs)) == len(specs)
    labels = [s.label for s in specs]
    base = labels.index(f"baseline cnn {V2_JSON} rows=1 conns=64")
    assert labels[base + 1] == f"onnxserve[batching on] cnn {V2_JSON} rows=1 conns=64"
    assert labels[base + 2] == f"onnxserve[batching off] cnn {V2_JSON} rows=1 conns=64"
    grpc = labels.index(f"onnxserve[batching on] cnn {GRPC} rows=1 conns=64")
    assert labels[grpc - 2] == f"onnxserve[batching on] cnn {V1} rows=1 conns=64"
    big = labels.index(f"onnxserve[batching on] cnn {GRPC} rows=32 conns=16")
    assert labels[big - 1] == f"onnxserve[batching on] cnn {V2_BINARY} rows=32 conns=16"
    assert {s.batching for s in specs if s.protocol == GRPC} == {"on"}


def test_report_order_groups_cells_by_server():
    cells = _fake_cells()
    cells.sort(key=display_order)
    servers = [(c["server"], c["batching"]) for c in cells]
    assert servers == sorted(servers, key=SERVERS.index)


def test_server_commands():
    base = server_command("baseline", "n/a", Path("repo"), 1)
    assert "loadtests.baselines.fastapi_baseline" in base and "--threads" in base
    off = server_command("onnxserve", "off", Path("repo"), 1)
    assert off[-1] == "--no-batching" and "serve" in off
    assert "--no-batching" not in server_command("onnxserve", "on", Path("repo"), 1)


def test_stage_split_takes_the_innermost_stage_frame_and_the_thread():
    from loadtests.bench.stages import LOOP, WORKER, split_profile

    outer = "thread (1): MainThread;Server.run (uvicorn/server.py:86)"
    main = f"{outer};Runner.run (asyncio/runners.py:118)"
    lane = f"{main};GuardedProtocol.data_received (service/httpserver.py:206)"
    begin = f"{lane};DataPlane.begin_v2 (service/dataplane.py:245)"
    respond = f"{lane};GuardedProtocol._lane_respond (service/httpserver.py:310)"
    worker = "thread (2): ort-cnn-2_0;Thread.run (threading.py:982)"
    raw = "\n".join([
        f"{begin};decode_request (service/codec.py:235);_loads (service/codec.py:68) 5",
        f"{begin};Batcher.enqueue (service/batcher.py:160) 2",
        f"{respond};OneWrite.write_whole (service/httpserver.py:124) 3",
        f"{lane} 4",
        f"{main} 6",
        f"{worker};Session.run (onnxruntime/x.py:406) 7",
    ])  # fmt: skip
    split = split_profile(raw)
    assert split == {
        "decode (JSON or binary to arrays)": 5,
        "batcher (queue, join, split)": 2,
        "socket writes": 3,
        "HTTP in Python (parse callbacks, routing, ASGI, lanes)": 4,
        LOOP: 6,
        WORKER: 7,
    }


def test_layers_split_requests_off_a_stream():
    from loadtests.bench.layers import split_request

    one = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    assert split_request(one[:10]) is None  # the head is not in yet
    assert split_request(one[:-1]) is None  # nor the whole body
    head, body, rest = split_request(one + b"GET / HTTP/1.1\r\n\r\n")
    assert head.startswith(b"POST /x") and head.endswith(b"\r\n") and body == b"abc"
    assert split_request(rest) == (b"GET / HTTP/1.1\r\n", b"", b"")


def test_layers_bare_protocol_answers_pipelined_requests_in_order():
    import asyncio

    from loadtests.bench.layers import FIXED_ANSWER, BareProtocol

    async def scenario() -> bytes:
        seen: list[bytes] = []

        def answer(transport, head, body):
            seen.append(body)
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: BareProtocol(answer), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        post = b"POST /v2/models/cnn/infer HTTP/1.1\r\ncontent-length: 2\r\n\r\n"
        writer.write(post + b"p1" + b"GET /v2/health/ready HTTP/1.1\r\n\r\n" + post[:20])
        writer.write(post[20:] + b"p2")  # the third request split across two writes
        want = 2 * len(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\np1") + len(FIXED_ANSWER)
        data = await asyncio.wait_for(reader.readexactly(want), 10)
        writer.close()
        server.close()
        assert seen == [b"p1", b"p2"]
        return data

    data = asyncio.run(scenario())
    assert data.index(b"p1") < data.index(FIXED_ANSWER) < data.index(b"p2")


def test_rounds_report_each_cells_median_round_and_keep_every_rounds_rps():
    from loadtests.bench.cells import median_rounds

    def cell(label: str, rps: float, error: str | None = None) -> dict:
        return {"label": label, "rps": rps, "error": error, "p50": rps / 10}

    rounds = [
        [cell("a", 100), cell("b", 7)],
        [cell("a", 300), cell("b", 9, "refused")],
        [cell("a", 200), cell("b", 8)],
    ]
    a, b = median_rounds(rounds)
    assert a["rps"] == 200 and a["p50"] == 20 and a["rps_rounds"] == [100, 300, 200]
    assert b["error"] == "refused" and b["rps_rounds"] == [7, 9, 8]  # a failure is not hidden
    even = median_rounds([[cell("a", 100)], [cell("a", 300)]])
    assert even[0]["rps"] == 100  # the lower of the middle two
    with pytest.raises(ValueError):
        median_rounds([[cell("a", 1)], [cell("a", 2), cell("b", 3)]])  # rounds of one plan
