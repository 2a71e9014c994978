"""The overload benchmark's own logic: response parsing, percentiles, summaries, targets, the
Markdown section, and its closed-loop generator against a small fake HTTP server."""

from __future__ import annotations

import asyncio
import math
import re

import pytest

from loadtests import overload
from loadtests.overload import (
    DOC_BEGIN,
    DOC_END,
    ClosedLoop,
    Record,
    evaluate,
    parse_head,
    percentile,
    render_markdown,
    replace_section,
    summarize,
    zeros_body,
)

pytestmark = pytest.mark.unit


def test_parse_head_reads_status_length_and_headers():
    head = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 17\r\nX: a:b"
    status, length, headers = parse_head(head)
    assert (status, length) == (503, 17)
    assert headers == {"retry-after": "1", "content-length": "17", "x": "a:b"}
    assert parse_head(b"HTTP/1.1 204 No Content")[:2] == (204, 0)
    with pytest.raises(ValueError):
        parse_head(b"garbage")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 99) is None


def test_summarize_counts_only_the_window_and_splits_outcomes():
    records = [
        Record(0.5, 200, 0.010),  # before the window
        Record(1.0, 200, 0.020),
        Record(1.5, 200, 0.040),
        Record(1.6, 503, 0.002, retry_after=True),
        Record(1.7, 503, 0.004, retry_after=False),
        Record(1.8, 500, 0.001),
        Record(1.9, 504, 0.001),
        Record(3.0, 200, 9.0),  # after it
    ]
    s = summarize(records, 1.0, 3.0)
    assert s["responses"] == 6 and s["seconds"] == 2.0
    assert s["ok_per_s"] == 1.0 and s["responses_per_s"] == 3.0
    assert s["by_status"] == {"200": 2, "500": 1, "503": 2, "504": 1}
    assert s["ok_ms"]["max"] == 40.0 and s["refused_ms"]["p99"] == 4.0
    assert s["refused_without_retry_after"] == 1
    assert s["server_errors"] == 1  # 503 and 504 are the protocol's refusals, 500 is not


def _results(goodput: float = 1800.0, live_p99_ms: float = 300.0) -> dict:
    n_ok = int(goodput * 2)  # over a 2 s window
    steady = summarize(
        [Record(2 + 2 * i / n_ok, 200, 0.05) for i in range(n_ok)]
        + [Record(2 + i / 100, 503, 0.01, True) for i in range(100)],
        2.0,
        4.0,
    )
    return {
        "started": "2026-12-01T12:00:00+00:00",
        "command": "python -m loadtests.overload",
        "load_average": {"start": [0.1, 0.1, 0.1]},
        "machine": {"cpu": "test CPU", "cores": 2},
        "config": {"server_cpus": "0", "client_cpus": "1", "queue_size": 64, "overload_s": 4},
        "capacity": {
            "capacity_rps": 2000.0,
            "client_cpu_pct": 20.0,
            "generator": {"ok_per_s": 1900.0, "ok_ms": {"p99": 40.0}},
            "wrk": {"rps": 2000.0, "p99_ms": 35.0},
        },
        "overload": {
            "connections": 640,
            "queue_timeout_ms": 10000.0,
            "steady": steady,
            "all": steady,
            "offered_x_capacity": 1.0,
            "client_cpu_pct": 30.0,
            "server_cpu_pct": 99.0,
            "foreign_cpu_pct": 1.0,
            "connection_errors": 0,
            "unanswered": 0,
            "connections_answered": 640,
            "first_answer_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
            "liveness_new_connection": {
                "probes": 100,
                "failed": 0,
                "p50_ms": 2.0,
                "p99_ms": live_p99_ms,
                "max_ms": live_p99_ms,
            },
            "rss_before_mb": 100.0,
            "rss_peak_mb": 120.0,
            "rss_after_mb": 110.0,
            "rss_growth_mb": 10.0,
        },
        "big_bodies": {
            "rows": 4096,
            "json_bytes": 16_000_000,
            "gzip_bytes": 20_000,
            "seconds": 10,
            "requests": 8,
            "by_status": {"200": 8},
            "latency_ms": {"p50": 900.0},
            "health_probes": 400,
            "health_failed": 0,
            "health_ms": {"p50": 2.0, "p99": 250.0, "max": 300.0},
        },
        "lstm_rss": {
            "rows": 4096,
            "window": 1024,
            "body_bytes": 8_000_000,
            "statuses": [200, 200],
            "seconds": [5.0, 5.0],
            "rss_before_mb": 100.0,
            "rss_peak_mb": 5000.0,
            "rss_after_mb": 4900.0,
            "bomb": {
                "compressed_bytes": 1000,
                "inflated_bytes": 10**9,
                "status": 413,
                "rss_change_mb": 0.0,
            },
        },
    }


GOODPUT = "goodput at 640 conns ignoring Retry-After (200s/s, % of capacity)"


def test_evaluate_holds_each_figure_against_its_target():
    held = {t.what: t.held for t in evaluate(_results())}
    assert held[GOODPUT] is True  # 1800/2000 = 90%
    assert held["refusals to clients ignoring Retry-After: p99 latency of 503s"] is True
    assert held["refusals without Retry-After"] is True
    assert held["liveness on a new connection, p99"] is True
    assert held["health p99 (keep-alive) while 3 clients send maximal bodies"] is False
    assert held["RSS after a maximal LSTM batch, above before"] is False
    assert held["gzip bomb: status, RSS change"] is True
    worse = {t.what: t.held for t in evaluate(_results(goodput=1000, live_p99_ms=1500))}
    assert worse[GOODPUT] is False
    assert worse["liveness on a new connection, p99"] is False
    polite = _results()
    slow = summarize([Record(2 + i / 100, 503, 0.2, True) for i in range(100)], 2.0, 4.0)
    polite["overload_polite"] = {**polite["overload"], "steady": slow, "all": slow}
    held = {t.what: t.held for t in evaluate(polite)}
    assert held["goodput at 640 conns honouring Retry-After"] is False  # no 200s at all
    assert held["refusals to clients honouring Retry-After: p99 latency of 503s"] is False
    section = render_markdown(polite)
    assert "- overload, clients honouring Retry-After: 640 connections" in section


def test_markdown_section_replaces_only_its_own_part():
    section = render_markdown(_results())
    assert section.startswith(DOC_BEGIN) and section.rstrip().endswith(DOC_END)
    assert f"| {GOODPUT} | 90 % | >= 80% | held |" in section
    assert "**not held**" in section
    doc = f"# Hardening\n\nBefore.\n\n{DOC_BEGIN}\nold table\n{DOC_END}\n\nAfter.\n"
    updated = replace_section(doc, section)
    assert "old table" not in updated and "Before." in updated and "After." in updated
    assert updated.count(DOC_BEGIN) == 1
    assert replace_section("", section) == section
    assert replace_section("# Hardening\n", section).startswith("# Hardening\n\n" + DOC_BEGIN)


def test_zeros_body_is_a_v2_request_of_the_asked_shape():
    import orjson

    doc = orjson.loads(zeros_body("series", [2, 3, 1], b"0.00"))
    (tensor,) = doc["inputs"]
    assert tensor["name"] == "series" and tensor["shape"] == [2, 3, 1]
    assert tensor["data"] == [0.0] * math.prod([2, 3, 1])


async def _fake_server(answers: list[bytes]) -> tuple[asyncio.AbstractServer, int]:
    """Answers each request on a connection with the next of `answers`, in turn."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length[1]) if length else 0)
                writer.write(answers[n % len(answers)])
                n += 1
                await writer.drain()
                if b"connection: close" in answers[(n - 1) % len(answers)]:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_closed_loop_counts_answers_refusals_and_reconnects():
    ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    refused = (
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 11\r\n"
        b'connection: close\r\n\r\n{"error":1}'
    )

    async def main() -> ClosedLoop:
        server, port = await _fake_server([ok, ok, refused])
        request = overload.http_request("POST", "/v2/models/m/infer", b"{}")
        loop = ClosedLoop("127.0.0.1", port, [[request]], conns=3)
        async with server:
            await loop.run(0.3, 1.0)
        return loop

    loop = asyncio.run(main())
    statuses = {r.status for r in loop.records}
    assert statuses == {200, 503}
    assert all(r.retry_after for r in loop.records if r.status == 503)
    assert loop.connects > 3  # a refusal with `connection: close` made it reconnect
    assert loop.errors == 0 and loop.unanswered == 0
    assert len(loop.first_answers) >= 3  # every connection's first answer is timed
