"""Shared fixtures: the built model repository, real server processes, held-out samples."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from loadtests import serverproc
from loadtests.serverproc import free_port

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = Path(os.environ.get("ONNXSERVE_TEST_REPOSITORY", ROOT / "model_repository"))
MODELS = ("cnn", "lstm", "autoencoder")


@pytest.fixture(scope="session")
def repository() -> Path:
    """The real repository that `make test` builds; built here if a bare pytest run lacks it."""
    if not all((REPOSITORY / m / "config.json").is_file() for m in MODELS):
        from export.build import build_repository

        build_repository(REPOSITORY)
    return REPOSITORY


def latest_version(repository: Path, model: str) -> Path:
    versions = [int(p.name) for p in (repository / model).iterdir() if p.name.isdigit()]
    return repository / model / str(max(versions))


def samples(repository: Path, model: str) -> np.ndarray:
    """Real held-out inputs that the build stored beside the model."""
    with np.load(latest_version(repository, model) / "samples.npz") as data:
        return data["inputs"]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    repository: Path, tmp: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`onnxserve serve` in a subprocess on a free loopback port, until ready; stopped after."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    process = serverproc.start(
        [sys.executable, "-m", "service.cli", "serve", "--repository", str(repository),
         "--host", "127.0.0.1", "--port", str(port), *args],
        log, env=env,
    )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        try:
            serverproc.wait_ready(process, f"{server.url}/v2/health/ready", log, timeout_s=90)
        except serverproc.ServerNotReady as exc:
            pytest.fail(str(exc))
        yield server
    finally:
        serverproc.stop(process)


@pytest.fixture(scope="session")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real server over the real repository, shared by the end-to-end tests."""
    tmp = tmp_path_factory.mktemp("server")
    with run_server(repository, tmp, env={"ONNXSERVE_MAX_BODY_BYTES": "2000000"}) as s:
        yield s
