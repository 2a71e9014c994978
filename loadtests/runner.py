"""Run Locust headless in a subprocess, bounded in time, and gather one run's report.

`run_once` scrapes the server's `/metrics` before and after, runs Locust (sampling its CPU with
psutil and watching its log for its own CPU warning), then writes `summary.json`, plots and the
files Locust wrote itself into the output folder. `local_server` starts `onnxserve serve` when
no URL is given.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from loadtests import report
from loadtests.payloads import GRPC, V2_JSON, parse_mix, parse_shapes, traffic_for, unknown_shapes
from loadtests.prom import metric_delta, parse_metrics, server_view
from loadtests.serverproc import ServerNotReady, free_port, serve_command, start, stop, wait_ready
from loadtests.timing import read_timings, summarize

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MODELS = ("cnn", "lstm", "autoencoder")
CPU_LIMIT = 90.0  # % of one core, Locust's own threshold
#: Seconds Locust may take beyond its run time (start-up, stopping users, writing reports).
GRACE_S = 90.0
_STARTED = ("Ramping to", "Shape test starting", "Sending spawn jobs")
_STOPPING = (", shutting down", "Shape test stopping")
_CPU_WARNING = "CPU usage above"


class LoadTestError(RuntimeError):
    """A run that cannot start or complete; the message says what to fix."""


@dataclass
class LoadSpec:
    """What to run: the target, the traffic and the load."""

    url: str
    repository: Path
    model: str = "cnn"
    protocol: str = V2_JSON
    rows: int = 1
    inputs: str = "auto"  # samples.npz, random data from the metadata, or auto
    shapes: str = ""  # dynamic axes of random inputs: NAME:D1,D2;NAME2:...
    users: int = 4
    spawn_rate: float | None = None  # None: all users within about a second
    duration_s: float = 30.0
    steps: list[int] | None = None  # a step-load run: users per step
    step_s: float = 10.0
    processes: int = 1
    mix: str | None = None
    reset_stats: bool = False  # drop the ramp-up from Locust's statistics
    grpc_url: str | None = None  # HOST:PORT of the gRPC port (--protocol grpc)

    @property
    def run_time_s(self) -> float:
        return len(self.steps) * self.step_s if self.steps else self.duration_s

    def models(self) -> list[str]:
        """The models this traffic reaches."""
        if self.model != "mixed":
            return [self.model]
        return list(parse_mix(self.mix)) if self.mix else list(MODELS)


def locust_command(spec: LoadSpec, out: Path) -> tuple[list[str], dict[str, str]]:
    """The Locust command line and environment for `spec`, writing its files under `out`."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", spec.url,
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
        "--json-file", str(out / "locust_final"), "--exit-code-on-error", "0",
        "--stop-timeout", "5",
        "--model", spec.model, "--protocol", spec.protocol, "--rows", str(spec.rows),
        "--repository", str(spec.repository), "--timings-file", str(out / "server_timing.csv"),
        "--inputs", spec.inputs, "--shape", spec.shapes,
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "PYTHONPATH": path}  # the locustfile imports `loadtests`
    for name in ("LOADTEST_STEPS", "LOADTEST_STEP_DURATION"):
        env.pop(name, None)
    if spec.mix:
        cmd += ["--mix", spec.mix]
    if spec.grpc_url:
        cmd += ["--grpc-host", spec.grpc_url]
    if spec.processes > 1:
        cmd += ["--processes", str(spec.processes)]
    if spec.reset_stats:
        cmd.append("--reset-stats")
    if spec.steps:
        env["LOADTEST_STEPS"] = ",".join(str(u) for u in spec.steps)
        env["LOADTEST_STEP_DURATION"] = f"{spec.step_s:g}"
    else:
        rate = spec.spawn_rate or max(spec.users, 1)
        cmd += ["--users", str(spec.users), "--spawn-rate", f"{rate:g}"]
        cmd += ["--run-time", f"{max(round(spec.duration_s), 1)}s"]
    return cmd, env


class CpuSampler(threading.Thread):
    """Samples the CPU of a process and its children while `measuring` is set."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.measuring, self.done = threading.Event(), threading.Event()
        self.samples: dict[int, list[float]] = {}

    def run(self) -> None:
        procs: dict[int, psutil.Process] = {}
        while not self.done.wait(self.interval):
            try:
                root = psutil.Process(self.pid)
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in family:
                try:
                    if p.pid not in procs:
                        procs[p.pid] = p
                        p.cpu_percent(None)  # the first call only primes the counter
                        continue
                    value = procs[p.pid].cpu_percent(None)
                except psutil.Error:
                    continue
                if self.measuring.is_set():
                    self.samples.setdefault(p.pid, []).append(value)

    def result(self) -> dict[str, Any]:
        """Mean and peak CPU (% of one core) of the busiest Locust process."""
        means = {pid: sum(v) / len(v) for pid, v in self.samples.items() if v}
        busiest = max(means, key=means.get) if means else None  # type: ignore[arg-type]
        return {
            "processes": len(means),
            "mean_percent": round(means[busiest], 1) if busiest else None,
            "max_percent": round(max(self.samples[busiest]), 1) if busiest else None,
            "samples": len(self.samples.get(busiest, [])) if busiest else 0,
        }


@dataclass
class LocustRun:
    """How the Locust process went."""

    returncode: int | None
    timed_out: bool
    wall_s: float
    cpu: dict[str, Any] = field(default_factory=dict)
    cpu_warning_logged: bool = False


def run_locust(spec: LoadSpec, out: Path) -> LocustRun:
    """Run Locust for `spec` into `out`; killed if it overruns its run time by GRACE_S."""
    out.mkdir(parents=True, exist_ok=True)
    cmd, env = locust_command(spec, out)
    (out / "locust_command.txt").write_text(" ".join(cmd) + "\n")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        text=True, errors="replace", bufsize=1,
    )  # fmt: skip
    sampler = CpuSampler(proc.pid)
    sampler.start()
    warned = threading.Event()

    def follow() -> None:
        with (out / "locust.log").open("w") as sink:
            for line in proc.stdout or ():
                sink.write(line)
                if any(m in line for m in _STARTED):
                    sampler.measuring.set()
                if any(m in line for m in _STOPPING):
                    sampler.measuring.clear()
                if _CPU_WARNING in line:
                    warned.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=spec.run_time_s + GRACE_S)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
    finally:
        sampler.done.set()
        reader.join(timeout=10)
    return LocustRun(proc.returncode, timed_out, time.monotonic() - start, sampler.result(),
                     warned.is_set())  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (Locust then writes its reports), SIGKILL for it and its children if that fails."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.kill()


# -- the server ---------------------------------------------------------------------------------
def fetch(url: str, timeout: float = 10.0) -> bytes:
    """GET `url`; LoadTestError if it is not reachable or not 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()[:300].decode("utf-8", "replace")
        raise LoadTestError(f"GET {url} answered {exc.code}: {body}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LoadTestError(f"cannot reach {url}: {exc}") from None


def grpc_ready(target: str, timeout_s: float = 10.0) -> None:
    """LoadTestError unless the gRPC port at `target` (HOST:PORT) answers ServerReady: ready."""
    import grpc

    from service.grpc import messages as pb

    with grpc.insecure_channel(target) as channel:
        ready = channel.unary_unary(
            pb.method_path("ServerReady"),
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString,
        )
        try:
            answer = ready(pb.ServerReadyRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise LoadTestError(
                f"no gRPC server at {target}: {exc.code().name} {exc.details()} (--grpc-url)"
            ) from None
    if not answer.ready:
        raise LoadTestError(f"the gRPC server at {target} is not ready")


def preflight(spec: LoadSpec) -> dict[str, str]:
    """Fail early, with the reason, if the server, a model or its inputs are not there, or the
    requests asked for cannot be built; where each model's inputs come from."""
    fetch(f"{spec.url}/v2/health/ready")
    if spec.protocol == GRPC:
        if not spec.grpc_url:
            raise LoadTestError("--protocol grpc needs the server's gRPC port (--grpc-url)")
        grpc_ready(spec.grpc_url)
    sources, metadata = {}, []
    for model in spec.models():
        metadata.append(json.loads(fetch(f"{spec.url}/v2/models/{model}")))
    try:
        shapes = parse_shapes(spec.shapes)
        unknown_shapes(shapes, metadata)
        for meta in metadata:
            traffic = traffic_for(meta, spec.repository, spec.inputs, shapes)
            traffic.can_send(spec.protocol, spec.rows)
            sources[traffic.name] = traffic.source
    except (OSError, ValueError) as exc:
        raise LoadTestError(str(exc)) from None
    return sources


@contextlib.contextmanager
def local_server(
    repository: Path, log: Path, args: list[str] | None = None, grpc: bool = False
) -> Iterator[tuple[str, str | None]]:
    """`onnxserve serve` on a free loopback port until ready; yields its URL and, with `grpc`,
    the HOST:PORT of its gRPC port (else None); stops it after."""
    port = free_port()
    grpc_port = next(p for p in iter(free_port, None) if p != port) if grpc else 0
    url = f"http://127.0.0.1:{port}"
    cmd = serve_command(repository, *(args or []), port=port, grpc_port=grpc_port)
    process = start(cmd, log)
    try:
        try:
            wait_ready(process, f"{url}/v2/health/ready", log, poll_s=0.3)
        except ServerNotReady as exc:
            raise LoadTestError(f"the local server did not start: {exc}") from None
        yield url, f"127.0.0.1:{grpc_port}" if grpc else None
    finally:
        stop(process)


# -- one run ------------------------------------------------------------------------------------
def warnings_for(run: LocustRun, total: dict[str, Any], timings_kept: int) -> list[str]:
    """What the reader must know before trusting the figures (empty when nothing)."""
    found = []
    if run.cpu_warning_logged:
        found.append(
            f"Locust logged 'CPU usage above {CPU_LIMIT:g}%': the load generator was CPU-bound, "
            "so the numbers understate the server; use --processes or more machines"
        )
    mean = run.cpu.get("mean_percent")
    if mean is not None and mean >= CPU_LIMIT:
        found.append(
            f"the Locust process averaged {mean:.0f}% of a core (>= {CPU_LIMIT:g}%): the load "
            "generator was CPU-bound, so the numbers understate the server"
        )
    if run.timed_out:
        found.append(f"Locust overran its run time by {GRACE_S:g} s and was stopped")
    elif run.returncode not in (0, None):
        found.append(f"Locust exited with code {run.returncode}; see locust.log")
    if total["failures"]:
        found.append(
            f"{total['failures']} of {total['requests']} requests failed "
            f"({100 * total['failure_ratio']:.2f}%); see 'errors' and locust_failures.csv"
        )
    if total["requests"] == 0:
        found.append("no requests were made; see locust.log")
    if timings_kept and total["requests"] > timings_kept * 1.01:
        found.append(
            f"server-timing figures come from a sample of {timings_kept} of "
            f"{total['requests']} requests"
        )
    return found


def run_once(spec: LoadSpec, out: Path, plots: bool = True) -> dict[str, Any]:
    """One Locust run against a live server; writes summary.json (+ plots) and returns it."""
    out.mkdir(parents=True, exist_ok=True)
    before = fetch(f"{spec.url}/metrics").decode()
    started = dt.datetime.now(dt.UTC)
    run = run_locust(spec, out)
    after = fetch(f"{spec.url}/metrics").decode()
    (out / "metrics_before.prom").write_text(before)
    (out / "metrics_after.prom").write_text(after)
    final, stats_csv = out / "locust_final.json", out / "locust_stats.csv"
    if final.is_file():
        stats = report.read_stats_json(final)
    elif stats_csv.is_file():  # killed before it could write its final figures
        stats = report.read_stats(stats_csv)
    else:
        tail = (out / "locust.log").read_text(errors="replace")[-3000:]
        raise LoadTestError(f"Locust wrote no statistics (exit code {run.returncode}):\n{tail}")
    history_csv = out / "locust_stats_history.csv"
    history = report.read_history(history_csv) if history_csv.is_file() else []
    timings = read_timings(out / "server_timing.csv")
    server = server_view(metric_delta(parse_metrics(before), parse_metrics(after)),
                         set(spec.models()))  # fmt: skip
    summary: dict[str, Any] = {
        "config": {**asdict(spec), "repository": str(spec.repository), "models": spec.models()},
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(run.wall_s, 2),
        "total": stats["total"],
        "endpoints": stats["endpoints"],
        "server": server,
        "server_timing": summarize(timings),
        "load_generator": {**run.cpu, "cpu_warning_logged": run.cpu_warning_logged,
                           "returncode": run.returncode, "timed_out": run.timed_out},
        "errors": report.read_failures(out / "locust_failures.csv"),
    }  # fmt: skip
    if spec.steps:
        scale = stats["total"]["requests"] / len(timings) if timings else 1.0
        summary["steps"] = report.step_table(timings, spec.steps, spec.step_s, max(scale, 1.0))
    summary["warnings"] = warnings_for(run, stats["total"], len(timings))
    if plots:
        title = f"{spec.model} / {spec.protocol} / {spec.rows} row(s) per request"
        if history:
            report.plot_timeline(history, out / "timeline.png", title)
        report.plot_batches(server["batch_histogram"], out / "batch_sizes.png",
                            server["mean_batch_size"])  # fmt: skip
        if summary["server_timing"]["total"]["client_p50_ms"] is not None:
            report.plot_latency_split(summary["server_timing"], out / "latency_split.png")
    summary["files"] = sorted({p.name for p in out.iterdir() if p.is_file()} | {"summary.json"})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
