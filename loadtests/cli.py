"""`onnxserve loadtest`: run Locust headless against a server and write a report with plots.

Without --url it starts `onnxserve serve` on --repository itself and stops it afterwards.
`--protocol grpc` sends Triton's gRPC ModelInfer to the server's gRPC port (--grpc-url; the
metadata and /metrics still come from --url).
Requests carry the model's held-out samples (`samples.npz` in --repository) when it has them,
else random data of each input's datatype and shape from the server's metadata (--inputs);
dynamic axes of random inputs take their sizes from --shape NAME:D1,D2 (no batch axis).
Exit status: 0 done without failed requests (capacity search: a capacity was found), 1 some
requests failed (or no step met the SLO), 2 the run could not start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests.capacity import MAX_FAILURE_RATIO, doubling, find_capacity
from loadtests.payloads import (
    GRPC,
    INPUT_SOURCES,
    PROTOCOLS,
    V2_JSON,
    grpc_target,
    parse_mix,
    parse_shapes,
)
from loadtests.report import format_table
from loadtests.runner import MODELS, LoadSpec, LoadTestError, local_server, preflight, run_once


def seconds(text: str) -> float:
    """`30`, `30s`, `2m` or `1h` as seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30, 30s, 2m)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def user_list(text: str) -> list[int]:
    """`1,8,32` as a list of positive user counts."""
    try:
        users = [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        users = []
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError(f"expected user counts like 1,8,32, got {text!r}")
    return users


def parser() -> argparse.ArgumentParser:
    """The `onnxserve loadtest` argument parser."""
    p = argparse.ArgumentParser(
        prog="onnxserve loadtest", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    target = p.add_argument_group("target")
    target.add_argument("--url", help="server to test (default: start a local one)")
    target.add_argument(
        "--repository", type=Path,
        default=Path(os.environ.get("LOADTEST_REPOSITORY", "model_repository")),
        help="model repository with the held-out samples (and served when no --url)",
    )  # fmt: skip
    target.add_argument("--server-args", default="", help="extra flags for the local server")
    target.add_argument(
        "--grpc-url", metavar="[grpc://]HOST:PORT",
        help="the server's gRPC port for --protocol grpc (default: --url's host, port 8001; "
        "the local server's own)",
    )  # fmt: skip
    traffic = p.add_argument_group("traffic")
    traffic.add_argument(
        "--model", default="cnn", help=f"{', '.join(MODELS)}, mixed, or any served model's name"
    )
    traffic.add_argument(
        "--protocol", choices=[*PROTOCOLS, "mixed"], default=V2_JSON,
        help="mixed draws from the HTTP protocols",
    )  # fmt: skip
    traffic.add_argument("--rows", type=int, default=1, help="rows (samples) per request")
    traffic.add_argument("--mix", help="weights for --model mixed, e.g. cnn:6,autoencoder:3,lstm:1")
    traffic.add_argument(
        "--inputs", choices=INPUT_SOURCES, default="auto",
        help="samples.npz from --repository, random data from the metadata, or auto: samples "
        "when the model has them, else random",
    )  # fmt: skip
    traffic.add_argument(
        "--shape", action="append", default=[], metavar="NAME:D1,D2",
        help="sizes of an input's dynamic axes for random inputs, without the batch axis "
        "(a model without one: its whole shape); repeat for each input",
    )  # fmt: skip
    load = p.add_argument_group("load")
    load.add_argument("--users", type=int, default=8, help="concurrent users (closed loop)")
    load.add_argument("--spawn-rate", type=float, help="users started per second (default: all)")
    load.add_argument("--duration", type=seconds, default=30.0, help="e.g. 30s, 2m")
    load.add_argument("--step-users", type=user_list, help="step load, e.g. 1,8,32")
    load.add_argument("--step-duration", type=seconds, default=10.0, help="seconds per step")
    load.add_argument("--processes", type=int, default=1, help="Locust processes (CPU-bound?)")
    cap = p.add_argument_group("capacity search")
    cap.add_argument(
        "--find-capacity", action="store_true",
        help="raise users (doubling, or --step-users) until the SLO breaks",
    )  # fmt: skip
    cap.add_argument("--slo-p99-ms", type=float, default=50.0)
    cap.add_argument("--max-users", type=int, default=256)
    cap.add_argument("--max-failure-ratio", type=float, default=MAX_FAILURE_RATIO)
    p.add_argument("--out", type=Path, help="output folder (default: runs/loadtest-<time>)")
    return p


@contextlib.contextmanager
def _target(args: argparse.Namespace, out: Path) -> Iterator[tuple[str, str | None]]:
    """The HTTP URL and the gRPC HOST:PORT (None unless --protocol grpc) to test."""
    grpc = args.protocol == GRPC
    if args.url:
        url = args.url.rstrip("/")
        yield url, grpc_target(url, args.grpc_url or "") if grpc else None
        return
    extra = shlex.split(args.server_args)
    with local_server(args.repository, out / "server.log", extra, grpc=grpc) as target:
        yield target


def _say(text: str, stream: Any = None) -> None:
    (stream or sys.stdout).write(text + "\n")
    (stream or sys.stdout).flush()


def main(argv: list[str] | None = None) -> int:
    """Run a load test (or a capacity search) and print a short table; see the module doc."""
    args = parser().parse_args(argv)
    if args.rows < 1 or args.users < 1 or args.processes < 1:
        _say("--rows, --users and --processes must be at least 1", sys.stderr)
        return 2
    try:
        parse_mix(args.mix or "cnn")
        shapes = ";".join(
            f"{k}:{','.join(map(str, v))}" for k, v in parse_shapes(args.shape).items()
        )
    except ValueError as exc:
        _say(str(exc), sys.stderr)
        return 2
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = (args.out or Path("runs") / f"loadtest-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _target(args, out) as (url, grpc_url):
            spec = LoadSpec(
                url=url, repository=args.repository.resolve(), model=args.model,
                protocol=args.protocol, rows=args.rows, users=args.users,
                spawn_rate=args.spawn_rate, duration_s=args.duration, steps=args.step_users,
                step_s=args.step_duration, processes=args.processes, mix=args.mix,
                inputs=args.inputs, shapes=shapes, grpc_url=grpc_url,
            )  # fmt: skip
            for model, source in preflight(spec).items():
                _say(f"{model} inputs: {source}")
            if args.find_capacity:
                return _capacity(args, spec, out)
            return _single(spec, out)
    except LoadTestError as exc:
        _say(f"onnxserve loadtest: {exc}", sys.stderr)
        return 2


def _single(spec: LoadSpec, out: Path) -> int:
    load = f"steps {spec.steps} x {spec.step_s:g}s" if spec.steps else (
        f"{spec.users} users for {spec.duration_s:g}s")  # fmt: skip
    target = spec.url + (f" (gRPC {spec.grpc_url})" if spec.grpc_url else "")
    _say(f"load test: {spec.model} / {spec.protocol} / {spec.rows} row(s), {load} -> {target}")
    summary = run_once(spec, out)
    _say(format_table(summary))
    for warning in summary["warnings"]:
        _say(f"WARNING: {warning}", sys.stderr)
    _say(f"report: {out}/summary.json, report.html, timeline.png, batch_sizes.png")
    return 1 if summary["total"]["failures"] or not summary["total"]["requests"] else 0


def _capacity(args: argparse.Namespace, spec: LoadSpec, out: Path) -> int:
    users = args.step_users or doubling(args.max_users)
    _say(
        f"capacity search: p99 <= {args.slo_p99_ms:g} ms, failures < "
        f"{100 * args.max_failure_ratio:g}%, users {users}, {spec.step_s:g}s a step -> {spec.url}"
    )

    def progress(row: dict[str, Any]) -> None:
        p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}"
        verdict = "ok" if row["meets_slo"] else "BREAKS SLO"
        _say(
            f"  {row['users']:>4} users: {row['rps']:>9.1f} rps, p99 {p99:>7} ms, "
            f"{row['failures']} failures, mean batch {row['mean_batch_size']}  {verdict}"
        )
        if row["client_cpu_bound"]:
            _say(f"WARNING: Locust was CPU-bound at {row['users']} users", sys.stderr)

    result = find_capacity(spec, users, args.slo_p99_ms, out, args.max_failure_ratio, progress)
    best = result["capacity"]
    if best:
        _say(f"capacity: {best['rps']:.1f} req/s at {best['users']} users "
             f"(p99 {best['p99_ms']} ms)")  # fmt: skip
    else:
        _say("capacity: no step met the SLO")
    _say(f"report: {out}/capacity.md, capacity.json, capacity.png")
    return 0 if best else 1


if __name__ == "__main__":
    sys.exit(main())
