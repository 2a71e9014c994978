"""The matrix of load cells: which servers, models, protocols, connection counts and rows."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("cnn", "lstm")
CONNECTIONS = (1, 16, 64)
PROTOCOLS = {"cnn": ("v2_json", "v2_binary", "v1"), "lstm": ("v2_json", "v2_binary")}
BIG_ROWS, BIG_CONNECTIONS = 32, (1, 16)  # the multi-row requests, against the batch-32 ceiling
WRK_SATURATED_PCT = 90.0
NOISY_PCT = 10.0  # other processes' share of the server's CPU above which a cell is marked noisy


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
