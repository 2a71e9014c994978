"""The real HTTP server on the device under load: v2 binary requests of real samples, batching on
and off, with wrk when it is installed and loadtests.gpu.loadgen when it is not."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.bench.payloads import request_rows, write_requests
from loadtests.bench.wrk import parse_wrk_output, wrk_command
from loadtests.gpu.loadgen import run_load
from loadtests.gpu.parity import Model
from loadtests.payloads import V2_BINARY, Payload, make_payload
from loadtests.serverproc import free_port, serve_command, serving

DISTINCT = 16  # different real bodies cycled per cell


@dataclass(frozen=True)
class Cell:
    """One load: a model, rows per request, connections."""

    model: str
    rows: int
    connections: int

    @property
    def name(self) -> str:
        return f"{self.model} binary rows={self.rows} c={self.connections}"


CELLS = (
    Cell("cnn", 1, 1),
    Cell("cnn", 1, 64),
    Cell("cnn", 256, 8),
    Cell("lstm", 1, 64),
    Cell("autoencoder", 1, 64),
)


def requests_for(model: Model, rows: int, count: int = DISTINCT) -> list[Payload]:
    """`count` v2 binary infer requests of `rows` real samples each (all outputs binary)."""
    arrays = request_rows(model.inputs, rows, count)
    return [make_payload(model.name, V2_BINARY, {model.input_name: a}) for a in arrays]


def with_wrk(url: str, requests: list[Payload], connections: int, seconds: int) -> dict:
    """The same load through wrk and loadtests/wrk/post.lua (bodies in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-wrk-") as folder:
        manifest = write_requests(requests, Path(folder), "requests")
        cmd = wrk_command(url, manifest, connections, seconds)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
    doc = parse_wrk_output(out.stdout + out.stderr)
    latency = doc["latency_us"]
    return {
        "tool": "wrk",
        "connections": connections,
        "seconds": seconds,
        "requests": doc["requests"],
        "rps": doc["rps"],
        "non2xx": doc["non2xx"],
        "socket_errors": doc["socket_errors"],
        "latency_ms": {f"p{q}": latency.get(f"p{q}", 0) / 1000 for q in (50, 90, 99)},
    }


def load(url: str, requests: list[Payload], connections: int, seconds: int) -> dict:
    """Run one load with wrk if installed, else with the Python load generator."""
    if shutil.which("wrk"):
        return with_wrk(url, requests, connections, seconds)
    return run_load(url, requests, connections, seconds)


def serve_and_load(
    repository: Path,
    models: dict[str, Model],
    cells: tuple[Cell, ...],
    server_args: list[str],
    batching: bool,
    seconds: int,
    logs: Path,
) -> list[dict[str, Any]]:
    """Start the server (only the cells' models; its log under `logs`), run every cell, stop it."""
    cells = tuple(c for c in cells if c.model in models)
    names = ",".join(dict.fromkeys(c.model for c in cells))
    port = free_port()
    args = [*server_args, "--models", names, *([] if batching else ["--no-batching"])]
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"server-{'batching' if batching else 'no-batching'}.log"
    url = f"http://127.0.0.1:{port}"
    rows = []
    cmd = serve_command(repository, *args, port=port)
    with serving(cmd, log, f"{url}/v2/health/ready", timeout_s=600):
        for cell in cells:
            result = load(
                url, requests_for(models[cell.model], cell.rows), cell.connections, seconds
            )
            rows.append(
                {
                    **asdict(cell),
                    "cell": cell.name,
                    "batching": batching,
                    **result,
                    "rows_per_s": result["rps"] * cell.rows,
                }
            )
    return rows
