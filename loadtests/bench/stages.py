"""Server CPU per request, split by stage: where a request's microseconds go, for one or more
source trees in one run (the "before/after" of a hot-path change).

    .venv/bin/python -m loadtests.bench.stages [--tree LABEL=PATH ...] [--protocol v2-json]
        [--conns 64] [--seconds 6] [--rounds 2] [--out runs/stages.json]

For each tree (default: this checkout), and each round: `onnxserve serve` from that tree (its
own code, this repository and interpreter) pinned to CPU 0 with one ONNX Runtime thread, wrk on
CPU 1 sending single-sample CNN requests at `--conns` connections, and py-spy sampling the
server meanwhile. CPU per request is the server's CPU time over the requests wrk completed. The
worker threads' share (ONNX Runtime) is their own CPU time, from /proc; the main thread's (the
event loop's) is split by its samples. (Samples alone would count a thread that is runnable but
waiting for the one core while the other runs.) Trees are measured alternately, round by round, so
drift on a shared machine biases them alike. Needs `wrk` and `py-spy` (pip install py-spy).

A sample goes to the innermost frame that names a stage (STAGES, in that order of precedence
from the leaf outwards); samples of other threads are the worker thread (ONNX Runtime); the
rest of the main thread is the event loop itself (uvloop, epoll, socket reads in C).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests.bench.cells import CellSpec
from loadtests.bench.cpu import main_thread_ticks, process_ticks
from loadtests.bench.measure import write_manifest
from loadtests.bench.models import load_model_info
from loadtests.bench.render import write_results
from loadtests.bench.wrk import parse_wrk_output, run_wrk
from loadtests.serverproc import ROOT, free_port, serve_command, serving

#: (stage, pattern over a frame's "function (file:line)") from the most specific outwards.
STAGES: list[tuple[str, re.Pattern[str]]] = [
    ("socket writes", re.compile(r"^(OneWrite\.|RequestResponseCycle\.send |_write)")),
    ("metrics and statistics", re.compile(
        r"^(DataPlane\.(succeeded|failed)|ModelStats\.|Metric|Histogram\.|Counter\.|Gauge\.|"
        r"MutexValue|server_timing|.*\(prometheus_client/)")),
    ("security guard", re.compile(r"^Guard\.|^KeyStore\.")),
    ("decode (JSON or binary to arrays)", re.compile(
        r"^(decode_request|_loads|_json_tensor|_binary_tensor|decompress|_shape|_parameters) ")),
    ("validation (shapes, limits, finite)", re.compile(
        r"^(Bounds\.|check_|validate_inputs|wanted_outputs)")),
    ("batcher (queue, join, split)", re.compile(r"^(Batcher\.|batch_key|_untime|Pending)")),
    ("encode", re.compile(r"^(encode_response|DataPlane\.response_parameters|_encode)")),
    ("HTTP in Python (parse callbacks, routing, ASGI, lanes)", re.compile(
        r"\((uvicorn|starlette|fastapi|httptools)/|\(service/(httpserver|fastlane|transport|"
        r"app|api|dataplane)\.py")),
]  # fmt: skip
LOOP_FRAMES = ("Runner.run ", "BaseEventLoop.run_forever ", "BaseEventLoop.run_until_complete ")
PY_SPY = Path(sys.executable).parent / "py-spy"  # installed beside this interpreter, or on PATH
WORKER = "worker thread (ONNX Runtime, its pool)"
LOOP = "event loop and kernel (uvloop, epoll, socket reads)"


def stage_of(stack: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first, the thread's name frame first).
    Only the frames the event loop called count: those around it (uvicorn's `Server.run`, the
    CLI) are on every stack."""
    if not stack[0].endswith("MainThread"):
        return WORKER
    loop = max((i for i, f in enumerate(stack) if f.startswith(LOOP_FRAMES)), default=0)
    for frame in reversed(stack[loop + 1 :]):
        for stage, pattern in STAGES:
            if pattern.search(frame):
                return stage
    return LOOP


def split_profile(raw: str) -> dict[str, int]:
    """Samples per stage of a py-spy `--format raw --threads` profile."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[stage_of(stack.split(";"))] += int(count)
    return dict(counts)


def measure(
    tree: Path, args: argparse.Namespace, manifest: Path, workdir: Path, profile: Path
) -> dict[str, Any]:
    """One tree, one round: requests/s, server CPU µs per request, and samples per stage (the
    raw py-spy profile is kept at `profile`)."""
    port = free_port()
    cmd = serve_command(args.repository.resolve(), "--threads", "1", "--models", "cnn",
                        port=port)  # fmt: skip
    env = {"PYTHONPATH": str(tree)}  # and run in the tree: `python -m` imports from there
    log = workdir / f"server-{port}.log"
    ready = f"http://127.0.0.1:{port}/v2/health/ready"
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, log, ready, cpus="0", env=env, cwd=tree) as process:
        run_wrk(url, manifest, args.conns, 2, "1", workdir / "warm.log")
        ticks, loop_ticks = process_ticks(process.pid), main_thread_ticks(process.pid)
        spy = subprocess.Popen(
            ["taskset", "-c", "1", str(PY_SPY) if PY_SPY.exists() else "py-spy", "record",
             "-p", str(process.pid), "-d", str(args.seconds), "-r", "100", "--format", "raw",
             "--threads", "--nonblocking", "-o", str(profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        out, _, _ = run_wrk(url, manifest, args.conns, args.seconds, "1", workdir / "wrk.log")
        ticks = process_ticks(process.pid) - ticks
        loop_ticks = main_thread_ticks(process.pid) - loop_ticks
        spy.wait(timeout=60)
    done = parse_wrk_output(out)
    per_request = 1e6 / os.sysconf("SC_CLK_TCK") / max(1, done["requests"])
    samples = split_profile(profile.read_text())
    samples.pop(WORKER, None)
    loop_total = sum(samples.values()) or 1
    loop_us = loop_ticks * per_request
    stages = {stage: round(loop_us * n / loop_total, 1) for stage, n in samples.items()}
    stages[WORKER] = round((ticks - loop_ticks) * per_request, 1)
    return {
        "rps": round(done["rps"], 1),
        "non2xx": done["non2xx"],
        "cpu_us_per_request": round(ticks * per_request, 1),
        "stages_us": stages,
        "profile": str(profile),
    }


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one tree: the median of each figure over the rounds, and every round's."""
    stages = {stage for r in rounds for stage in r["stages_us"]}
    return {
        "rps": statistics.median([r["rps"] for r in rounds]),
        "rps_all": sorted(r["rps"] for r in rounds),
        "cpu_us_per_request": round(
            statistics.median([r["cpu_us_per_request"] for r in rounds]), 1
        ),
        "cpu_us_all": sorted(r["cpu_us_per_request"] for r in rounds),
        "stages_us": {
            s: round(statistics.median([r["stages_us"].get(s, 0.0) for r in rounds]), 1)
            for s in stages
        },
        "non2xx": sum(r["non2xx"] for r in rounds),
    }


def render(results: dict[str, Any]) -> str:
    """A markdown table: µs of server CPU per request by stage, one column per tree."""
    labels = list(results["trees"])
    order = [s for s, _ in STAGES] + [WORKER, LOOP]
    head = "| stage | " + " | ".join(f"{label} µs" for label in labels) + " |"
    lines = [head, "|---|" + "---:|" * len(labels)]
    for stage in order:
        cells = [results["trees"][t]["stages_us"].get(stage) for t in labels]
        lines.append(f"| {stage} | " + " | ".join(f"{c:.0f}" if c else "–" for c in cells) + " |")
    for what, key, spec in (("**total CPU per request**", "cpu_us_per_request", ".0f"),
                            ("requests/s (median)", "rps", ",.0f")):  # fmt: skip
        cells = [results["trees"][t][key] for t in labels]
        lines.append(f"| {what} | " + " | ".join(format(c, spec) if c else "–" for c in cells)
                     + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a source tree to measure (repeatable; default: this checkout)",
    )
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--protocol", default="v2-json", choices=("v2-json", "v2-binary"))
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--seconds", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "stages.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure every tree, alternating, and write the JSON and its table."""
    args = parse_args(argv)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    if not PY_SPY.exists() and shutil.which("py-spy") is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    trees = dict(t.split("=", 1) for t in args.tree) or {"this checkout": str(ROOT)}
    info = load_model_info(args.repository, "cnn")
    rounds: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
    with tempfile.TemporaryDirectory(prefix="stages-") as tmp:
        workdir = Path(tmp)
        manifest, _ = write_manifest(CellSpec("onnxserve", "cnn", args.protocol, args.conns),
                                     info, workdir)  # fmt: skip
        profiles = args.out.with_suffix("")  # the raw profiles, beside the results
        profiles.mkdir(parents=True, exist_ok=True)
        for k in range(args.rounds):
            for i, (label, path) in enumerate(trees.items()):
                raw = profiles / f"tree{i}-round{k + 1}.txt"
                r = measure(Path(path).resolve(), args, manifest, workdir, raw)
                rounds[label].append(r)
                print(f"round {k + 1} {label}: {r['rps']:,.0f} req/s, "
                      f"{r['cpu_us_per_request']} µs CPU/request", file=sys.stderr)  # fmt: skip
    results = {
        "command": " ".join(["python -m loadtests.bench.stages", *(argv or sys.argv[1:])]),
        "protocol": args.protocol,
        "conns": args.conns,
        "trees": {
            label: {"path": trees[label], **combine(rs), "rounds": rs}
            for label, rs in rounds.items()
        },  # fmt: skip
    }
    write_results(args.out, results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
