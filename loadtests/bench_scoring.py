"""Batch-scoring benchmark (not a test): throughput, memory, remote mode, and online latency.

    .venv/bin/python -m loadtests.bench_scoring [--repository model_repository] [--rows 100000]
                                                [--out runs/bench-scoring.json]

Measures, on real CNN samples tiled to `--rows` rows:
- in-process scoring from Parquet (list and raw-bytes layouts) against the ONNX Runtime ceiling
  at the same batch size (the same session, batches already in memory), measured just before and
  after scoring in the same process, in several fresh processes, because the machine may be
  shared (target: >= 80 %); rows per wall second, and rows per CPU second of the process, which
  other processes' load disturbs less;
- peak RSS of a fresh process scoring N and 2N rows (target: 2N costs <= 10 % more);
- remote scoring (`--url`, v2 binary) against in-process;
- online CNN p99 at 16 connections (wrk) with and without a server job running (target <= 1.5x).
Each measurement runs in its own subprocess (`child ...`), which prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.bench.payloads import write_requests
from loadtests.bench.wrk import parse_wrk_output, wrk_command
from loadtests.payloads import V2_JSON, make_payload
from loadtests.serverproc import free_port, serve_command, serving
from service.model_config import SAMPLES_FILE, latest_version_dir

ROOT = Path(__file__).resolve().parents[1]
CONNECTIONS = 16


# -- children: one measurement per fresh process ---------------------------------------------
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_score(args: argparse.Namespace) -> dict[str, Any]:
    """Score a file in this process (or through --url); rows/s and this process's peak RSS."""
    from service.scoring.cli import main

    argv = [
        "cnn",
        args.input,
        args.output,
        "--repository",
        args.repository,
        "--no-progress",
        "--batch-size",
        str(args.batch_size),
    ]
    if args.url:
        argv += ["--url", args.url, "--concurrency", "4"]
    with contextlib.redirect_stdout(sys.stderr):
        code = main(argv)
    summary = json.loads((Path(args.output) / "_summary.json").read_text())
    return {
        "exit": code,
        "rows_per_s": summary["rows_per_s"],
        "seconds": summary["seconds"],
        "rows": summary["rows"],
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }


def child_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Scoring beside the ceiling in one process, on one session: ONNX Runtime alone over the
    same number of rows (batches already in memory) just before and just after scoring."""
    from concurrent.futures import ThreadPoolExecutor

    from service.runtime import ModelRuntime, RuntimeOptions
    from service.scoring.engine import local_infer, run
    from service.scoring.plan import local_model, prepare
    from service.scoring.writer import result_table

    config, version, model_path = local_model(Path(args.repository), "cnn", None)
    runtime = ModelRuntime(model_path, RuntimeOptions())
    batch = np.resize(samples(Path(args.repository)), (args.batch_size, 1, 28, 28))
    runtime.run({"image": batch})

    def ceiling() -> tuple[float, float]:
        """Rows per second of wall time, and of this process's CPU time."""
        start, cpu, done = time.perf_counter(), time.process_time(), 0
        while done < args.rows:
            runtime.run({"image": batch})
            done += args.batch_size
        return done / (time.perf_counter() - start), done / (time.process_time() - cpu)

    result_table(config, np.arange(0), None)  # one-time imports (pyarrow pulls in pandas)
    before = ceiling()
    plan = prepare(
        config, version, Path(args.input), Path(args.output), engine="local",
        batch_size=args.batch_size,
    )  # fmt: skip
    cpu = time.process_time()
    with ThreadPoolExecutor(1, "score-ort") as pool:
        summary = asyncio.run(run(plan, local_infer(runtime, pool)))
    cpu_rate = summary.rows / (time.process_time() - cpu)
    after = ceiling()
    top, top_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    return {
        "rows_per_s": summary.rows_per_s,
        "ceiling_rows_per_s": round(top, 1),
        "ratio": round(summary.rows_per_s / top, 3),
        "cpu_ratio": round(cpu_rate / top_cpu, 3),
    }


def run_child(kind: str, **options: Any) -> dict[str, Any]:
    argv = [sys.executable, "-m", "loadtests.bench_scoring", "child", kind]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- inputs ----------------------------------------------------------------------------------
def samples(repository: Path) -> np.ndarray:
    """The CNN's real held-out inputs."""
    with np.load(latest_version_dir(repository / "cnn") / SAMPLES_FILE) as data:
        return data["inputs"].astype(np.float32)


def write_input(repository: Path, path: Path, rows: int, layout: str) -> Path:
    """`rows` real CNN samples (tiled) as Parquet, written a slice at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = samples(repository).reshape(-1, 784)
    block = np.resize(x, (min(rows, 10_000), 784))
    if layout == "list":
        column = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), 784)
    else:
        column = pa.array([row.tobytes() for row in block], pa.binary(784 * 4))
    with pq.ParquetWriter(path, pa.schema([("image", column.type)])) as writer:
        for start in range(0, rows, len(block)):
            writer.write_table(pa.table({"image": column[: min(len(block), rows - start)]}))
    return path


# -- a server and wrk ------------------------------------------------------------------------
@contextlib.contextmanager
def server(repository: Path, jobs_root: Path, port: int, log: Path) -> Iterator[str]:
    cmd = serve_command(repository, "--models", "cnn", port=port)
    env = {"ONNXSERVE_JOBS_ROOT": str(jobs_root)}
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, log, f"{url}/v2/health/ready", env=env, timeout_s=60, stop_wait_s=30):
        yield url


def wrk(url: str, workdir: Path, repository: Path, seconds: int) -> dict[str, Any]:
    """Single-sample CNN v2 JSON requests at CONNECTIONS connections; wrk's latency figures."""
    x = samples(repository)[:8]
    payloads = [make_payload("cnn", V2_JSON, {"image": x[i : i + 1]}) for i in range(len(x))]
    manifest = write_requests(payloads, workdir, "requests")
    cmd = wrk_command(url, manifest, CONNECTIONS, seconds)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    doc = parse_wrk_output(out)
    latency = doc["latency_us"]
    return {
        "rps": round(doc["rps"], 1),
        "p50_ms": round(latency["p50"] / 1000, 2),
        "p99_ms": round(latency["p99"] / 1000, 2),
        "non2xx": doc["non2xx"],
        "socket_errors": doc["socket_errors"],
    }


def online_with_and_without_job(
    repository: Path, work: Path, big: Path, seconds: int
) -> dict[str, Any]:
    import httpx

    if shutil.which("wrk") is None:
        return {"skipped": "wrk is not installed"}
    with server(repository, work, free_port(), work / "server.log") as url:
        wrk(url, work, repository, 2)  # warm-up
        alone = wrk(url, work, repository, seconds)
        spec = {"model": "cnn", "input": big.name, "output": "job-out", "chunk_rows": 4096}
        job = httpx.post(f"{url}/v1/jobs", json=spec).json()
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["rows_done"] == 0:
            time.sleep(0.1)
        before = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
        loaded = wrk(url, work, repository, seconds)
        after = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
        httpx.delete(f"{url}/v1/jobs/{job['id']}")
    job_rows = after["rows_done"] - before["rows_done"]
    return {
        "connections": CONNECTIONS,
        "without_job": alone,
        "with_job": {
            **loaded,
            "job_rows_per_s_meanwhile": round(job_rows / seconds, 1),
            "job_still_running": after["state"] == "running",
        },
        "p99_ratio": round(loaded["p99_ms"] / alone["p99_ms"], 2),
        "target_p99_ratio_max": 1.5,
    }


# -- the run ---------------------------------------------------------------------------------
def throughput(repository: Path, work: Path, inputs: dict[str, Path], args: Any) -> dict:
    """Scoring against the ceiling, `repeat` fresh processes per layout; the median ratio."""
    results: dict[str, Any] = {}
    for layout, path in inputs.items():
        runs = []
        for i in range(args.repeat):
            out = work / f"out-{layout}-{i}"
            runs.append(
                run_child(
                    "throughput",
                    repository=repository,
                    input=path,
                    output=out,
                    rows=args.rows,
                    batch_size=args.batch_size,
                )
            )
            shutil.rmtree(out)
        results[layout] = {
            "rows_per_s": [r["rows_per_s"] for r in runs],
            "ceiling_rows_per_s": [r["ceiling_rows_per_s"] for r in runs],
            "ratios": [r["ratio"] for r in runs],
            "median_ratio": statistics.median(r["ratio"] for r in runs),
            "cpu_ratios": [r["cpu_ratio"] for r in runs],  # rows per CPU-second, less load-bound
            "median_cpu_ratio": statistics.median(r["cpu_ratio"] for r in runs),
        }
    return results


def main_run(args: argparse.Namespace) -> int:
    repository = Path(args.repository).resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    try:
        rows = args.rows
        inputs = {
            "list": write_input(repository, work / "list.parquet", rows, "list"),
            "bytes": write_input(repository, work / "bytes.parquet", rows, "bytes"),
        }
        big = write_input(repository, work / "bytes-2x.parquet", 2 * rows, "bytes")
        load_before = os.getloadavg()
        report: dict[str, Any] = {
            "cpus": os.cpu_count(),
            "rows": rows,
            "batch_size": args.batch_size,
            "throughput": throughput(repository, work, inputs, args),
        }
        rss = {}
        for n, path in ((rows, inputs["bytes"]), (2 * rows, big)):
            rss[str(n)] = run_child(
                "score",
                repository=repository,
                input=path,
                output=work / f"out-rss-{n}",
                batch_size=args.batch_size,
            )
        single, double = (r["peak_rss_mb"] for r in rss.values())
        report["memory"] = {
            "peak_rss_mb": {n: r["peak_rss_mb"] for n, r in rss.items()},
            "growth_pct": round(100 * (double / single - 1), 1),
            "target_growth_pct_max": 10,
        }
        with server(repository, work, free_port(), work / "remote-server.log") as url:
            remote = run_child(
                "score",
                repository=repository,
                input=inputs["bytes"],
                url=url,
                output=work / "out-remote",
                batch_size=args.batch_size,
            )
        local = rss[str(rows)]["rows_per_s"]
        report["remote"] = {
            "rows_per_s": remote["rows_per_s"],
            "in_process_rows_per_s": local,
            "ratio": round(remote["rows_per_s"] / local, 3),
        }
        report["online"] = online_with_and_without_job(repository, work, big, args.seconds)
        report["load_average"] = {"before": load_before, "after": os.getloadavg()}
        t = report["throughput"]["bytes"]
        report["targets"] = {
            "throughput_ge_80pct_of_ceiling": t["median_ratio"] >= 0.8,
            "rss_growth_le_10pct": report["memory"]["growth_pct"] <= 10,
            "online_p99_with_job_le_1_5x": report["online"].get("p99_ratio", 9) <= 1.5,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode")
    run = sub.add_parser("run", help="the whole benchmark (default)")
    child = sub.add_parser("child", help="one measurement (internal)")
    child.add_argument("kind", choices=("score", "throughput"))
    child.add_argument("--input")
    child.add_argument("--output")
    child.add_argument("--url")
    for q in (run, child):
        q.add_argument("--repository", default=str(ROOT / "model_repository"))
        q.add_argument("--rows", type=int, default=100_000)
        q.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--repeat", type=int, default=3)
    run.add_argument("--seconds", type=int, default=10, help="wrk duration per measurement")
    run.add_argument("--out", default=str(ROOT / "runs" / "bench-scoring.json"))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "child", "-h", "--help"):
        argv.insert(0, "run")
    args = parser().parse_args(argv)
    if args.mode == "child":
        measure = child_score if args.kind == "score" else child_throughput
        sys.stdout.write(json.dumps(measure(args)) + "\n")
        return 0
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
