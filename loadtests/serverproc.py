"""A server under test as a subprocess: the command that starts it, start it (optionally pinned
with taskset), wait until a URL answers 200, stop it (terminate, then kill if it lingers).

    cmd = serve_command(repository, port=port)
    with serving(cmd, log, ready_url=f"http://127.0.0.1:{port}/v2/health/ready") as process:
        ...

Used by the benchmark, the Locust runner, the scoring benchmark and the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer in time; the message carries its log's tail."""


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(
    repository: Path,
    *args: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    grpc_port: int = 0,
) -> list[str]:
    """`onnxserve serve` on `repository` with this interpreter, plus `args` (without `port`,
    the caller adds `--port`). gRPC is off unless `grpc_port` names a port: servers started
    side by side must not all reach for Triton's default 8001."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--repository", str(repository)]
    cmd += ["--host", host, *([] if port is None else ["--port", str(port)])]
    return [*cmd, "--grpc-port", str(grpc_port), *args]


def answers_200(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of `url` answers 200 (False when unreachable or any other status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log_tail(log: Path, chars: int = 2000) -> str:
    """The last `chars` characters of a log ("" if there is none)."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def start(
    cmd: list[str],
    log: Path,
    *,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.Popen:
    """Start `cmd` (pinned to `cpus` with taskset if given), stdout and stderr into `log`.

    `env` is added to this process's environment."""
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        return subprocess.Popen(
            cmd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
            cwd=cwd,
        )


def wait_ready(
    process: subprocess.Popen,
    url: str,
    log: Path,
    *,
    timeout_s: float = 120.0,
    poll_s: float = 0.2,
) -> None:
    """Return once `url` answers 200; ServerNotReady if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not answers_200(url):
        if process.poll() is not None:
            raise ServerNotReady(
                f"server exited with {process.returncode}; see {log}:\n{log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ServerNotReady(
                f"server not ready after {timeout_s:g} s; see {log}:\n{log_tail(log)}"
            )
        time.sleep(poll_s)


def stop(process: subprocess.Popen, wait_s: float = 20.0) -> None:
    """Terminate the process; kill it if it has not exited after `wait_s` seconds."""
    process.terminate()
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serving(
    cmd: list[str],
    log: Path,
    ready_url: str,
    *,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 120.0,
    poll_s: float = 0.2,
    stop_wait_s: float = 20.0,
    cwd: Path = ROOT,
) -> Iterator[subprocess.Popen]:
    """Start `cmd` (in `cwd`), yield its process once `ready_url` answers 200, stop it
    afterwards."""
    process = start(cmd, log, cpus=cpus, env=env, cwd=cwd)
    try:
        wait_ready(process, ready_url, log, timeout_s=timeout_s, poll_s=poll_s)
        yield process
    finally:
        stop(process, stop_wait_s)
