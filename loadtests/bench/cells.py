"""The matrix of load cells: which servers, models, protocols, connection counts and rows."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.payloads import GRPC, PROTOCOLS, V1, V2_BINARY, V2_JSON
from loadtests.serverproc import serve_command

MODELS = ("cnn", "lstm")
CONNECTIONS = (1, 16, 64)
MODEL_PROTOCOLS = {"cnn": (V2_JSON, V2_BINARY, V1), "lstm": (V2_JSON, V2_BINARY)}
BIG_ROWS, BIG_CONNECTIONS = 32, (1, 16)  # the multi-row requests, against the batch-32 ceiling
#: Models measured over gRPC too (onnxserve, batching on; `conns` = concurrent calls on one
#: HTTP/2 channel, from loadtests.bench.grpcload), beside their REST cells.
GRPC_MODELS = ("cnn",)
WRK_SATURATED_PCT = 90.0
NOISY_PCT = 10.0  # other processes' share of the server's CPU above which a cell is marked noisy


@dataclass(frozen=True)
class CellSpec:
    """One load cell: which server, model, protocol, connections, rows per request."""

    server: str  # "baseline" or "onnxserve"
    model: str
    protocol: str  # one of loadtests.payloads.PROTOCOLS
    conns: int
    rows: int = 1
    batching: str = "n/a"  # "on" or "off" for onnxserve

    @property
    def label(self) -> str:
        """A readable name, e.g. `onnxserve[batching on] cnn v2-json rows=1 conns=64`."""
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
            cells.append(CellSpec("baseline", model, V2_JSON, conns))
            for protocol in MODEL_PROTOCOLS[model]:
                for batching in ("on", "off"):
                    cells.append(CellSpec("onnxserve", model, protocol, conns, 1, batching))
            if model in GRPC_MODELS:
                cells.append(CellSpec("onnxserve", model, GRPC, conns, 1, "on"))
    for conns in BIG_CONNECTIONS:
        cells.append(CellSpec("onnxserve", "cnn", V2_BINARY, conns, BIG_ROWS, "on"))
        cells.append(CellSpec("onnxserve", "cnn", GRPC, conns, BIG_ROWS, "on"))
    return cells


def display_order(cell: dict[str, Any]) -> tuple:
    """Sort key for the report: by server, model, protocol, rows, connections."""
    return (
        SERVERS.index((cell["server"], cell["batching"])),
        MODELS.index(cell["model"]),
        PROTOCOLS.index(cell["protocol"]),
        cell["rows"],
        cell["conns"],
    )


def server_command(server: str, batching: str, repository: Path, threads: int) -> list[str]:
    """The command that starts one server under test (the port is added on start)."""
    common = ["--models", ",".join(MODELS), "--threads", str(threads)]
    if server == "baseline":
        baseline = [sys.executable, "-m", "loadtests.baselines.fastapi_baseline"]
        return [*baseline, "--repository", str(repository), *common]
    return serve_command(repository, *common, *(["--no-batching"] if batching == "off" else []))


def median_rounds(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each cell's median round, from rounds of the whole plan (in plan order): the round whose
    requests/s is the median (the lower one of the middle two), with every round's requests/s in
    run order (`rps_rounds`). A cell that failed in any round is reported from its first failure."""
    cells = []
    for measured in zip(*rounds, strict=True):
        failed = [c for c in measured if c.get("error")]
        if failed:
            chosen = failed[0]
        else:
            chosen = sorted(measured, key=lambda c: c["rps"])[(len(measured) - 1) // 2]
        cells.append({**chosen, "rps_rounds": [c.get("rps") for c in measured]})
    return cells
