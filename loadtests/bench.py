"""Benchmark: onnxserve against in-process ONNX Runtime and a plain FastAPI baseline, in one run.

    .venv/bin/python -m loadtests.bench [--quick] [--out runs/bench] [--repository model_repository]

Measures, with the server pinned to one core and wrk (one thread) to another:
- the in-process ceiling (ONNX Runtime alone, the server's session options and thread count);
- the in-process floor (service.codec decode -> run -> encode, no HTTP);
- the FastAPI baseline (loadtests/baselines/fastapi_baseline.py), v2 JSON;
- onnxserve with batching on and off: single-sample CNN and LSTM requests (v2 JSON, v2 binary,
  v1) at 1, 16 and 64 connections, and 32-row binary CNN requests;
then evaluates the targets and writes results.json, results.md and (full runs) docs/benchmarks.md.
`--render results.json` redraws the markdown from a stored run without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
LUA_SCRIPT = ROOT / "loadtests" / "wrk" / "post.lua"
DOCS = ROOT / "docs" / "benchmarks.md"
MODELS = ("cnn", "lstm")
CONNECTIONS = (1, 16, 64)
CEILING_BATCHES = {"cnn": (1, 8, 32, 128), "lstm": (1, 8, 32, 64)}
PROTOCOLS = {"cnn": ("v2_json", "v2_binary", "v1"), "lstm": ("v2_json", "v2_binary")}
BIG_ROWS, BIG_CONNECTIONS = 32, (1, 16)  # the multi-row requests, against the batch-32 ceiling
DISTINCT_BODIES = 16  # real samples cycled per cell
WRK_SATURATED_PCT = 90.0
NOISY_PCT = 10.0  # other processes' share of the server's CPU above which a cell is marked noisy
BENCH_JSON = "BENCH_JSON "


# -- cells ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellSpec:
    """One load cell: which server, model, protocol, connections, rows per request."""

    server: str  # "baseline" or "onnxserve"
    model: str
    protocol: str  # "v2_json", "v2_binary" or "v1"
    conns: int
    rows: int = 1
    batching: str = "n/a"  # "on" or "off" for onnxserve

    @property
    def label(self) -> str:
        """A readable name, e.g. `onnxserve[batching on] cnn v2_json rows=1 conns=64`."""
        server = (
            self.server if self.server == "baseline" else f"onnxserve[batching {self.batching}]"
        )
        return f"{server} {self.model} {self.protocol} rows={self.rows} conns={self.conns}"


SERVERS = (("baseline", "n/a"), ("onnxserve", "on"), ("onnxserve", "off"))


def plan() -> list[CellSpec]:
    """Every cell, in measurement order: cells that are compared run one after the other (all
    servers are up at once, all idle but one), so drift in a shared machine's load biases the
    ratios less than measuring one server after another would."""
    cells = []
    for model in MODELS:
        for conns in CONNECTIONS:
            cells.append(CellSpec("baseline", model, "v2_json", conns))
            for protocol in PROTOCOLS[model]:
                for batching in ("on", "off"):
                    cells.append(CellSpec("onnxserve", model, protocol, conns, 1, batching))
    cells += [CellSpec("onnxserve", "cnn", "v2_binary", c, BIG_ROWS, "on") for c in BIG_CONNECTIONS]
    return cells


def display_order(cell: dict[str, Any]) -> tuple:
    """Sort key for the report: by server, model, protocol, rows, connections."""
    return (
        SERVERS.index((cell["server"], cell["batching"])),
        MODELS.index(cell["model"]),
        ("v2_json", "v2_binary", "v1").index(cell["protocol"]),
        cell["rows"],
        cell["conns"],
    )


def server_command(server: str, batching: str, repository: Path, threads: int) -> list[str]:
    """The command that starts one server under test (the port is added on start)."""
    common = ["--repository", str(repository), "--models", ",".join(MODELS)]
    common += ["--threads", str(threads)]
    if server == "baseline":
        return [sys.executable, "-m", "loadtests.baselines.fastapi_baseline", *common]
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", *common]
    return cmd + (["--no-batching"] if batching == "off" else [])


# -- payloads -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Payload:
    """One ready-to-send POST request."""

    path: str
    body: bytes
    headers: dict[str, str]


def v2_json_body(input_name: str, array: np.ndarray) -> bytes:
    """A v2 JSON infer request with one FP32 input (all outputs answered as JSON)."""
    tensor = {"name": input_name, "shape": list(array.shape), "datatype": "FP32", "data": array}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def v2_binary_body(input_name: str, array: np.ndarray) -> tuple[bytes, int]:
    """A v2 binary request (JSON header + little-endian FP32 bytes, all outputs binary).

    Returns the body and the header's length (the Inference-Header-Content-Length)."""
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    tensor = {
        "name": input_name,
        "shape": list(array.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(data)},
    }
    head = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return head + data, len(head)


def v1_body(array: np.ndarray) -> bytes:
    """A v1 predict request: one instance per row."""
    return orjson.dumps({"instances": array}, option=orjson.OPT_SERIALIZE_NUMPY)


def make_payload(model: str, protocol: str, input_name: str, array: np.ndarray) -> Payload:
    """The request for `array` (rows on the first axis) in one protocol."""
    if protocol == "v2_json":
        body = v2_json_body(input_name, array)
        return Payload(f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"})
    if protocol == "v2_binary":
        body, head = v2_binary_body(input_name, array)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(head),
        }
        return Payload(f"/v2/models/{model}/infer", body, headers)
    if protocol == "v1":
        body = v1_body(array)
        return Payload(f"/v1/models/{model}:predict", body, {"Content-Type": "application/json"})
    raise ValueError(f"unknown protocol {protocol!r}")


def request_rows(samples: np.ndarray, rows: int, count: int) -> list[np.ndarray]:
    """`count` arrays of `rows` consecutive real samples (wrapping round the samples)."""
    n = len(samples)
    return [np.take(samples, (k * rows + np.arange(rows)) % n, axis=0) for k in range(count)]


def manifest_text(entries: list[tuple[str, Path, dict[str, str]]]) -> str:
    """The request manifest that loadtests/wrk/post.lua reads: path, body file, headers per line."""
    lines = []
    for path, body_file, headers in entries:
        fields = [path, str(body_file), *(f"{k}: {v}" for k, v in headers.items())]
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"tab or newline in a manifest field: {fields}")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"


# -- parsing ------------------------------------------------------------------------------------
def parse_wrk_output(text: str) -> dict[str, Any]:
    """The JSON line that post.lua's done() prints, plus rps; ValueError if there is none."""
    for line in text.splitlines():
        if line.startswith(BENCH_JSON):
            raw = re.sub(r"-?\b(nan|inf)\b", "null", line[len(BENCH_JSON) :])
            doc = json.loads(raw)
            seconds = doc["duration_us"] / 1e6
            doc["duration_s"] = seconds
            doc["rps"] = doc["requests"] / seconds if seconds > 0 else 0.0
            errors = doc["errors"]
            doc["non2xx"] = errors["status"]
            doc["socket_errors"] = sum(errors[k] for k in ("connect", "read", "write", "timeout"))
            return doc
    raise ValueError(f"no {BENCH_JSON.strip()} line in wrk's output:\n{text[-2000:]}")


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition as (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append((name, dict(_LABEL.findall(labels or "")), number))
    return samples


def counter_total(text: str, name: str, model: str) -> float:
    """A counter summed over the versions of one model."""
    return sum(
        v for n, labels, v in parse_prometheus(text) if n == name and labels.get("model") == model
    )


def mean_batch_size(before: str, after: str, model: str) -> float | None:
    """Rows per executed batch between two /metrics scrapes; None if nothing ran."""
    rows = counter_total(after, "onnxserve_inference_count_total", model) - counter_total(
        before, "onnxserve_inference_count_total", model
    )
    runs = counter_total(after, "onnxserve_inference_exec_count_total", model) - counter_total(
        before, "onnxserve_inference_exec_count_total", model
    )
    return rows / runs if runs > 0 else None


def parse_proc_stat(text: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of /proc/<pid>/stat."""
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def parse_cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) clock ticks from the text of /proc/stat."""
    times = {}
    for line in text.splitlines():
        match = re.match(r"cpu(\d+)\s+(.*)", line)
        if match:
            ticks = [int(x) for x in match.group(2).split()[:8]]  # guest time is inside user
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            times[int(match.group(1))] = (sum(ticks) - idle, sum(ticks))
    return times


def foreign_cpu_pct(
    before: dict[int, tuple[int, int]],
    after: dict[int, tuple[int, int]],
    cpus: list[int],
    own_ticks: float,
) -> float:
    """Share (%) of `cpus` used by processes other than ours (`own_ticks`) between two reads."""
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in before and c in after)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in before and c in after)
    return max(0.0, 100 * (busy - own_ticks) / total) if total > 0 else 0.0


def parse_cpu_list(text: str) -> list[int]:
    """CPUs in taskset's list form: "0", "0,2", "0-3"."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(set(cpus))


# -- comparisons and targets ---------------------------------------------------------------------
def find_cell(cells: list[dict[str, Any]], **fields: Any) -> dict[str, Any] | None:
    """The measured cell whose fields all match (rows defaults to 1), or None."""
    fields.setdefault("rows", 1)
    for cell in cells:
        if all(cell.get(k) == v for k, v in fields.items()):
            return cell
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _lat(cell: dict[str, Any] | None, p: str) -> float | None:
    if cell is None or cell.get("latency_us") is None:
        return None
    return cell["latency_us"].get(p)


def _rps(cell: dict[str, Any] | None) -> float | None:
    return None if cell is None else cell.get("rps")


def ceiling(inprocess: dict[str, Any], model: str, batch: int) -> float | None:
    """Samples/s of ONNX Runtime alone at one batch size, if measured."""
    for row in inprocess.get("models", {}).get(model, {}).get("ceiling", []):
        if row["batch"] == batch:
            return row["samples_per_s"]
    return None


def attach_comparisons(cells: list[dict[str, Any]], inprocess: dict[str, Any]) -> None:
    """Add ratios to onnxserve cells: vs the baseline (v2 JSON, same model and connections), vs
    batching off (same protocol), and multi-row requests vs the in-process ceiling."""
    for cell in cells:
        if cell["server"] != "onnxserve":
            continue
        if cell["rows"] == 1:
            base = find_cell(
                cells,
                server="baseline",
                model=cell["model"],
                protocol="v2_json",
                conns=cell["conns"],
            )
            cell["vs_baseline"] = {
                "rps": _ratio(_rps(cell), _rps(base)),
                "p50": _ratio(_lat(cell, "p50"), _lat(base, "p50")),
                "p99": _ratio(_lat(cell, "p99"), _lat(base, "p99")),
            }
        if cell["batching"] == "on":
            off = find_cell(
                cells,
                server="onnxserve",
                model=cell["model"],
                protocol=cell["protocol"],
                conns=cell["conns"],
                rows=cell["rows"],
                batching="off",
            )
            cell["vs_batching_off"] = _ratio(_rps(cell), _rps(off))
        if cell["rows"] > 1:
            top = ceiling(inprocess, cell["model"], cell["rows"])
            cell["vs_ceiling"] = _ratio(cell.get("samples_per_s"), top)


@dataclass(frozen=True)
class Target:
    """A goal: `value op threshold`, value computed from the cells."""

    id: str
    text: str
    op: str  # ">=" or "<="
    threshold: float


TARGETS = (
    Target("cnn_64c_json_rps", "CNN 64 conns v2 JSON: RPS vs baseline", ">=", 1.9),
    Target("cnn_64c_json_p99", "CNN 64 conns v2 JSON: p99 vs baseline", "<=", 0.5),
    Target("cnn_1c_json_p50", "CNN 1 conn v2 JSON: p50 vs baseline", "<=", 1.1),
    Target("cnn_64c_binary_rps", "CNN 64 conns v2 binary: RPS vs baseline (v2 JSON)", ">=", 2.4),
    Target(
        "cnn_32row_ceiling",
        f"CNN {BIG_ROWS}-row binary, {BIG_CONNECTIONS[-1]} conns: samples/s vs in-process "
        f"ceiling at batch {BIG_ROWS}",
        ">=",
        0.70,
    ),
    Target("lstm_64c_json_batching", "LSTM 64 conns v2 JSON: batching on vs off (RPS)", ">=", 1.8),
    Target(
        "lstm_64c_binary_batching", "LSTM 64 conns v2 binary: batching on vs off (RPS)", ">=", 1.8
    ),
)


def evaluate(value: float | None, op: str, threshold: float, failed_requests: int = 0) -> str:
    """PASS or FAIL: a missing value, or failed requests in the cells compared, never pass."""
    if value is None or failed_requests:
        return "FAIL"
    if op == ">=":
        return "PASS" if value >= threshold else "FAIL"
    if op == "<=":
        return "PASS" if value <= threshold else "FAIL"
    raise ValueError(f"unknown operator {op!r}")


def _target_inputs(
    target_id: str, cells: list[dict[str, Any]], inprocess: dict[str, Any]
) -> tuple[float | None, list[dict[str, Any] | None]]:
    """The value of one target and the cells it compares (onnxserve batching on by default)."""
    on = {"server": "onnxserve", "batching": "on"}
    base64 = find_cell(cells, server="baseline", model="cnn", protocol="v2_json", conns=64)
    if target_id in ("cnn_64c_json_rps", "cnn_64c_json_p99"):
        cell = find_cell(cells, model="cnn", protocol="v2_json", conns=64, **on)
        if target_id.endswith("rps"):
            return _ratio(_rps(cell), _rps(base64)), [cell, base64]
        return _ratio(_lat(cell, "p99"), _lat(base64, "p99")), [cell, base64]
    if target_id == "cnn_1c_json_p50":
        cell = find_cell(cells, model="cnn", protocol="v2_json", conns=1, **on)
        base1 = find_cell(cells, server="baseline", model="cnn", protocol="v2_json", conns=1)
        return _ratio(_lat(cell, "p50"), _lat(base1, "p50")), [cell, base1]
    if target_id == "cnn_64c_binary_rps":
        cell = find_cell(cells, model="cnn", protocol="v2_binary", conns=64, **on)
        return _ratio(_rps(cell), _rps(base64)), [cell, base64]
    if target_id == "cnn_32row_ceiling":
        cell = find_cell(
            cells,
            model="cnn",
            protocol="v2_binary",
            conns=BIG_CONNECTIONS[-1],
            rows=BIG_ROWS,
            **on,
        )
        samples = None if cell is None else cell.get("samples_per_s")
        return _ratio(samples, ceiling(inprocess, "cnn", BIG_ROWS)), [cell]
    if target_id.startswith("lstm_64c_"):
        protocol = "v2_json" if "_json_" in target_id else "v2_binary"
        cell = find_cell(cells, model="lstm", protocol=protocol, conns=64, **on)
        off = find_cell(
            cells, server="onnxserve", model="lstm", protocol=protocol, conns=64, batching="off"
        )
        return _ratio(_rps(cell), _rps(off)), [cell, off]
    raise KeyError(target_id)


def evaluate_targets(
    cells: list[dict[str, Any]], inprocess: dict[str, Any], server_cores: int = 1
) -> list[dict[str, Any]]:
    """Every target with its value, PASS/FAIL and a note (errors, generator saturation)."""
    results = []
    for target in TARGETS:
        value, involved = _target_inputs(target.id, cells, inprocess)
        notes = []
        if any(c is None or c.get("error") for c in involved):
            notes.append("a cell was not measured")
        failed = sum(c.get("failed_requests", 0) for c in involved if c)
        if failed:
            notes.append(f"{failed} failed requests")
        if any(c and c.get("wrk_saturated") for c in involved):
            notes.append(f"wrk CPU >= {WRK_SATURATED_PCT:.0f}%: generator-bound")
        if any(c and c.get("noisy") for c in involved):
            notes.append(f"noisy: other processes took >= {NOISY_PCT:.0f}% of the server's CPU")
        if server_cores != 1:
            notes.append(f"server on {server_cores} cores; targets assume one")
        results.append(
            {
                **asdict(target),
                "value": value,
                "status": evaluate(value, target.op, target.threshold, failed),
                "note": "; ".join(notes),
            }
        )
    return results


# -- in-process measurements (a worker pinned to the server's core) ------------------------------
def _rate(step: Callable[[], object], seconds: float) -> tuple[float, float]:
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
    median, best = _rate(lambda: runtime.run(feeds), seconds)
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
        stage: 1e6 / _rate(step, seconds / 2)[0]
        for stage, step in (("decode", decode), ("run", run), ("encode", encode))
    }
    per_s = _rate(whole, seconds)[0]
    return {
        "protocol": "v2_binary" if binary else "v2_json",
        "rows": rows,
        "req_per_s": per_s,
        "samples_per_s": per_s * rows,
        "us": {**us, "total": 1e6 / per_s},
        "body_bytes": len(payloads[0].body),
    }


def _inprocess_worker(spec_file: Path, out_file: Path) -> int:
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
            payloads = [make_payload(name, protocol, m["input"], a) for a in arrays]
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
        floors = [("v2_json", 1), ("v2_binary", 1)]
        if name == "cnn":
            floors.append(("v2_binary", BIG_ROWS))
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


# -- processes ---------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """A model of the repository as the benchmark uses it."""

    name: str
    version: int
    path: Path
    samples_file: Path
    input: str
    samples: np.ndarray = field(repr=False)


def load_model_info(repository: Path, name: str) -> ModelInfo:
    """The latest version of a model, its input name and its real held-out samples."""
    config = json.loads((repository / name / "config.json").read_text())
    versions = [int(p.name) for p in (repository / name).iterdir() if p.name.isdigit()]
    if not versions:
        raise SystemExit(f"model '{name}' has no version folder under {repository / name}")
    folder = repository / name / str(max(versions))
    with np.load(folder / "samples.npz") as data:
        samples = data["inputs"].astype(np.float32)
    return ModelInfo(
        name,
        max(versions),
        folder / "model.onnx",
        folder / "samples.npz",
        config["inputs"][0]["name"],
        samples,
    )


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_ticks(pid: int) -> int:
    """CPU clock ticks (user + system, all threads) a live process has used."""
    return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) ticks now."""
    return parse_cpu_times(Path("/proc/stat").read_text())


def http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 10
) -> tuple[int, bytes]:
    """GET (or POST when there is a body): status and body; 0 when unreachable."""
    request = urllib.request.Request(url, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


@dataclass
class Server:
    """A server process under test."""

    url: str
    process: subprocess.Popen
    log: Path
    has_metrics: bool


@contextlib.contextmanager
def start_server(cmd: list[str], cpus: str, log: Path, has_metrics: bool) -> Iterator[Server]:
    """Start `cmd` (which must take --port) pinned to `cpus`; yield once /v2/health/ready is 200."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["taskset", "-c", cpus, *cmd, "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log, has_metrics)
    try:
        deadline = time.monotonic() + 120
        while http(f"{server.url}/v2/health/ready", timeout=2)[0] != 200:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after 120 s; see {log}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_wrk(
    url: str, manifest: Path, conns: int, seconds: int, cpus: str, log: Path
) -> tuple[str, float, float]:
    """Run wrk (one thread) pinned to `cpus`: its output, wall seconds and CPU seconds."""
    cmd = [
        "taskset",
        "-c",
        cpus,
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(manifest),
    ]
    with log.open("wb") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        killer = threading.Timer(seconds + 60, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)  # wait4 gives the child's own rusage
        finally:
            killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    return log.read_text(errors="replace"), wall, usage.ru_utime + usage.ru_stime


def check_payload(url: str, payload: Payload) -> str | None:
    """None if the server answers the request with 200 and a body; else what went wrong."""
    status, body = http(url + payload.path, payload.body, payload.headers)
    if status != 200:
        return f"preflight answered {status}: {body[:300]!r}"
    head = payload.headers.get("Inference-Header-Content-Length")
    if head is not None and b"binary_data_size" not in body:
        return "preflight: binary outputs were asked for but not returned"
    return None


# -- one cell ------------------------------------------------------------------------------------
@dataclass
class Options:
    """How the run is set up."""

    repository: Path
    out: Path
    quick: bool
    seconds: int
    warmup: int
    server_cpus: str
    wrk_cpus: str
    threads: int

    @property
    def server_cpu_list(self) -> list[int]:
        """The server's CPUs as numbers."""
        return parse_cpu_list(self.server_cpus)

    @property
    def wrk_cpu_list(self) -> list[int]:
        """wrk's CPUs as numbers."""
        return parse_cpu_list(self.wrk_cpus)


def write_manifest(spec: CellSpec, info: ModelInfo, workdir: Path) -> tuple[Path, Payload]:
    """Bodies and the manifest for a cell (shared by cells of the same payload); first payload."""
    stem = f"{spec.model}-{spec.protocol}-r{spec.rows}"
    manifest = workdir / "payloads" / f"{stem}.tsv"
    arrays = request_rows(info.samples, spec.rows, DISTINCT_BODIES)
    payloads = [make_payload(spec.model, spec.protocol, info.input, a) for a in arrays]
    if not manifest.exists():
        manifest.parent.mkdir(parents=True, exist_ok=True)
        entries = []
        for k, p in enumerate(payloads):
            body_file = manifest.parent / f"{stem}-{k}.body"
            body_file.write_bytes(p.body)
            entries.append((p.path, body_file, p.headers))
        manifest.write_text(manifest_text(entries))
    return manifest, payloads[0]


def run_cell(spec: CellSpec, server: Server, info: ModelInfo, opts: Options) -> dict[str, Any]:
    """Warm up, then measure one cell: wrk's figures, both processes' CPU, mean batch size."""
    cell: dict[str, Any] = {**asdict(spec), "label": spec.label, "error": None}
    manifest, first = write_manifest(spec, info, opts.out)
    cell["body_bytes"] = len(first.body)
    problem = check_payload(server.url, first)
    if problem:
        cell["error"] = problem
        return cell
    logs = opts.out / "logs"
    slug = re.sub(r"[^a-z0-9]+", "-", spec.label.lower()).strip("-")
    run_wrk(server.url, manifest, spec.conns, opts.warmup, opts.wrk_cpus, logs / f"{slug}.warm")
    before = http(server.url + "/metrics")[1].decode() if server.has_metrics else ""
    ticks0, cpus0 = process_ticks(server.process.pid), cpu_times()
    text, wall, wrk_cpu = run_wrk(
        server.url, manifest, spec.conns, opts.seconds, opts.wrk_cpus, logs / f"{slug}.wrk"
    )
    server_ticks, cpus1 = process_ticks(server.process.pid) - ticks0, cpu_times()
    hz = os.sysconf("SC_CLK_TCK")
    server_cpu = server_ticks / hz
    other = {
        "server_cpus": foreign_cpu_pct(cpus0, cpus1, opts.server_cpu_list, server_ticks),
        "wrk_cpus": foreign_cpu_pct(cpus0, cpus1, opts.wrk_cpu_list, wrk_cpu * hz),
    }
    after = http(server.url + "/metrics")[1].decode() if server.has_metrics else ""
    try:
        doc = parse_wrk_output(text)
    except ValueError as exc:
        cell["error"] = str(exc)[:500]
        return cell
    cell.update(
        rps=doc["rps"],
        samples_per_s=doc["rps"] * spec.rows,
        requests=doc["requests"],
        duration_s=doc["duration_s"],
        latency_us=doc["latency_us"],
        errors={**doc["errors"], "non2xx": doc["non2xx"], "socket": doc["socket_errors"]},
        failed_requests=doc["non2xx"] + doc["socket_errors"],
        cpu_pct={"server": 100 * server_cpu / wall, "wrk": 100 * wrk_cpu / wall},
        rps_per_server_cpu_s=doc["rps"] * wall / server_cpu if server_cpu > 0 else None,
        other_cpu_pct=other,
        noisy=other["server_cpus"] >= NOISY_PCT,
        mean_batch_size=mean_batch_size(before, after, spec.model) if server.has_metrics else None,
    )
    cell["wrk_saturated"] = cell["cpu_pct"]["wrk"] >= WRK_SATURATED_PCT
    return cell


# -- environment --------------------------------------------------------------------------------
def ensure_wrk() -> None:
    """Install wrk with apt when it is missing and we are root; otherwise say how."""
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed: run `sudo apt-get install -y wrk`, then re-run")
    print("installing wrk: apt-get update && apt-get install -y wrk", flush=True)
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    subprocess.run(["apt-get", *lock, "update"], check=True)
    subprocess.run(["apt-get", *lock, "install", "-y", "wrk"], check=True)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, OS and the versions that matter."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else None,
        "packages": {
            d: _version(d)
            for d in (
                "onnxruntime",
                "numpy",
                "orjson",
                "fastapi",
                "starlette",
                "uvicorn",
                "httptools",
                "uvloop",
            )
        },
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


# -- report ---------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _ms(cell: dict[str, Any], p: str) -> str:
    v = _lat(cell, p)
    return _fmt(None if v is None else v / 1000, ".2f")


def _server_name(cell: dict[str, Any]) -> str:
    if cell["server"] == "baseline":
        return "baseline (FastAPI)"
    return f"onnxserve, batching {cell['batching']}"


def render_markdown(results: dict[str, Any], level: int = 1) -> str:
    """results.json as markdown tables (headings start at `level`)."""
    h = "#" * level
    m, cfg = results["machine"], results["config"]
    out = [f"{h} onnxserve benchmark", ""]
    if results["config"]["quick"]:
        out += ["> **Quick mode** (short cells): a smoke run; figures are indicative only.", ""]
    pk = m["packages"]
    models = ", ".join(f"{k} v{v['version']}" for k, v in cfg["models"].items())
    out += [
        f"- Command: `{results['command']}`",
        f"- When: {results['started']} → {results['finished']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {m['platform']}",
        f"- Versions: Python {m['python']}, onnxruntime {pk['onnxruntime']}, numpy {pk['numpy']}, "
        f"fastapi {pk['fastapi']}, uvicorn {pk['uvicorn']}, {m['wrk']}",
        f"- Pinning: server on CPU {cfg['server_cpus']} ({cfg['threads']} intra-op thread(s)), "
        f"wrk on CPU {cfg['wrk_cpus']} (1 thread); {cfg['seconds']} s per cell after a "
        f"{cfg['warmup']} s warm-up",
        f"- Load average (1/5/15 min) at start {results['load_average']['start']}, "
        f"at end {results['load_average']['end']}",
        f"- Repository: `{cfg['repository']}` ({models})",
        "",
        f"{h}# Targets (CNN single-sample unless said; onnxserve with batching on)",
        "",
        "| Target | Measured | Goal | Result | Note |",
        "|---|---:|---:|:---:|---|",
    ]
    for t in results["targets"]:
        unit = "" if t["id"] == "cnn_32row_ceiling" else "×"
        value = (
            _fmt(t["value"], ".0%") if t["id"] == "cnn_32row_ceiling" else _fmt(t["value"], ".2f")
        )
        goal = f"{t['op']} {t['threshold']:.0%}" if not unit else f"{t['op']} {t['threshold']}×"
        out.append(f"| {t['text']} | {value}{unit} | {goal} | **{t['status']}** | {t['note']} |")

    inproc = results["inprocess"]
    out += [
        "",
        f"{h}# In-process ceiling: ONNX Runtime alone on the server's core",
        "",
        "| Model | Batch | Samples/s | ms per batch |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in inproc.get("models", {}).items():
        for row in entry["ceiling"]:
            out.append(
                f"| {name} | {row['batch']} | {_fmt(row['samples_per_s'])} | "
                f"{row['ms_per_batch']:.3f} |"
            )
    gain = _ratio(ceiling(inproc, "lstm", 8), ceiling(inproc, "lstm", 1))
    out += [
        "",
        f"LSTM ceiling, batch 8 vs batch 1: {_fmt(gain, '.2f')}× samples/s. Other processes took "
        f"{_fmt(inproc.get('other_cpu_pct'), '.0f', '%')} of the server's CPU meanwhile.",
    ]
    out += [
        "",
        f"{h}# In-process floor: service.codec decode → run → encode, no HTTP",
        "",
        "| Model | Request | Rows | Body bytes | Req/s | Samples/s | decode µs | run µs | "
        "encode µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in inproc.get("models", {}).items():
        for row in entry["floor"]:
            us = row["us"]
            out.append(
                f"| {name} | {row['protocol']} | {row['rows']} | {row['body_bytes']:,} | "
                f"{_fmt(row['req_per_s'])} | {_fmt(row['samples_per_s'])} | {us['decode']:.0f} | "
                f"{us['run']:.0f} | {us['encode']:.0f} |"
            )
    out += [
        "",
        f"{h}# Over HTTP (wrk, closed loop)",
        "",
        "Ratios are against the baseline's v2 JSON cell with the same model and connections; "
        "*on/off* is batching on vs off. *Req/CPU-s* is requests per second of server CPU time. "
        "*Other CPU* is the share of the server's core that other processes took during the cell "
        f"(† at ≥ {NOISY_PCT:.0f}%: the figures are disturbed). ⚠ marks wrk at "
        f"≥ {WRK_SATURATED_PCT:.0f}% CPU (generator-bound: a lower bound for the server).",
        "",
        "| Server | Model | Protocol | Rows | Conns | Req/s | Samples/s | p50 ms | p90 ms | "
        "p99 ms | Errors | Mean batch | Server CPU | Req/CPU-s | Other CPU | wrk CPU | "
        "RPS × base | p99 × base | p50 × base | on/off |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|",
    ]
    for c in results["cells"]:
        lead = f"| {_server_name(c)} | {c['model']} | {c['protocol']} | {c['rows']} | {c['conns']}"
        if c.get("error"):
            out.append(f"{lead} | error: {c['error'][:120]} |" + " |" * 14)
            continue
        vs = c.get("vs_baseline") or {}
        cpu = c["cpu_pct"]
        warn = " ⚠" if c.get("wrk_saturated") else ""
        other = (c.get("other_cpu_pct") or {}).get("server_cpus")
        dagger = " †" if c.get("noisy") else ""
        out.append(
            f"{lead} | {_fmt(c['rps'])} | {_fmt(c['samples_per_s'])} | {_ms(c, 'p50')} | "
            f"{_ms(c, 'p90')} | {_ms(c, 'p99')} | {c['failed_requests']:,} | "
            f"{_fmt(c.get('mean_batch_size'), '.1f')} | {cpu['server']:.0f}% | "
            f"{_fmt(c.get('rps_per_server_cpu_s'))} | {_fmt(other, '.0f', '%')}{dagger} | "
            f"{cpu['wrk']:.0f}%{warn} | {_fmt(vs.get('rps'), '.2f')} | "
            f"{_fmt(vs.get('p99'), '.2f')} | {_fmt(vs.get('p50'), '.2f')} | "
            f"{_fmt(c.get('vs_batching_off'), '.2f')} |"
        )
    big = [c for c in results["cells"] if c["rows"] > 1 and c.get("vs_ceiling") is not None]
    if big:
        out += [""] + [
            f"{c['model']} {c['rows']}-row {c['protocol']} at {c['conns']} conns: "
            f"{_fmt(c['vs_ceiling'], '.0%')} of the in-process ceiling at batch {c['rows']}."
            for c in big
        ]
    return "\n".join(out) + "\n"


DOC_INTRO = """\
# Benchmarks

How fast onnxserve is on CPU, against the two numbers that bound it — ONNX Runtime alone on
the same model file (the **ceiling**) and the same codec without HTTP (the **floor**) — and
against what a user would write instead: a plain FastAPI app with an async endpoint at the same
v2 path, orjson in and out, one ONNX Runtime call per request, no batching
(`loadtests/baselines/fastapi_baseline.py`).

## Running it

```
.venv/bin/python -m loadtests.bench               # full run, ~8 min; writes this page
.venv/bin/python -m loadtests.bench --quick       # smoke run, 2 s cells, ~3 min
.venv/bin/python -m loadtests.bench --render runs/bench/results.json --docs docs/benchmarks.md
```

It needs `wrk` (installed with apt when missing and run as root) and the model repository
(`make build`). Results go to `--out` (default `runs/bench`): `results.json`, `results.md`, the
request bodies, and each process's log.

## Method

- The server is pinned to one core (`taskset -c 0`, one intra-op thread) and wrk to another
  (`taskset -c 1`, one thread, `-c 1/16/64`), so that the two never compete. The in-process
  measurements run pinned to the server's core with the server's own session options
  (`service.runtime.ModelRuntime`).
- The three servers (baseline, onnxserve with batching on, with batching off) are up at once,
  all idle but the one under load, and the cells that are compared run one after the other
  (baseline, on, off for each model and connection count), so drift in a shared machine's load
  biases the ratios less.
- Each cell has a warm-up run, then a measured run. Payloads are real held-out samples from the
  model's `samples.npz`, cycled (16 distinct bodies per cell). Before each cell one request is
  checked for a 200 answer, so an error path can never be measured as a fast one.
- `ONNXSERVE_*` variables in the environment reach the onnxserve servers (and are recorded), e.g.
  `ONNXSERVE_FAST_LANE=false` to measure the FastAPI routes instead of the fast lane.
- wrk is a closed loop: each connection sends its next request when the last is answered, so its
  percentiles suffer coordinated omission; compare them between cells of the same run, not with
  an open-loop tool. Errors are wrk's non-2xx (status > 399) plus socket errors.
- Both processes' CPU time is read during each cell (`/proc/<pid>/stat` for the server, the
  child's rusage for wrk). A cell where wrk used ≥ 90% of its core is generator-bound and marked ⚠.
  The per-CPU counters of `/proc/stat` give the share of the server's core that *other*
  processes took during the cell; at ≥ 10% the cell is marked † (noisy). *Req/CPU-s* (requests
  per second of server CPU time) is the figure least disturbed by such neighbours. Trust only
  quiet cells: the kernel shares a busy core per thread, so under contention onnxserve (event
  loop + ONNX Runtime thread) keeps more of it than the single-threaded baseline does.
- Mean batch size is the delta of `onnxserve_inference_count_total` over the delta of
  `onnxserve_inference_exec_count_total` during the measured run.
- Targets compare cells of the same run only; a target whose cells had failed requests fails.

"""


def render_docs(results: dict[str, Any]) -> str:
    """docs/benchmarks.md: the method, then the results of one run."""
    return DOC_INTRO + "## Results\n\n" + render_markdown(results, level=3)


# -- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2 s cells, 1 s warm-up (smoke run)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="output folder")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--seconds", type=int, help="measured seconds per cell (default 8; quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up seconds per cell (default 2; quick 1)")
    p.add_argument("--server-cpus", default="0", help="taskset list for the server (default 0)")
    p.add_argument("--wrk-cpus", default="1", help="taskset list for wrk (default 1)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: server CPU count)")
    p.add_argument("--docs", type=Path, help="also write this docs page (full runs: docs/...)")
    p.add_argument("--no-docs", action="store_true", help="do not write the docs page")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="redraw markdown only")
    p.add_argument("--worker-inprocess", nargs=2, type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_reports(results: dict[str, Any], out: Path, docs: Path | None) -> None:
    """results.json, results.md and, if asked, the docs page."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(render_docs(results))


def _docs_path(args: argparse.Namespace, quick: bool) -> Path | None:
    if args.no_docs:
        return None
    return args.docs or (None if quick else DOCS)


def _progress(i: int, n: int, cell: dict[str, Any]) -> str:
    if cell.get("error"):
        return f"[{i}/{n}] {cell['label']}: ERROR {cell['error'][:200]}"
    lat = cell["latency_us"]
    batch = cell.get("mean_batch_size")
    return (
        f"[{i}/{n}] {cell['label']}: {cell['rps']:,.0f} req/s, p50 {lat['p50'] / 1000:.2f} ms, "
        f"p99 {lat['p99'] / 1000:.2f} ms, failed {cell['failed_requests']}, batch "
        f"{_fmt(batch, '.1f')}, cpu server {cell['cpu_pct']['server']:.0f}% "
        f"(others {cell['other_cpu_pct']['server_cpus']:.0f}%{', NOISY' if cell['noisy'] else ''}) "
        f"wrk {cell['cpu_pct']['wrk']:.0f}%{' (SATURATED)' if cell['wrk_saturated'] else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the in-process worker, or a re-render)."""
    args = parse_args(argv)
    if args.worker_inprocess:
        return _inprocess_worker(*args.worker_inprocess)
    if args.render:
        results = json.loads(args.render.read_text())
        write_reports(results, args.out, _docs_path(args, results["config"]["quick"]))
        print(render_markdown(results))
        return 0

    ensure_wrk()
    repository = args.repository.resolve()
    if not all((repository / m / "config.json").is_file() for m in MODELS):
        raise SystemExit(f"no model repository with {MODELS} at {repository}: run `make build`")
    server_cpus = parse_cpu_list(args.server_cpus)
    if set(server_cpus) & set(parse_cpu_list(args.wrk_cpus)):
        print("warning: server and wrk share a CPU; figures will be meaningless", flush=True)
    opts = Options(
        repository=repository,
        out=args.out.resolve(),
        quick=args.quick,
        seconds=args.seconds or (2 if args.quick else 8),
        warmup=args.warmup or (1 if args.quick else 2),
        server_cpus=args.server_cpus,
        wrk_cpus=args.wrk_cpus,
        threads=args.threads or len(server_cpus),
    )
    if opts.out.exists():
        shutil.rmtree(opts.out / "payloads", ignore_errors=True)
    (opts.out / "logs").mkdir(parents=True, exist_ok=True)
    models = {m: load_model_info(repository, m) for m in MODELS}
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = load_average()
    python = sys.executable
    if python.startswith(str(ROOT)):
        python = os.path.relpath(python, ROOT)
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join([python, "-m", "loadtests.bench", *given])

    print(f"in-process (pinned to CPU {opts.server_cpus}, {opts.threads} thread(s))", flush=True)
    inprocess = run_inprocess(
        models, opts.server_cpus, opts.threads, 0.5 if opts.quick else 2.0, opts.out
    )
    specs, cells = plan(), []
    with contextlib.ExitStack() as stack:
        servers = {}
        for kind, batching in SERVERS:
            suffix = "" if batching == "n/a" else f"-batching-{batching}"
            log = opts.out / "logs" / f"server-{kind}{suffix}.log"
            print(f"starting {kind}{suffix} on CPU {opts.server_cpus}", flush=True)
            cmd = server_command(kind, batching, repository, opts.threads)
            servers[(kind, batching)] = stack.enter_context(
                start_server(cmd, opts.server_cpus, log, kind == "onnxserve")
            )
        for spec in specs:
            cell = run_cell(spec, servers[(spec.server, spec.batching)], models[spec.model], opts)
            cells.append(cell)
            print(_progress(len(cells), len(specs), cell), flush=True)
    cells.sort(key=display_order)

    attach_comparisons(cells, inprocess)
    results: dict[str, Any] = {
        "schema": 1,
        "command": command,
        "started": started,
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": load_average()},
        "machine": machine_info(),
        "config": {
            "quick": opts.quick,
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "server_cpus": opts.server_cpus,
            "wrk_cpus": opts.wrk_cpus,
            "threads": opts.threads,
            "repository": str(args.repository),
            "models": {
                k: {"version": v.version, "input": v.input, "sample_shape": list(v.samples.shape)}
                for k, v in models.items()
            },
            "env": {k: v for k, v in os.environ.items() if k.startswith("ONNXSERVE_")},
        },
        "inprocess": inprocess,
        "cells": cells,
        "targets": evaluate_targets(cells, inprocess, len(server_cpus)),
    }
    write_reports(results, opts.out, _docs_path(args, opts.quick))
    print()
    print(render_markdown(results))
    print(f"wrote {opts.out / 'results.json'} and {opts.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
