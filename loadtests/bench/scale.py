"""Scale benchmark: the CNN at 64 connections served by 1, 2, ... worker processes (`--workers`).

    .venv/bin/python -m loadtests.bench --scale [--quick] [--out runs/scale] [--rounds 3]

For each worker count: requests/s, p50 and p99 latency, and requests per server CPU-second (the
CPU time of the supervisor and all its workers together, read from /proc), from wrk (one
thread, 64 connections, single-sample v2 JSON requests). Worker counts go from 1 to the cores
this process may use minus the load generator's: wrk is pinned to the last core and the server
to the others, each worker with cores // workers intra-op threads. With fewer than three cores
that leaves one, so the run compares 1 and 2 workers with wrk and the server sharing every core
(nothing pinned), and the report says so. The counts are measured in turn, `rounds` times
(1, 2, ..., 1, 2, ...), and each count's median round is reported: drift in a shared machine's
load then biases the comparison less. Other processes' share of the CPUs is recorded per cell.

Writes `scale.json` and `scale.md` to `--out` and, on full runs, the scale section of
docs/benchmarks.md (between SECTION_BEGIN and SECTION_END; the rest of the page is left alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from loadtests.bench.cells import CellSpec
from loadtests.bench.cpu import cpu_times, foreign_cpu_pct, parse_proc_stat
from loadtests.bench.machine import load_average, machine_info
from loadtests.bench.measure import check_payload, http, start_server, write_manifest
from loadtests.bench.models import load_model_info
from loadtests.bench.wrk import ensure_wrk, parse_wrk_output, run_wrk
from loadtests.payloads import V2_JSON
from loadtests.prom import mean_batch_size
from loadtests.serverproc import serve_command
from service.config import Settings
from service.workers import worker_threads

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION_BEGIN = "<!-- scale benchmark: written by `python -m loadtests.bench --scale` -->"
SECTION_END = "<!-- end of the scale benchmark -->"
MODEL, CONNECTIONS = "cnn", 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench --scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="3 s cells, 1 round (smoke run)")
    p.add_argument("--out", type=Path, default=Path("runs/scale"), help="output folder")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--seconds", type=int, help="measured seconds per cell (default 8; quick 3)")
    p.add_argument("--warmup", type=int, help="warm-up seconds per cell (default 2; quick 1)")
    p.add_argument("--rounds", type=int, help="rounds over the worker counts (default 3)")
    p.add_argument("--workers", help="worker counts to run, e.g. 1,2,4 (default: see above)")
    p.add_argument("--docs", type=Path, help="write the section into this page (full runs: docs/)")
    p.add_argument("--no-docs", action="store_true", help="do not touch the docs page")
    return p.parse_args(argv)


def layout(cores: list[int]) -> tuple[list[int], str | None, str | None]:
    """Worker counts, the server's CPUs and wrk's (taskset lists; None: not pinned)."""
    if len(cores) >= 3:
        server = cores[:-1]
        return list(range(1, len(server) + 1)), ",".join(map(str, server)), str(cores[-1])
    return [1, 2], None, None


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def tree_ticks(root: int) -> dict[int, int]:
    """CPU clock ticks (user + system) of `root` and every live descendant, by pid."""
    ticks, todo = {}, [root]
    while todo:
        pid = todo.pop()
        try:
            ticks[pid] = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
        except OSError:
            continue
        todo += _children(pid)
    return ticks


def measure(
    workers: int, cpus: str | None, wrk_cpus: str | None, opts: argparse.Namespace, log: Path
) -> dict[str, Any]:
    """One cell: a `--workers N` server under 64 connections of wrk."""
    info = load_model_info(opts.repository, MODEL)
    spec = CellSpec("onnxserve", MODEL, V2_JSON, CONNECTIONS, 1, "on")
    manifest, first = write_manifest(spec, info, opts.out)
    cmd = serve_command(opts.repository, "--models", MODEL, "--workers", str(workers))
    all_cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    cell: dict[str, Any] = {"workers": workers, "error": None}
    with start_server(cmd, cpus or all_cpus, log, True) as server:
        problem = check_payload(server.url, first)
        if problem:
            return {**cell, "error": problem}
        run_wrk(server.url, manifest, CONNECTIONS, opts.warmup, wrk_cpus or all_cpus,
                log.with_suffix(".warm"))  # fmt: skip
        before = http(server.url + "/metrics")[1].decode()
        ticks0, cpus0 = tree_ticks(server.process.pid), cpu_times()
        text, wall, wrk_cpu = run_wrk(server.url, manifest, CONNECTIONS, opts.seconds,
                                      wrk_cpus or all_cpus, log.with_suffix(".wrk"))  # fmt: skip
        ticks1, cpus1 = tree_ticks(server.process.pid), cpu_times()
        after = http(server.url + "/metrics")[1].decode()
        processes = len(ticks1)
    try:
        doc = parse_wrk_output(text)
    except ValueError as exc:
        return {**cell, "error": str(exc)[:500]}
    hz = os.sysconf("SC_CLK_TCK")
    server_ticks = sum(t - ticks0.get(pid, 0) for pid, t in ticks1.items())
    server_cpu = server_ticks / hz
    every = sorted(os.sched_getaffinity(0))
    return {
        **cell,
        "processes": processes,
        "rps": doc["rps"],
        "requests": doc["requests"],
        "latency_us": doc["latency_us"],
        "failed_requests": doc["non2xx"] + doc["socket_errors"],
        "server_cpu_s": server_cpu,
        "cpu_pct": {"server": 100 * server_cpu / wall, "wrk": 100 * wrk_cpu / wall},
        "rps_per_server_cpu_s": doc["requests"] / server_cpu if server_cpu > 0 else None,
        "others_cpu_pct": foreign_cpu_pct(cpus0, cpus1, every, server_ticks + wrk_cpu * hz),
        "mean_batch_size": mean_batch_size(before, after, MODEL),
    }


def median_cell(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median requests/s (the lower middle one of an even count)."""
    good = sorted((c for c in cells if not c["error"]), key=lambda c: c["rps"])
    if not good:
        return cells[0]
    return good[(len(good) - 1) // 2]


def render(results: dict[str, Any]) -> str:
    """The markdown section."""
    config, rows = results["config"], results["summary"]
    shared = config["server_cpus"] is None
    where = (
        f"{results['machine']['cpu']}, {len(config['cores'])} cores; wrk (1 thread) and the "
        "server share every core (nothing pinned): with fewer than three cores no count above "
        "1 fits beside a pinned load generator"
        if shared
        else f"{results['machine']['cpu']}; server on CPUs {config['server_cpus']}, wrk "
        f"(1 thread) on CPU {config['wrk_cpus']}"
    )
    lines = [
        SECTION_BEGIN,
        "## Scale: worker processes (`--workers`)",
        "",
        f"The CNN, single-sample v2 JSON requests, {CONNECTIONS} connections, batching on; "
        f"{where}. Median of {config['rounds']} rounds of {config['seconds']} s per count "
        f"(counts measured in turn). Run {results['started']} with `{results['command']}`.",
        "",
        "| workers | threads/worker | requests/s | p50 ms | p99 ms | failed | server CPU | "
        "requests per server CPU-s | wrk CPU | others' CPU | mean batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        if c["error"]:
            lines.append(f"| {c['workers']} | error: {c['error'][:80]} |")
            continue
        lat = c["latency_us"]
        batch = c["mean_batch_size"]
        lines.append(
            f"| {c['workers']} | {c['threads']} | {c['rps']:,.0f} | {lat['p50'] / 1000:.2f} | "
            f"{lat['p99'] / 1000:.2f} | {c['failed_requests']} | {c['cpu_pct']['server']:.0f}% | "
            f"{c['rps_per_server_cpu_s']:,.0f} | {c['cpu_pct']['wrk']:.0f}% | "
            f"{c['others_cpu_pct']:.0f}% | {'–' if batch is None else f'{batch:.1f}'} |"
        )
    good = [c for c in rows if not c["error"]]
    if len(good) > 1 and good[0]["workers"] == 1:
        one = good[0]
        for c in good[1:]:
            lines.append("")
            lines.append(
                f"{c['workers']} workers: {c['rps'] / one['rps']:.2f}x the requests/s of one, "
                f"{c['rps_per_server_cpu_s'] / one['rps_per_server_cpu_s']:.2f}x its requests "
                "per server CPU-second."
            )
    lines += [
        "",
        "Server CPU is the supervisor's and all workers' CPU time over the cell's wall time "
        '(100% = one core); "others\' CPU" is what other processes on the machine used of all '
        "its cores meanwhile (a shared machine's noise). Every round, in the order measured:",
        "",
        "| round | workers | requests/s | p99 ms | requests per server CPU-s | others' CPU |",
        "|---|---|---|---|---|---|",
    ]
    for c in results["cells"]:
        if not c["error"]:
            lines.append(
                f"| {c['round']} | {c['workers']} | {c['rps']:,.0f} | "
                f"{c['latency_us']['p99'] / 1000:.1f} | {c['rps_per_server_cpu_s']:,.0f} | "
                f"{c['others_cpu_pct']:.0f}% |"
            )
    lines.append(SECTION_END)
    return "\n".join(lines) + "\n"


def write_section(page: Path, section: str) -> None:
    """Replace the scale section of `page` (appended if it has none); the rest is kept."""
    text = page.read_text() if page.exists() else "# Benchmarks\n"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        tail = rest.split(SECTION_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark (see the module docstring)."""
    opts = parse_args(argv)
    ensure_wrk()
    opts.repository = opts.repository.resolve()
    opts.out = opts.out.resolve()
    opts.seconds = opts.seconds or (3 if opts.quick else 8)
    opts.warmup = opts.warmup or (1 if opts.quick else 2)
    rounds = opts.rounds or (1 if opts.quick else 3)
    cores = sorted(os.sched_getaffinity(0))
    counts, server_cpus, wrk_cpus = layout(cores)
    if opts.workers:
        counts = [int(n) for n in opts.workers.split(",")]
    server_cores = len(server_cpus.split(",")) if server_cpus else len(cores)
    (opts.out / "logs").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = load_average()
    cells: list[dict[str, Any]] = []
    for round_ in range(1, rounds + 1):
        for n in counts:
            log = opts.out / "logs" / f"workers-{n}-round-{round_}.log"
            cell = measure(n, server_cpus, wrk_cpus, opts, log)
            cell.update(round=round_, threads=worker_threads(Settings(), n, server_cores))
            cells.append(cell)
            if cell["error"]:
                print(f"[round {round_}] {n} worker(s): ERROR {cell['error'][:300]}", flush=True)
            else:
                print(
                    f"[round {round_}] {n} worker(s): {cell['rps']:,.0f} req/s, p99 "
                    f"{cell['latency_us']['p99'] / 1000:.2f} ms, "
                    f"{cell['rps_per_server_cpu_s']:,.0f} req per server CPU-s, server "
                    f"{cell['cpu_pct']['server']:.0f}% wrk {cell['cpu_pct']['wrk']:.0f}% others "
                    f"{cell['others_cpu_pct']:.0f}%",
                    flush=True,
                )
    summary = [median_cell([c for c in cells if c["workers"] == n]) for n in counts]
    given = ["--scale", *(argv if argv is not None else [])]
    results = {
        "schema": 1,
        "command": " ".join([".venv/bin/python", "-m", "loadtests.bench", *given]),
        "started": started,
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": {"start": load_start, "end": load_average()},
        "machine": machine_info(),
        "config": {
            "model": MODEL,
            "connections": CONNECTIONS,
            "protocol": V2_JSON,
            "seconds": opts.seconds,
            "warmup": opts.warmup,
            "rounds": rounds,
            "counts": counts,
            "cores": cores,
            "server_cpus": server_cpus,
            "wrk_cpus": wrk_cpus,
            "quick": opts.quick,
        },  # fmt: skip
        "summary": summary,
        "cells": cells,
    }
    section = render(results)
    (opts.out / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    (opts.out / "scale.md").write_text(section)
    docs = None if opts.no_docs else (opts.docs or (None if opts.quick else DOCS))
    if docs is not None:
        write_section(docs, section)
    print()
    print(section)
    print(f"wrote {opts.out / 'scale.json'}" + (f" and the section of {docs}" if docs else ""))
    return 0
