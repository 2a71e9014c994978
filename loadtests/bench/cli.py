"""Benchmark: onnxserve against in-process ONNX Runtime and a plain FastAPI baseline, in one run.

    .venv/bin/python -m loadtests.bench [--quick] [--out runs/bench] [--repository model_repository]

Measures, with the server pinned to one core and wrk (one thread) to another:
- the in-process ceiling (ONNX Runtime alone, the server's session options and thread count);
- the in-process floor (service.codec decode -> run -> encode, no HTTP);
- the FastAPI baseline (loadtests/baselines/fastapi_baseline.py), v2 JSON;
- onnxserve with batching on and off: single-sample CNN and LSTM requests (v2 JSON, v2 binary,
  v1) at 1, 16 and 64 connections, and 32-row binary CNN requests;
- onnxserve over gRPC (batching on): single-sample CNN calls at 1, 16 and 64 concurrent calls and
  32-row CNN calls, from loadtests.bench.grpcload (wrk cannot speak gRPC) pinned where wrk is;
then evaluates the targets and writes results.json, results.md and (full runs) docs/benchmarks.md.
`--render results.json` redraws the markdown from a stored run without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from loadtests.bench.cells import (
    MODELS,
    SERVERS,
    display_order,
    median_rounds,
    plan,
    server_command,
)
from loadtests.bench.cpu import parse_cpu_list
from loadtests.bench.inprocess import inprocess_worker, run_inprocess
from loadtests.bench.machine import load_average, machine_info
from loadtests.bench.measure import Options, run_cell, start_server
from loadtests.bench.models import load_model_info
from loadtests.bench.render import fmt, render_markdown, write_reports
from loadtests.bench.targets import attach_comparisons, evaluate_targets
from loadtests.bench.wrk import ensure_wrk
from service.model_config import CONFIG_FILE

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks.md"


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
    p.add_argument("--rounds", type=int, default=1, help="passes over every cell; each cell "
                   "reports its median round (default 1)")  # fmt: skip
    p.add_argument("--server-cpus", default="0", help="taskset list for the server (default 0)")
    p.add_argument("--wrk-cpus", default="1", help="taskset list for wrk (default 1)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: server CPU count)")
    p.add_argument("--docs", type=Path, help="also write this docs page (full runs: docs/...)")
    p.add_argument("--no-docs", action="store_true", help="do not write the docs page")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON", help="redraw markdown only")
    p.add_argument("--scale", action="store_true", help="run the --workers scale benchmark instead "
                   "(loadtests/bench/scale.py; its flags: --scale --help)")  # fmt: skip
    p.add_argument("--worker-inprocess", nargs=2, type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _docs_path(args: argparse.Namespace, quick: bool) -> Path | None:
    if args.no_docs:
        return None
    return args.docs or (None if quick else DOCS)


def _progress(i: int, n: int, cell: dict[str, Any], round_: int = 0, rounds: int = 1) -> str:
    at = f"[{i}/{n}]" if rounds <= 1 else f"[round {round_ + 1}/{rounds}, {i}/{n}]"
    if cell.get("error"):
        return f"{at} {cell['label']}: ERROR {cell['error'][:200]}"
    lat = cell["latency_us"]
    batch = cell.get("mean_batch_size")
    return (
        f"{at} {cell['label']}: {cell['rps']:,.0f} req/s, p50 {lat['p50'] / 1000:.2f} ms, "
        f"p99 {lat['p99'] / 1000:.2f} ms, failed {cell['failed_requests']}, batch "
        f"{fmt(batch, '.1f')}, cpu server {cell['cpu_pct']['server']:.0f}% "
        f"(others {cell['other_cpu_pct']['server_cpus']:.0f}%{', NOISY' if cell['noisy'] else ''}) "
        f"wrk {cell['cpu_pct']['wrk']:.0f}%{' (SATURATED)' if cell['wrk_saturated'] else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or the in-process worker, a re-render, or the scale benchmark)."""
    given = sys.argv[1:] if argv is None else argv
    if "--scale" in given:  # the --workers scale benchmark, with its own flags
        from loadtests.bench.scale import main as scale

        return scale([a for a in given if a != "--scale"])
    args = parse_args(argv)
    if args.worker_inprocess:
        return inprocess_worker(*args.worker_inprocess)
    if args.render:
        results = json.loads(args.render.read_text())
        write_reports(results, args.out, _docs_path(args, results["config"]["quick"]))
        print(render_markdown(results))
        return 0

    ensure_wrk()
    repository = args.repository.resolve()
    if not all((repository / m / CONFIG_FILE).is_file() for m in MODELS):
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
    specs, rounds = plan(), []
    with contextlib.ExitStack() as stack:
        servers = {}
        for kind, batching in SERVERS:
            suffix = "" if batching == "n/a" else f"-batching-{batching}"
            log = opts.out / "logs" / f"server-{kind}{suffix}.log"
            print(f"starting {kind}{suffix} on CPU {opts.server_cpus}", flush=True)
            cmd = server_command(kind, batching, repository, opts.threads)
            onnxserve = kind == "onnxserve"
            servers[(kind, batching)] = stack.enter_context(
                start_server(cmd, opts.server_cpus, log, onnxserve, grpc=batching == "on")
            )
        for k in range(max(1, args.rounds)):
            measured: list[dict[str, Any]] = []
            for spec in specs:
                server = servers[(spec.server, spec.batching)]
                measured.append(run_cell(spec, server, models[spec.model], opts))
                print(_progress(len(measured), len(specs), measured[-1], k, args.rounds),
                      flush=True)  # fmt: skip
            rounds.append(measured)
    cells = median_rounds(rounds)
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
            "rounds": max(1, args.rounds),
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
