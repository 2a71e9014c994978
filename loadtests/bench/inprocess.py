"""In-process measurements, in a worker pinned to the server's core: the ONNX Runtime ceiling and
the service.codec floor (decode -> run -> encode, no HTTP)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench.cells import BIG_ROWS
from loadtests.bench.cpu import cpu_times, foreign_cpu_pct, parse_cpu_list
from loadtests.bench.models import ModelInfo
from loadtests.bench.payloads import DISTINCT_BODIES, request_rows
from loadtests.payloads import V2_BINARY, V2_JSON, Payload, make_payload

ROOT = Path(__file__).resolve().parents[2]
CEILING_BATCHES = {"cnn": (1, 8, 32, 128), "lstm": (1, 8, 32, 64)}


def rate(step: Callable[[], object], seconds: float) -> tuple[float, float]:
    """Calls per second of `step`: (median, best) over ~0.1 s chunks for `seconds`."""
    for _ in range(3):
        step()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            step()
        took = time.perf_counter() - start
        if took >= 0.02:
            break
        n *= 2
    per_chunk = max(1, int(n * 0.1 / took))
    rates: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        start = time.perf_counter()
        for _ in range(per_chunk):
            step()
        rates.append(per_chunk / (time.perf_counter() - start))
    return statistics.median(rates), max(rates)


def _ceiling(runtime: Any, feeds: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
    """ONNX Runtime alone on one batch: samples/s (median and best chunk), ms per batch."""
    batch = len(next(iter(feeds.values())))
    median, best = rate(lambda: runtime.run(feeds), seconds)
    return {
        "batch": batch,
        "samples_per_s": median * batch,
        "best_samples_per_s": best * batch,
        "ms_per_batch": 1000 / median,
    }


def _floor(
    runtime: Any, name: str, version: str, payloads: list[Payload], rows: int, seconds: float
) -> dict[str, Any]:
    """Decode -> run -> encode with service.codec, no HTTP: req/s and microseconds per stage."""
    from service.codec import decode_request, encode_response

    head = payloads[0].headers.get("Inference-Header-Content-Length")
    binary = head is not None
    decoded = [decode_request(p.body, head) for p in payloads]
    outputs = [runtime.run(d.inputs) for d in decoded]
    turn = iter(range(1 << 62))

    def decode() -> object:
        return decode_request(payloads[next(turn) % len(payloads)].body, head)

    def run() -> object:
        return runtime.run(decoded[next(turn) % len(decoded)].inputs)

    def encode() -> object:
        out = outputs[next(turn) % len(outputs)]
        return encode_response(name, version, [(k, a, binary) for k, a in out.items()])

    def whole() -> object:
        request = decode_request(payloads[next(turn) % len(payloads)].body, head)
        out = runtime.run(request.inputs)
        return encode_response(name, version, [(k, a, binary) for k, a in out.items()])

    us = {
        stage: 1e6 / rate(step, seconds / 2)[0]
        for stage, step in (("decode", decode), ("run", run), ("encode", encode))
    }
    per_s = rate(whole, seconds)[0]
    return {
        "protocol": V2_BINARY if binary else V2_JSON,
        "rows": rows,
        "req_per_s": per_s,
        "samples_per_s": per_s * rows,
        "us": {**us, "total": 1e6 / per_s},
        "body_bytes": len(payloads[0].body),
    }


def inprocess_worker(spec_file: Path, out_file: Path) -> int:
    """Measure the ceiling and the JSON/binary floor of each model; writes JSON to `out_file`."""
    import onnxruntime

    from service.runtime import ModelRuntime, RuntimeOptions

    spec = json.loads(spec_file.read_text())
    seconds = spec["seconds"]
    result: dict[str, Any] = {
        "cpus": sorted(os.sched_getaffinity(0)),
        "onnxruntime": onnxruntime.__version__,
        "models": {},
    }
    for name, m in spec["models"].items():
        runtime = ModelRuntime(Path(m["path"]), RuntimeOptions(intra_op_threads=spec["threads"]))
        samples = np.load(m["samples"])["inputs"].astype(np.float32)
        entry: dict[str, Any] = {"threads": runtime.threads, "ceiling": [], "floor": []}
        for batch in m["batches"]:
            row = _ceiling(runtime, {m["input"]: request_rows(samples, batch, 1)[0]}, seconds)
            entry["ceiling"].append(row)
            print(f"  ceiling {name} batch {batch}: {row['samples_per_s']:,.0f} samples/s")
        for protocol, rows in m["floors"]:
            arrays = request_rows(samples, rows, DISTINCT_BODIES)
            payloads = [make_payload(name, protocol, {m["input"]: a}) for a in arrays]
            row = _floor(runtime, name, str(m["version"]), payloads, rows, seconds)
            entry["floor"].append(row)
            print(f"  floor {name} {protocol} rows {rows}: {row['req_per_s']:,.0f} req/s")
        result["models"][name] = entry
    out_file.write_text(json.dumps(result, indent=2))
    return 0


def run_inprocess(
    models: dict[str, ModelInfo], cpus: str, threads: int, seconds: float, workdir: Path
) -> dict[str, Any]:
    """Run the in-process worker pinned to `cpus`; its JSON result."""
    spec = {"threads": threads, "seconds": seconds, "models": {}}
    for name, info in models.items():
        floors = [(V2_JSON, 1), (V2_BINARY, 1)]
        if name == "cnn":
            floors.append((V2_BINARY, BIG_ROWS))
        spec["models"][name] = {
            "path": str(info.path),
            "samples": str(info.samples_file),
            "input": info.input,
            "version": info.version,
            "batches": list(CEILING_BATCHES[name]),
            "floors": floors,
        }
    spec_file, out_file = workdir / "inprocess-spec.json", workdir / "inprocess.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [
        "taskset",
        "-c",
        cpus,
        sys.executable,
        "-m",
        "loadtests.bench",
        "--worker-inprocess",
        str(spec_file),
        str(out_file),
    ]
    before, own0 = cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=ROOT, check=True)
    after, own1 = cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) * os.sysconf("SC_CLK_TCK")
    result = json.loads(out_file.read_text())
    result["other_cpu_pct"] = foreign_cpu_pct(before, after, parse_cpu_list(cpus), own)
    return result
