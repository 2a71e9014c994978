"""Overload and hostile-traffic benchmark for issue 9's targets.

    python -m loadtests.overload [--out runs/overload-<stamp>.json] [--docs docs/hardening.md]

One real server (`onnxserve serve`, one ONNX Runtime thread) pinned to one core with taskset, the
CNN's queue set to 64 (`ONNXSERVE_MODEL_OVERRIDES`); the load generator pinned to the other core.
Phases, in order, on that one server:

a. capacity: single-sample CNN v2 JSON requests, 64 keep-alive connections, closed loop, measured
   by this module's generator (an asyncio HTTP/1.1 client on uvloop) and, when `wrk` is
   installed, cross-checked by wrk with loadtests/wrk/post.lua;
b. overload: 10x the connections (640), each re-sending at once whatever it is told (Retry-After
   ignored: the worst client), then (b2) the same with clients that honour Retry-After: goodput
   (200s/s) against capacity, the refusals' latency and Retry-After, the admitted requests'
   latency against 2x the queue timeout, 5xx other than 503/504, server RSS growth, and liveness
   on a NEW connection every 100 ms (from a separate process, so the generator's own loop lag is
   not counted);
c. three clients sending maximal legal bodies back to back (a JSON body of zeros as close to
   `max_json_body_bytes` as the limits allow, the same body gzip-compressed, and the most rows the
   limits allow as binary tensors) while another measures `GET /v2/health/live` on a keep-alive
   connection;
d. server RSS before and after the largest LSTM batch the limits allow (rows x window), twice,
   and a gzip bomb (refused, RSS unchanged).

Writes the JSON results and replaces the marked section of docs/hardening.md with a table of
each figure, its target from issue 9, and whether it held. Takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench.cpu import cpu_times, foreign_cpu_pct, parse_cpu_list, process_ticks
from loadtests.bench.machine import load_average, machine_info
from loadtests.bench.measure import http
from loadtests.bench.payloads import request_rows, write_requests
from loadtests.bench.wrk import parse_wrk_output, run_wrk
from loadtests.payloads import V2_JSON, Payload, make_payload
from loadtests.serverproc import ROOT, free_port, serve_command, serving
from service.codec import encode_request
from service.config import BatchingOverride, Settings
from service.model_config import CONFIG_FILE, SAMPLES_FILE, latest_version_dir, load_config
from service.validation import Limits, resolve_limits

#: Issue 9's targets.
GOODPUT_MIN_PCT = 80.0
REFUSAL_P99_MAX_MS = 50.0
ADMITTED_P99_MAX_TIMEOUTS = 2.0
LIVENESS_MAX_S = 1.0
RSS_GROWTH_MAX_MB = 50.0
HEALTH_P99_MAX_MS = 100.0
RSS_RETURN_MAX_MB = 200.0

QUEUE_SIZE = 64
CAPACITY_CONNS = 64
OVERLOAD_FACTOR = 10
PROBE_TIMEOUT_S = 5.0
DOC_BEGIN = "<!-- overload:begin (written by python -m loadtests.overload) -->"
DOC_END = "<!-- overload:end -->"


# -- pure parts: parsing, percentiles, summaries, targets, Markdown --------------------------------
def retry_after_s(headers: dict[str, str]) -> float:
    """A response's Retry-After in seconds (0 when absent or not a number of seconds)."""
    value = headers.get("retry-after", "")
    return float(value) if value.isdigit() else 0.0


def parse_head(head: bytes) -> tuple[int, int, dict[str, str]]:
    """Status, Content-Length (0 if absent) and lower-cased headers of an HTTP/1.1 response
    head (the bytes before the blank line)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    length = headers.get("content-length", "0")
    return int(parts[1]), int(length) if length.isdigit() else 0, headers


def percentile(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_ms(values_s: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max of latencies in seconds, as milliseconds."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "p50": ms(percentile(values_s, 50)),
        "p99": ms(percentile(values_s, 99)),
        "max": ms(max(values_s) if values_s else None),
    }


@dataclass(slots=True)
class Record:
    """One answered request: when it completed (s since the run began), status, latency (s),
    and whether the answer carried Retry-After."""

    done: float
    status: int
    latency: float
    retry_after: bool = False


def summarize(records: list[Record], start: float, end: float) -> dict[str, Any]:
    """Rates and latencies of the requests completed in [start, end) (seconds since the run
    began), by outcome."""
    span = max(end - start, 1e-9)
    window = [r for r in records if start <= r.done < end]
    ok = [r.latency for r in window if r.status == 200]
    refused = [r for r in window if r.status == 503]
    by_status: dict[str, int] = {}
    for r in window:
        by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    return {
        "seconds": round(span, 3),
        "responses": len(window),
        "responses_per_s": round(len(window) / span, 1),
        "ok_per_s": round(len(ok) / span, 1),
        "by_status": dict(sorted(by_status.items())),
        "ok_ms": latency_ms(ok),
        "refused_ms": latency_ms([r.latency for r in refused]),
        "refused_without_retry_after": sum(1 for r in refused if not r.retry_after),
        "server_errors": sum(1 for r in window if r.status >= 500 and r.status not in (503, 504)),
    }


@dataclass
class Target:
    """One figure against its target."""

    what: str
    value: float | None
    unit: str
    target: str
    held: bool | None  # None: not measured

    def row(self) -> str:
        shown = "n/a" if self.value is None else f"{self.value:,.6g} {self.unit}".strip()
        verdict = {True: "held", False: "**not held**", None: "not measured"}[self.held]
        if self.target == "reference":
            verdict = "-"
        return f"| {self.what} | {shown} | {self.target} | {verdict} |"


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def evaluate(results: dict[str, Any]) -> list[Target]:
    """Each measured figure against issue 9's target."""
    cap = results["capacity"]
    over = results["overload"]
    bodies = results["big_bodies"]
    lstm = results["lstm_rss"]
    capacity = cap["capacity_rps"]
    steady = over["steady"]
    timeout_s = over["queue_timeout_ms"] / 1000
    refusals = steady["by_status"].get("503", 0)
    live = over["liveness_new_connection"]
    targets = [
        Target("capacity (CNN, 1 sample, JSON, 64 conns)", capacity, "req/s", "reference", None),
        *_steady_targets(over, capacity, "ignoring", " (200s/s, % of capacity)"),
        Target(
            "refusals without Retry-After",
            steady["refused_without_retry_after"],
            f"of {refusals}",
            "0",
            steady["refused_without_retry_after"] == 0 if refusals else None,
        ),
        *(
            _steady_targets(polite, capacity, "honouring")
            if (polite := results.get("overload_polite"))
            else []
        ),
        Target(
            "admitted p99 latency",
            None if over["all"]["ok_ms"]["p99"] is None else over["all"]["ok_ms"]["p99"] / 1000,
            "s",
            f"<= {ADMITTED_P99_MAX_TIMEOUTS:g} x queue timeout = "
            f"{ADMITTED_P99_MAX_TIMEOUTS * timeout_s:g} s",
            _at_most(over["all"]["ok_ms"]["p99"], ADMITTED_P99_MAX_TIMEOUTS * timeout_s * 1000),
        ),
        Target(
            "liveness on a new connection, p99",
            None if live["p99_ms"] is None else live["p99_ms"] / 1000,
            "s",
            f"<= {LIVENESS_MAX_S:g} s",
            None
            if live["p99_ms"] is None
            else live["p99_ms"] <= LIVENESS_MAX_S * 1000 and not live["failed"],
        ),
        Target(
            "5xx other than 503/504",
            over["all"]["server_errors"],
            "",
            "0",
            over["all"]["server_errors"] == 0,
        ),  # fmt: skip
        Target(
            "server RSS growth over the overload",
            over["rss_growth_mb"],
            "MB",
            f"< {RSS_GROWTH_MAX_MB:g} MB",
            over["rss_growth_mb"] < RSS_GROWTH_MAX_MB,
        ),
        Target(
            "health p99 (keep-alive) while 3 clients send maximal bodies",
            bodies["health_ms"]["p99"],
            "ms",
            f"<= {HEALTH_P99_MAX_MS:g} ms",
            _at_most(bodies["health_ms"]["p99"], HEALTH_P99_MAX_MS)
            if not bodies["health_failed"]
            else False,
        ),
        Target(
            "RSS after a maximal LSTM batch, above before",
            lstm["rss_after_mb"] - lstm["rss_before_mb"],
            "MB",
            f"<= {RSS_RETURN_MAX_MB:g} MB",
            lstm["rss_after_mb"] - lstm["rss_before_mb"] <= RSS_RETURN_MAX_MB
            and all(s == 200 for s in lstm["statuses"]),
        ),
        Target(
            "gzip bomb: status, RSS change",
            lstm["bomb"]["rss_change_mb"],
            f"MB (status {lstm['bomb']['status']})",
            "4xx, no allocation",
            400 <= lstm["bomb"]["status"] < 500 and lstm["bomb"]["rss_change_mb"] < 50,
        ),
    ]
    return targets


def _steady_targets(
    over: dict[str, Any], capacity: float, clients: str, unit: str = ""
) -> list[Target]:
    """Goodput and refusal latency of an overload phase whose clients are `clients` (ignoring
    or honouring) Retry-After."""
    steady = over["steady"]
    goodput_pct = 100 * steady["ok_per_s"] / capacity if capacity else None
    p99 = steady["refused_ms"]["p99"]
    return [
        Target(
            f"goodput at {over['connections']} conns {clients} Retry-After{unit}",
            None if goodput_pct is None else round(goodput_pct, 1),
            "%",
            f">= {GOODPUT_MIN_PCT:g}%",
            None if goodput_pct is None else goodput_pct >= GOODPUT_MIN_PCT,
        ),
        Target(
            f"refusals to clients {clients} Retry-After: p99 latency of 503s",
            p99,
            "ms",
            f"<= {REFUSAL_P99_MAX_MS:g} ms",
            _at_most(p99, REFUSAL_P99_MAX_MS),
        ),
    ]


def _overload_line(title: str, over: dict[str, Any], cfg: dict[str, Any]) -> str:
    return (
        f"- {title}: {over['connections']} connections for {cfg['overload_s']} s, steady window "
        f"{over['steady']['seconds']} s: {over['steady']['responses_per_s']:,.0f} answers/s "
        f"({over['offered_x_capacity']}x capacity), by status {over['steady']['by_status']}; "
        f"200s p50 {over['steady']['ok_ms']['p50']} ms; 503s p50 "
        f"{over['steady']['refused_ms']['p50']} ms; client CPU {over['client_cpu_pct']:.0f}%, "
        f"server CPU {over['server_cpu_pct']:.0f}%; other processes took "
        f"{over['foreign_cpu_pct']:.0f}% of the server's CPU and "
        f"{over.get('client_foreign_cpu_pct', 0):.0f}% of the client's (the probe included); "
        f"connection errors {over['connection_errors']}; "
        f"unanswered at the end {over['unanswered']}."
    )


def render_markdown(results: dict[str, Any]) -> str:
    """The results section of docs/hardening.md: a table of targets and the figures behind it."""
    cfg = results["config"]
    cap, over = results["capacity"], results["overload"]
    bodies, lstm = results["big_bodies"], results["lstm_rss"]
    lines = [
        DOC_BEGIN,
        f"Measured {results['started']} on {results['machine']['cpu']} "
        f"({results['machine']['cores']} cores), load average at start "
        f"{results['load_average']['start']}: server on CPU {cfg['server_cpus']} "
        f"(1 ONNX Runtime thread, CNN queue {cfg['queue_size']}), load generator on CPU "
        f"{cfg['client_cpus']}. Command: `{results['command']}`.",
        "",
        "| figure | measured | target (issue 9) | |",
        "|---|---|---|---|",
        *(t.row() for t in evaluate(results)),
        "",
        "Details:",
        "",
        f"- capacity: {cap['generator']['ok_per_s']:,.0f} req/s by this module's generator "
        f"(client CPU {cap['client_cpu_pct']:.0f}%, p99 {cap['generator']['ok_ms']['p99']} ms)"
        + (
            f"; wrk {cap['wrk']['rps']:,.0f} req/s (p99 {cap['wrk']['p99_ms']} ms)"
            if cap.get("wrk")
            else "; wrk not installed"
        )
        + f". Capacity = the higher: {cap['capacity_rps']:,.0f} req/s.",
        _overload_line("overload, clients ignoring Retry-After", over, cfg),
        *(
            [_overload_line("overload, clients honouring Retry-After", polite, cfg)]
            if (polite := results.get("overload_polite"))
            else []
        ),
        f"- connections of the overload that got any answer: {over['connections_answered']} of "
        f"{over['connections']}; time from connecting to the first answer p50 "
        f"{over['first_answer_ms']['p50']} ms, p99 {over['first_answer_ms']['p99']} ms, max "
        f"{over['first_answer_ms']['max']} ms.",
        f"- liveness probes on new connections: {over['liveness_new_connection']['probes']} "
        f"(p50 {over['liveness_new_connection']['p50_ms']} ms, max "
        f"{over['liveness_new_connection']['max_ms']} ms, failed "
        f"{over['liveness_new_connection']['failed']}).",
        f"- server RSS: {over['rss_before_mb']} MB before the overload, peak "
        f"{over['rss_peak_mb']} MB, {over['rss_after_mb']} MB after.",
        f"- maximal bodies: JSON {bodies['json_bytes']:,} bytes ({bodies['rows']} CNN rows, "
        f"the max_json_body_bytes limit), its gzip {bodies['gzip_bytes']:,} bytes, binary "
        f"{bodies.get('binary_bytes', 0):,} bytes ({bodies.get('binary_rows', 0)} rows); "
        f"{bodies['requests']} answered in "
        f"{bodies['seconds']} s, by status {bodies['by_status']}, latency p50 "
        f"{bodies['latency_ms']['p50']} ms; health p50 {bodies['health_ms']['p50']} ms, p99 "
        f"{bodies['health_ms']['p99']} ms, max {bodies['health_ms']['max']} ms over "
        f"{bodies['health_probes']} probes.",
        f"- LSTM batch of {lstm['rows']} x {lstm['window']} ({lstm['body_bytes']:,}-byte JSON): "
        f"statuses {lstm['statuses']}, {lstm['seconds']} s each; RSS {lstm['rss_before_mb']} MB "
        f"before, peak {lstm['rss_peak_mb']} MB, {lstm['rss_after_mb']} MB after. Gzip bomb "
        f"({lstm['bomb']['compressed_bytes']:,} bytes inflating to "
        f"{lstm['bomb']['inflated_bytes']:,}): {lstm['bomb']['status']}.",
        DOC_END,
    ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, section: str) -> str:
    """`text` with the marked section replaced by `section` (appended if there is none)."""
    begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
    if begin < 0 or end < begin:
        return text.rstrip("\n") + "\n\n" + section if text.strip() else section
    return text[:begin] + section.rstrip("\n") + text[end + len(DOC_END) :]


# -- the load generator ---------------------------------------------------------------------------
class _Connection(asyncio.Protocol):
    """One keep-alive connection of a closed loop: send, wait for the whole answer, send again."""

    def __init__(self, loop: ClosedLoop, requests: list[bytes], offset: int) -> None:
        self.owner = loop
        self.requests, self.next = requests, offset
        self.buf = bytearray()
        self.head: tuple[int, int, int, dict[str, str]] | None = None  # end, status, length, hdrs
        self.sent_at: float | None = None
        self.opened = 0.0
        self.answered = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.opened = time.perf_counter()
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.owner.stopping:
            self.transport.close()
            return
        request = self.requests[self.next % len(self.requests)]
        self.next += 1
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = (end, *parse_head(bytes(self.buf[:end])))
        end, status, length, headers = self.head
        if len(self.buf) < end + 4 + length:
            return
        now = time.perf_counter()
        assert self.sent_at is not None
        self.owner.record(now, status, now - self.sent_at, "retry-after" in headers)
        if not self.answered:  # time from connecting to the first answer (accept included)
            self.answered = True
            self.owner.first_answers.append(now - self.opened)
        self.sent_at, self.head = None, None
        del self.buf[: end + 4 + length]
        if headers.get("connection", "").lower() == "close":
            assert self.transport is not None
            self.transport.close()  # connection_lost opens another
            return
        wait = retry_after_s(headers) if self.owner.polite and status == 503 else 0.0
        if wait:
            asyncio.get_running_loop().call_later(wait, self._send_if_open)
        else:
            self._send()

    def _send_if_open(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sent_at is not None and not self.owner.stopping:
            self.owner.errors += 1  # a request on the wire lost its connection
        self.owner.reopen(self.requests, self.next)


class ClosedLoop:
    """`conns` keep-alive connections, each sending its next request as soon as the previous one
    is answered (`polite`: a 503's Retry-After seconds later). Connection i cycles through
    `requests[i % len(requests)]`."""

    def __init__(
        self, host: str, port: int, requests: list[list[bytes]], conns: int, polite: bool = False
    ) -> None:
        self.host, self.port = host, port
        self.requests, self.conns, self.polite = requests, conns, polite
        self.records: list[Record] = []
        self.errors = 0
        self.connects = 0
        self.first_answers: list[float] = []
        self.stopping = False
        self.t0 = time.perf_counter()
        self.open: set[asyncio.Transport] = set()

    def record(self, now: float, status: int, latency: float, retry_after: bool) -> None:
        self.records.append(Record(now - self.t0, status, latency, retry_after))

    async def _connect(self, requests: list[bytes], offset: int) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                transport, _ = await loop.create_connection(
                    lambda: _Connection(self, requests, offset), self.host, self.port
                )
            except OSError:
                self.errors += 1
                await asyncio.sleep(0.05)
                continue
            self.open.add(transport)  # type: ignore[arg-type]
            self.connects += 1
            return

    def reopen(self, requests: list[bytes], offset: int) -> None:
        self.open = {t for t in self.open if not t.is_closing()}
        if not self.stopping:
            asyncio.get_running_loop().create_task(self._connect(requests, offset))

    def in_flight(self) -> int:
        return sum(
            1
            for t in self.open
            if not t.is_closing() and t.get_protocol().sent_at is not None  # type: ignore[attr-defined]
        )

    async def run(self, seconds: float, drain_s: float) -> None:
        """Send for `seconds`, then stop sending and wait up to `drain_s` for the answers still
        due; what is left unanswered is closed (and counted by `unanswered`)."""
        self.t0 = time.perf_counter()
        await asyncio.gather(
            *(self._connect(self.requests[i % len(self.requests)], i) for i in range(self.conns))
        )
        await asyncio.sleep(seconds - (time.perf_counter() - self.t0))
        self.stopping = True
        deadline = time.perf_counter() + drain_s
        while self.in_flight() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        self.unanswered = self.in_flight()
        for transport in self.open:
            transport.close()
        await asyncio.sleep(0.05)

    unanswered = 0


def run_loop(coro_factory: Callable[[], Any]) -> Any:
    """Run a coroutine on uvloop when installed (as fast a client as Python allows)."""
    try:
        import uvloop

        return uvloop.run(coro_factory())
    except ImportError:
        return asyncio.run(coro_factory())


def http_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> bytes:  # fmt: skip
    """A raw HTTP/1.1 request (keep-alive)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- probes (in a child process, so the generator's loop lag is not theirs) ----------------------
def _read_answer(sock: socket.socket) -> int:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the answer")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    status, length, _ = parse_head(buf[:end])
    rest = buf[end + 4 :]
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-answer")
        rest += chunk
    return status


def _get(port: int, request: bytes, sock: socket.socket | None) -> tuple[float, bool, Any]:
    """One GET on `sock` (a new connection if None): latency (s), whether it answered 200, and
    the socket to reuse (None after a failure)."""
    start = time.perf_counter()
    try:
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S)
        sock.sendall(request)
        ok = _read_answer(sock) == 200
    except OSError:
        if sock is not None:
            sock.close()
        return max(time.perf_counter() - start, PROBE_TIMEOUT_S), False, None
    return time.perf_counter() - start, ok, sock


def probe(port: int, path: str, interval_s: float, seconds: float, fresh: bool, out: Any) -> None:
    """GET `path` every `interval_s` for `seconds`: each on a new connection of its own
    (`fresh`: a slow answer does not delay the next probe), or one after another on one
    keep-alive connection. Sends back (latencies in s, failures) on `out`; a failed probe
    counts as at least PROBE_TIMEOUT_S."""
    request = http_request("GET", path)
    results: list[tuple[float, bool]] = []
    end = time.perf_counter() + seconds
    if fresh:

        def once() -> None:
            latency, ok, sock = _get(port, request, None)
            if sock is not None:
                sock.close()
            results.append((latency, ok))  # list.append is atomic

        threads = []
        while time.perf_counter() < end:
            threads.append(threading.Thread(target=once, daemon=True))
            threads[-1].start()
            time.sleep(interval_s)
        for thread in threads:
            thread.join(PROBE_TIMEOUT_S + 1)
    else:
        sock = None
        while time.perf_counter() < end:
            latency, ok, sock = _get(port, request, sock)
            results.append((latency, ok))
            time.sleep(max(0.0, interval_s - latency))
        if sock is not None:
            sock.close()
    out.send(([lat for lat, _ in results], sum(1 for _, ok in results if not ok)))
    out.close()


@contextlib.contextmanager
def probing(port: int, path: str, interval_s: float, seconds: float, fresh: bool,
            into: dict[str, Any]) -> Iterator[None]:  # fmt: skip
    """Run `probe` in a child process around the block; its results land in `into`."""
    ctx = mp.get_context("fork")
    mine, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=probe, args=(port, path, interval_s, seconds, fresh, theirs))
    child.start()
    try:
        yield
    finally:
        latencies, failed = mine.recv() if mine.poll(seconds + 30) else ([], -1)
        child.join(5)
        into.update(latencies=latencies, failed=failed)


# -- the server ----------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


class RssPeak:
    """The peak RSS of a process, sampled every 50 ms in a thread while in use."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssPeak:
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Setup:
    """What the run uses: repository, CPUs, durations, and the server's settings."""

    repository: Path
    server_cpus: str
    client_cpus: str
    capacity_s: float
    overload_s: float
    bodies_s: float
    settings: Settings = field(default_factory=Settings)

    def limits(self, model: str) -> Limits:
        config = load_config(self.repository / model / CONFIG_FILE)
        return resolve_limits(config, self.settings.batching_for(model), self.settings)

    def queue_timeout_ms(self, model: str) -> float:
        config = load_config(self.repository / model / CONFIG_FILE)
        return self.settings.batching_for(model).timeout_ms or config.batching.timeout_ms


def cnn_payloads(repository: Path, count: int = 16) -> list[Payload]:
    """Single-sample CNN v2 JSON requests from real held-out samples."""
    with np.load(latest_version_dir(repository / "cnn") / SAMPLES_FILE) as data:
        samples = data["inputs"]
    return [make_payload("cnn", V2_JSON, {"image": x}) for x in request_rows(samples, 1, count)]


def cnn_requests(repository: Path, count: int = 16) -> list[bytes]:
    """`cnn_payloads` as raw HTTP requests."""
    return [
        http_request("POST", p.path, p.body, p.headers) for p in cnn_payloads(repository, count)
    ]


def zeros_body(name: str, shape: list[int], number: bytes = b"0") -> bytes:
    """A v2 JSON body of one FP32 input of zeros, each written as `number`."""
    count = math.prod(shape)
    head = json.dumps({"name": name, "shape": shape, "datatype": "FP32"})[:-1]
    return (
        b'{"inputs":[' + head.encode() + b',"data":['
        + b",".join([number] * count) + b"]}]}"
    )  # fmt: skip


# -- phases ------------------------------------------------------------------------------------
def measure_capacity(setup: Setup, port: int, workdir: Path) -> dict[str, Any]:
    """Phase a: single-sample CNN requests at 64 connections (generator, then wrk if present)."""
    requests = cnn_requests(setup.repository)
    warm = ClosedLoop("127.0.0.1", port, [requests], CAPACITY_CONNS)
    run_loop(lambda: warm.run(2.0, 5.0))
    gen = ClosedLoop("127.0.0.1", port, [requests], CAPACITY_CONNS)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    run_loop(lambda: gen.run(setup.capacity_s, 5.0))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    summary = summarize(gen.records, 0.5, setup.capacity_s)
    result: dict[str, Any] = {
        "generator": summary,
        "client_cpu_pct": round(100 * client_cpu / setup.capacity_s, 1),
        "wrk": None,
    }
    if shutil.which("wrk"):
        manifest = write_requests(cnn_payloads(setup.repository), workdir, "cnn")
        seconds = max(1, round(setup.capacity_s))
        text, _, _ = run_wrk(
            f"http://127.0.0.1:{port}", manifest, CAPACITY_CONNS, seconds,
            setup.client_cpus, workdir / "wrk.log",
        )  # fmt: skip
        doc = parse_wrk_output(text)
        result["wrk"] = {
            "rps": round(doc["rps"], 1),
            "non2xx": doc["non2xx"],
            "socket_errors": doc["socket_errors"],
            "p50_ms": round(doc["latency_us"]["p50"] / 1000, 2),
            "p99_ms": round(doc["latency_us"]["p99"] / 1000, 2),
        }
    candidates = [summary["ok_per_s"]]
    if result["wrk"] and not result["wrk"]["non2xx"]:
        candidates.append(result["wrk"]["rps"])
    result["capacity_rps"] = max(candidates)
    return result


def measure_overload(
    setup: Setup, port: int, pid: int, capacity: float, polite: bool = False
) -> dict[str, Any]:
    """Phase b: 10x the connections, liveness on new connections, RSS, 5xx (`polite`: clients
    that honour Retry-After, phase b2)."""
    requests = cnn_requests(setup.repository)
    conns = OVERLOAD_FACTOR * CAPACITY_CONNS
    gen = ClosedLoop("127.0.0.1", port, [requests], conns, polite)
    drain = setup.queue_timeout_ms("cnn") / 1000 + 2
    live: dict[str, Any] = {}
    rss_before = rss_mb(pid)
    ticks0, cpus0 = process_ticks(pid), cpu_times()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    with RssPeak(pid) as peak, probing(port, "/v2/health/live", 0.1, setup.overload_s, True, live):
        run_loop(lambda: gen.run(setup.overload_s, drain))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    ticks, cpus1 = process_ticks(pid) - ticks0, cpu_times()
    wall = time.perf_counter() - gen.t0
    time.sleep(1.0)
    rss_after = rss_mb(pid)
    steady = summarize(gen.records, 2.0, setup.overload_s)
    hz = os.sysconf("SC_CLK_TCK")
    client_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    server_cpus, client_cpus = parse_cpu_list(setup.server_cpus), parse_cpu_list(setup.client_cpus)
    probes = live.get("latencies", [])
    return {
        "connections": conns,
        "queue_size": QUEUE_SIZE,
        "queue_timeout_ms": setup.queue_timeout_ms("cnn"),
        "all": summarize(gen.records, 0.0, wall + 1),
        "steady": steady,
        "offered_x_capacity": round(steady["responses_per_s"] / capacity, 2) if capacity else None,
        "connection_errors": gen.errors,
        "unanswered": gen.unanswered,
        "connections_answered": len(gen.first_answers),
        "first_answer_ms": latency_ms(gen.first_answers),
        "client_cpu_pct": round(100 * client_cpu / wall, 1),
        "server_cpu_pct": round(100 * ticks / hz / wall, 1),
        "foreign_cpu_pct": round(foreign_cpu_pct(cpus0, cpus1, server_cpus, ticks), 1),
        "client_foreign_cpu_pct": round(
            foreign_cpu_pct(cpus0, cpus1, client_cpus, client_cpu * hz), 1
        ),
        "liveness_new_connection": {
            "probes": len(probes),
            "failed": live.get("failed", -1),
            "p50_ms": latency_ms(probes)["p50"],
            "p99_ms": latency_ms(probes)["p99"],
            "max_ms": latency_ms(probes)["max"],
        },
        "rss_before_mb": rss_before,
        "rss_peak_mb": peak.peak,
        "rss_after_mb": rss_after,
        "rss_growth_mb": round(rss_after - rss_before, 1),
    }


def measure_big_bodies(setup: Setup, port: int) -> dict[str, Any]:
    """Phase c: three clients sending maximal legal bodies; health p99 on keep-alive."""
    limits = setup.limits("cnn")
    max_rows = min(limits.max_rows, limits.max_elements // (28 * 28))
    rows, body = max_rows, b""
    while rows > 1:  # the most rows of zeros written `0.00` that the JSON limit accepts
        body = zeros_body("image", [rows, 1, 28, 28], b"0.00")
        if len(body) <= setup.settings.max_json_body_bytes:
            break
        rows = rows * 9 // 10
    packed = gzip.compress(body, compresslevel=6)
    binary, header_len = encode_request({"image": np.zeros((max_rows, 1, 28, 28), np.float32)})
    headers = {"Content-Type": "application/json"}
    requests = [
        [http_request("POST", "/v2/models/cnn/infer", body, headers)],
        [http_request("POST", "/v2/models/cnn/infer", packed, {**headers,
                                                                "Content-Encoding": "gzip"})],
        [http_request("POST", "/v2/models/cnn/infer", binary, {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_len)})],
    ]  # fmt: skip
    gen = ClosedLoop("127.0.0.1", port, requests, 3)
    health: dict[str, Any] = {}
    with probing(port, "/v2/health/live", 0.02, setup.bodies_s, False, health):
        run_loop(lambda: gen.run(setup.bodies_s, 30.0))
    summary = summarize(gen.records, 0.0, setup.bodies_s + 30)
    probes = health.get("latencies", [])
    return {
        "rows": rows,
        "json_bytes": len(body),
        "gzip_bytes": len(packed),
        "binary_rows": max_rows,
        "binary_bytes": len(binary),
        "seconds": setup.bodies_s,
        "requests": summary["responses"],
        "by_status": summary["by_status"],
        "latency_ms": latency_ms([r.latency for r in gen.records]),
        "health_probes": len(probes),
        "health_failed": health.get("failed", -1),
        "health_ms": latency_ms(probes),
    }


def measure_lstm_rss(setup: Setup, port: int, pid: int, repeats: int = 2) -> dict[str, Any]:
    """Phase d: RSS around the largest LSTM batch the limits allow, then a gzip bomb."""
    limits = setup.limits("lstm")
    window = limits.max_dim
    rows = min(limits.max_rows, limits.max_elements // window)
    body = zeros_body("series", [rows, window, 1])
    url = f"http://127.0.0.1:{port}/v2/models/lstm/infer"
    time.sleep(1.0)
    before = rss_mb(pid)
    statuses, seconds = [], []
    with RssPeak(pid) as peak:
        for _ in range(repeats):
            start = time.perf_counter()
            status, _ = http(url, body, {"Content-Type": "application/json"}, timeout=120)
            seconds.append(round(time.perf_counter() - start, 2))
            statuses.append(status)
    time.sleep(2.0)
    after = rss_mb(pid)
    inflated = 64 * setup.settings.max_body_bytes
    bomb = gzip.compress(b"0" * inflated, compresslevel=9)
    bomb_before = rss_mb(pid)
    status, _ = http(
        url, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, timeout=60
    )
    bomb_after = rss_mb(pid)
    return {
        "rows": rows,
        "window": window,
        "body_bytes": len(body),
        "statuses": statuses,
        "seconds": seconds,
        "rss_before_mb": before,
        "rss_peak_mb": peak.peak,
        "rss_after_mb": after,
        "bomb": {
            "compressed_bytes": len(bomb),
            "inflated_bytes": inflated,
            "status": status,
            "rss_change_mb": round(bomb_after - bomb_before, 1),
        },
    }


def say(text: str) -> None:
    """Progress on stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# -- the command -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    p = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__.split(
        "\n\n")[0])  # fmt: skip
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / f"overload-{stamp}.json",
                   help="results JSON (default runs/overload-<stamp>.json)")  # fmt: skip
    p.add_argument("--docs", default=str(ROOT / "docs" / "hardening.md"),
                   help="Markdown file whose marked section gets the table ('': none)")  # fmt: skip
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--capacity-s", type=float, default=10.0)
    p.add_argument("--overload-s", type=float, default=20.0)
    p.add_argument("--bodies-s", type=float, default=12.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repository = args.repository.resolve()
    overrides = {"cnn": BatchingOverride(max_queue_size=QUEUE_SIZE)}
    setup = Setup(
        repository, args.server_cpus, args.client_cpus, args.capacity_s, args.overload_s,
        args.bodies_s, Settings(model_overrides=overrides),
    )  # fmt: skip
    os.sched_setaffinity(0, set(parse_cpu_list(args.client_cpus)))
    env = {
        "ONNXSERVE_MODEL_OVERRIDES": json.dumps({"cnn": {"max_queue_size": QUEUE_SIZE}}),
        "ONNXSERVE_MAX_BODY_BYTES": str(setup.settings.max_body_bytes),
    }
    threads = len(parse_cpu_list(args.server_cpus))
    port = free_port()
    cmd = serve_command(repository, "--threads", str(threads), port=port)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = load_average()
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        workdir = Path(tmp)
        log = workdir / "server.log"
        ready = f"http://127.0.0.1:{port}/v2/health/ready"
        with serving(cmd, log, ready, cpus=args.server_cpus, env=env) as process:
            pid = process.pid
            say(f"server pid {pid} on CPU {args.server_cpus}, port {port}")
            capacity = measure_capacity(setup, port, workdir)
            say(f"a. capacity {capacity['capacity_rps']:,.0f} req/s")
            overload = measure_overload(setup, port, pid, capacity["capacity_rps"])
            say(f"b. overload {overload['steady']['by_status']}")
            polite = measure_overload(setup, port, pid, capacity["capacity_rps"], polite=True)
            say(f"b2. overload, clients honouring Retry-After {polite['steady']['by_status']}")
            bodies = measure_big_bodies(setup, port)
            say(f"c. maximal bodies: health {bodies['health_ms']}")
            lstm = measure_lstm_rss(setup, port, pid)
            say(f"d. LSTM RSS {lstm['rss_before_mb']} -> {lstm['rss_after_mb']} MB")
        server_log = log.read_text(errors="replace")
    results = {
        "schema": 1,
        "command": " ".join(["python -m loadtests.overload", *(argv or sys.argv[1:])]),
        "started": started,
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": load_average()},
        "machine": machine_info(),
        "config": {
            "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus,
            "queue_size": QUEUE_SIZE,
            "capacity_s": args.capacity_s,
            "overload_s": args.overload_s,
            "bodies_s": args.bodies_s,
            "env": env,
            "generator": "asyncio + uvloop closed loop (loadtests/overload.py); wrk cross-check",
        },
        "capacity": capacity,
        "overload": overload,
        "overload_polite": polite,
        "big_bodies": bodies,
        "lstm_rss": lstm,
        "server_log_errors": [line for line in server_log.splitlines() if "Traceback" in line][:5],
    }
    results["targets"] = [t.__dict__ for t in evaluate(results)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    section = render_markdown(results)
    if args.docs:
        docs = Path(args.docs)
        docs.write_text(replace_section(docs.read_text() if docs.exists() else "", section))
    say(section)
    say(f"wrote {args.out}" + (f" and {args.docs}" if args.docs else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
