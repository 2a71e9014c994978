"""A closed-loop gRPC load generator for the benchmark, where wrk cannot go (wrk speaks HTTP/1.1).

    python -m loadtests.bench.grpcload HOST:PORT MANIFEST --calls 64 --seconds 8 [--channels 1]

`--calls` coroutines on one asyncio loop (uvloop when installed) each send their next call when
the last is answered, as wrk's connections do, over `--channels` HTTP/2 connections (gRPC's
usual single channel by default: calls are multiplexed). Requests are pre-serialized bodies from
the manifest that `loadtests/wrk/post.lua` reads (path = the gRPC method, body file = the
serialized request), sent and received as bytes: the generator spends its CPU on gRPC, not on
protobuf. It prints the same `BENCH_JSON` line as post.lua (latencies in microseconds; errors:
`status` = non-OK answers, `connect` = UNAVAILABLE, `timeout` = DEADLINE_EXCEEDED), so
`loadtests.bench.wrk.parse_wrk_output` reads either. Run it pinned (taskset) like wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from loadtests.bench.wrk import BENCH_JSON

TIMEOUT_S = 10.0  # wrk's --timeout in the benchmark
PERCENTILES = {"p50": 50, "p75": 75, "p90": 90, "p99": 99, "p99.9": 99.9}


def grpc_command(
    target: str, manifest: Path, calls: int, seconds: float, cpus: str | None = None
) -> list[str]:
    """This generator's command line (pinned to `cpus` with taskset if given)."""
    pin = ["taskset", "-c", cpus] if cpus is not None else []
    return [*pin, sys.executable, "-m", "loadtests.bench.grpcload", target, str(manifest),
            "--calls", str(calls), "--seconds", f"{seconds:g}"]  # fmt: skip


def read_manifest(path: Path) -> list[tuple[str, bytes]]:
    """(method path, body) of each manifest line (headers are ignored)."""
    requests = []
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            requests.append((fields[0], Path(fields[1]).read_bytes()))
    if not requests:
        raise SystemExit(f"no requests in {path}")
    return requests


def summary(latencies_us: list[float], duration_s: float, received: int, errors: dict) -> dict:
    """post.lua's JSON fields from the measured calls."""
    lat = np.asarray(latencies_us or [0.0])
    latency = {
        "min": float(lat.min()),
        "mean": float(lat.mean()),
        "stdev": float(lat.std()),
        "max": float(lat.max()),
        **{k: float(np.percentile(lat, p)) for k, p in PERCENTILES.items()},
    }
    return {
        "requests": len(latencies_us),
        "duration_us": duration_s * 1e6,
        "bytes": received,
        "errors": errors,
        "latency_us": latency,
    }


async def run(target: str, requests: list[tuple[str, bytes]], calls: int, seconds: float,
              channels: int) -> dict:  # fmt: skip
    """Drive `calls` concurrent closed loops for `seconds`; the summary of what was answered."""
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    opened = [grpc.aio.insecure_channel(target, options=unlimited) for _ in range(channels)]
    try:
        methods = [{p: ch.unary_unary(p) for p, _ in requests} for ch in opened]
        for i, (path, body) in enumerate(requests):  # connect, and fail early on a bad request
            await methods[i % channels][path](body, timeout=TIMEOUT_S)
        errors = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
        latencies: list[float] = []
        received = 0
        end = time.perf_counter() + seconds

        async def loop(k: int) -> None:
            nonlocal received
            method, n, i = methods[k % channels], len(requests), k
            while True:
                path, body = requests[i % n]
                i += 1
                start = time.perf_counter()
                if start >= end:
                    return
                try:
                    answer = await method[path](body, timeout=TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        errors["timeout"] += 1
                    elif code == grpc.StatusCode.UNAVAILABLE:
                        errors["connect"] += 1
                    else:
                        errors["status"] += 1
                    continue
                latencies.append((time.perf_counter() - start) * 1e6)
                received += len(answer)

        began = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(calls)))
        return summary(latencies, time.perf_counter() - began, received, errors)
    finally:
        for channel in opened:
            await channel.close()


def main(argv: list[str] | None = None) -> int:
    """Run the generator and print its BENCH_JSON line."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.grpcload", description=__doc__)
    p.add_argument("target", help="HOST:PORT of the gRPC server")
    p.add_argument("manifest", type=Path)
    p.add_argument("--calls", type=int, default=64, help="concurrent calls (closed loop)")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--channels", type=int, default=1, help="HTTP/2 connections")
    args = p.parse_args(argv)
    requests = read_manifest(args.manifest)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    doc = runner(run(args.target, requests, args.calls, args.seconds, args.channels))
    sys.stdout.write(BENCH_JSON + json.dumps(doc) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
