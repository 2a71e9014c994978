"""wrk: install it, build its command line, run it pinned to CPUs, parse what post.lua prints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

LUA_SCRIPT = Path(__file__).resolve().parents[1] / "wrk" / "post.lua"
BENCH_JSON = "BENCH_JSON "


def ensure_wrk() -> None:
    """Install wrk with apt when it is missing and we are root; otherwise say how."""
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed: run `sudo apt-get install -y wrk`, then re-run")
    print("installing wrk: apt-get update && apt-get install -y wrk", flush=True)
    lock = ["-o", "DPkg::Lock::Timeout=300"]
    subprocess.run(["apt-get", *lock, "update"], check=True)
    subprocess.run(["apt-get", *lock, "install", "-y", "wrk"], check=True)


def wrk_command(
    url: str, manifest: Path, conns: int, seconds: int, cpus: str | None = None
) -> list[str]:
    """wrk with one thread and post.lua over `manifest` (pinned to `cpus` with taskset if given)."""
    pin = ["taskset", "-c", cpus] if cpus is not None else []
    return [
        *pin,
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(manifest),
    ]


def run_wrk(
    url: str, manifest: Path, conns: int, seconds: int, cpus: str, log: Path
) -> tuple[str, float, float]:
    """Run wrk (one thread) pinned to `cpus`: its output, wall seconds and CPU seconds."""
    return run_generator(wrk_command(url, manifest, conns, seconds, cpus), seconds, log)


def run_generator(cmd: list[str], seconds: float, log: Path) -> tuple[str, float, float]:
    """Run a load generator's command (killed 60 s past `seconds`): its output, wall seconds and
    CPU seconds (its own rusage)."""
    with log.open("wb") as sink:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        killer = threading.Timer(seconds + 60, process.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)  # wait4 gives the child's own rusage
        finally:
            killer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    return log.read_text(errors="replace"), wall, usage.ru_utime + usage.ru_stime


def parse_wrk_output(text: str) -> dict[str, Any]:
    """The JSON line that post.lua's done() prints, plus rps; ValueError if there is none."""
    for line in text.splitlines():
        if line.startswith(BENCH_JSON):
            raw = re.sub(r"-?\b(nan|inf)\b", "null", line[len(BENCH_JSON) :])
            doc = json.loads(raw)
            seconds = doc["duration_us"] / 1e6
            doc["duration_s"] = seconds
            doc["rps"] = doc["requests"] / seconds if seconds > 0 else 0.0
            errors = doc["errors"]
            doc["non2xx"] = errors["status"]
            doc["socket_errors"] = sum(errors[k] for k in ("connect", "read", "write", "timeout"))
            return doc
    raise ValueError(f"no {BENCH_JSON.strip()} line in wrk's output:\n{text[-2000:]}")
