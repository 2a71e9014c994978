"""An HTTP/1.1 load generator for machines without wrk (a GPU machine reached only by copying
files has no package manager): keep-alive connections spread over worker processes, each an
asyncio loop sending prepared POSTs back to back, counting answers by status with latencies.

Only the standard library (and uvloop when present) is imported, so workers start fast.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

SETUP_TIMEOUT_S = 60.0  # for workers to start and open their connections


@dataclass(frozen=True)
class Request:
    """One POST to send: path, body and headers (Content-Length is added)."""

    path: str
    body: bytes
    headers: dict[str, str]


def encode(request: Request, host: str) -> bytes:
    """The request's bytes on the wire (keep-alive)."""
    lines = [f"POST {request.path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive"]
    lines += [f"{k}: {v}" for k, v in request.headers.items()]
    lines.append(f"Content-Length: {len(request.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked body); its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def _drive(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    wire: list[bytes],
    end: float,
    offset: int,
    out: dict,
) -> None:
    """One connection: send, read the answer, repeat until `end` (answers after it not counted)."""
    i = offset
    try:
        while time.perf_counter() < end:
            sent = time.perf_counter()
            writer.write(wire[i % len(wire)])
            i += 1
            status = await read_response(reader)
            if time.perf_counter() <= end:
                out["latencies"].append(time.perf_counter() - sent)
                out["statuses"][status] = out["statuses"].get(status, 0) + 1
    except (OSError, asyncio.IncompleteReadError, ValueError):
        out["errors"] += 1
    finally:
        writer.close()


def _worker(
    url: str, wire: list[bytes], connections: int, seconds: float, barrier, results
) -> None:
    """One process: open `connections` keep-alive connections, wait at `barrier` for the
    others, load for `seconds`, put the counts on `results`."""
    parts = urlsplit(url)
    out: dict[str, Any] = {"latencies": [], "statuses": {}, "errors": 0}

    async def main() -> None:
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        opened = [await asyncio.open_connection(host, port) for _ in range(connections)]
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        end = time.perf_counter() + seconds
        await asyncio.gather(
            *(_drive(r, w, wire, end, k * 7, out) for k, (r, w) in enumerate(opened))
        )

    try:
        import uvloop

        run = getattr(uvloop, "run", asyncio.run)
    except ImportError:
        run = asyncio.run
    try:
        run(main())
    except (OSError, threading.BrokenBarrierError) as exc:
        barrier.abort()  # the others stop waiting for this one
        out["errors"] += 1
        out["failure"] = f"{type(exc).__name__}: {exc}"
    results.put(out)


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def run_load(
    url: str,
    requests: list[Request],
    connections: int,
    seconds: float,
    processes: int | None = None,
) -> dict[str, Any]:
    """`connections` connections cycling `requests` for `seconds`: req/s, statuses, latencies."""
    host = urlsplit(url).netloc
    wire = [encode(r, host) for r in requests]
    processes = max(1, min(connections, processes or max(1, (os.cpu_count() or 2) // 2)))
    shares = [connections // processes + (k < connections % processes) for k in range(processes)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(url, wire, n, seconds, barrier, results), daemon=True)
        for n in shares
    ]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=SETUP_TIMEOUT_S)  # every connection is open: the clock starts
    except threading.BrokenBarrierError:
        pass  # a worker failed to connect: it reports that below
    parts = [results.get(timeout=seconds + SETUP_TIMEOUT_S) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)
    latencies = sorted(x for p in parts for x in p["latencies"])
    statuses: dict[int, int] = {}
    for part in parts:
        for status, count in part["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    ok = sum(c for s, c in statuses.items() if 200 <= s < 300)
    return {
        "tool": "loadgen",
        "connections": connections,
        "processes": len(workers),
        "seconds": seconds,
        "requests": ok,
        "rps": ok / seconds,
        "non2xx": sum(statuses.values()) - ok,
        "socket_errors": sum(p["errors"] for p in parts),
        "failures": [p["failure"] for p in parts if "failure" in p],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "latency_ms": {
            f"p{q}": (None if (v := percentile(latencies, q)) is None else v * 1000)
            for q in (50, 90, 99)
        },
    }
