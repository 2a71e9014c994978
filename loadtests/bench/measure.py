"""One load cell against a running server: preflight, warm-up, the load generator (wrk; for gRPC
cells loadtests.bench.grpcload), both processes' CPU and the server's mean batch size."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.bench.cells import NOISY_PCT, WRK_SATURATED_PCT, CellSpec
from loadtests.bench.cpu import cpu_times, foreign_cpu_pct, parse_cpu_list, process_ticks
from loadtests.bench.grpcload import grpc_command
from loadtests.bench.models import ModelInfo
from loadtests.bench.payloads import DISTINCT_BODIES, request_rows, write_requests
from loadtests.bench.wrk import parse_wrk_output, run_generator, run_wrk
from loadtests.payloads import GRPC, Payload, make_payload
from loadtests.prom import mean_batch_size
from loadtests.serverproc import free_port, serving


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
    grpc: str | None = None  # HOST:PORT of its gRPC port, if it has one


@contextlib.contextmanager
def start_server(
    cmd: list[str], cpus: str, log: Path, has_metrics: bool, grpc: bool = False
) -> Iterator[Server]:
    """Start `cmd` (which must take --port, and --grpc-port with `grpc`) pinned to `cpus`; yield
    once /v2/health/ready is 200."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*cmd, "--port", str(port)]
    target = None
    if grpc:
        grpc_port = next(p for p in iter(free_port, None) if p != port)
        cmd += ["--grpc-port", str(grpc_port)]
        target = f"127.0.0.1:{grpc_port}"
    with serving(cmd, log, f"{url}/v2/health/ready", cpus=cpus) as process:
        yield Server(url, process, log, has_metrics, target)


def check_payload(url: str, payload: Payload) -> str | None:
    """None if the server answers the request with 200 and a body; else what went wrong."""
    status, body = http(url + payload.path, payload.body, payload.headers)
    if status != 200:
        return f"preflight answered {status}: {body[:300]!r}"
    head = payload.headers.get("Inference-Header-Content-Length")
    if head is not None and b"binary_data_size" not in body:
        return "preflight: binary outputs were asked for but not returned"
    return None


def check_grpc_payload(target: str, payload: Payload) -> str | None:
    """None if the gRPC server answers the request OK with outputs; else what went wrong."""
    import grpc

    from service.grpc import messages as pb

    with grpc.insecure_channel(target) as channel:
        try:
            answer = channel.unary_unary(payload.path)(payload.body, timeout=10)
        except grpc.RpcError as exc:
            return f"preflight answered {exc.code().name}: {exc.details()}"
    if not pb.ModelInferResponse.FromString(answer).raw_output_contents:
        return "preflight: raw outputs were expected but not returned"
    return None


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
    folder = workdir / "payloads"
    manifest = folder / f"{stem}.tsv"
    arrays = request_rows(info.samples, spec.rows, DISTINCT_BODIES)
    payloads = [make_payload(spec.model, spec.protocol, {info.input: a}) for a in arrays]
    if not manifest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_requests(payloads, folder, stem)
    return manifest, payloads[0]


def _generate(
    spec: CellSpec, server: Server, manifest: Path, seconds: int, cpus: str, log: Path
) -> tuple[str, float, float]:
    """wrk, or for a gRPC cell the asyncio generator, pinned to `cpus`: output, wall, CPU s."""
    if spec.protocol == GRPC:
        assert server.grpc is not None, "a gRPC cell needs a server with a gRPC port"
        cmd = grpc_command(server.grpc, manifest, spec.conns, seconds, cpus)
        return run_generator(cmd, seconds, log)
    return run_wrk(server.url, manifest, spec.conns, seconds, cpus, log)


def run_cell(spec: CellSpec, server: Server, info: ModelInfo, opts: Options) -> dict[str, Any]:
    """Warm up, then measure one cell: the generator's figures, both processes' CPU, mean batch
    size."""
    cell: dict[str, Any] = {**asdict(spec), "label": spec.label, "error": None}
    manifest, first = write_manifest(spec, info, opts.out)
    cell["body_bytes"] = len(first.body)
    if spec.protocol == GRPC:
        problem = check_grpc_payload(server.grpc or "", first)
    else:
        problem = check_payload(server.url, first)
    if problem:
        cell["error"] = problem
        return cell
    logs = opts.out / "logs"
    slug = re.sub(r"[^a-z0-9]+", "-", spec.label.lower()).strip("-")
    _generate(spec, server, manifest, opts.warmup, opts.wrk_cpus, logs / f"{slug}.warm")
    before = http(server.url + "/metrics")[1].decode() if server.has_metrics else ""
    ticks0, cpus0 = process_ticks(server.process.pid), cpu_times()
    text, wall, wrk_cpu = _generate(
        spec, server, manifest, opts.seconds, opts.wrk_cpus, logs / f"{slug}.wrk"
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
