"""The machine a run was measured on: CPU, cores, OS, versions, load average."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, OS and the versions that matter."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        first = (wrk.stdout or wrk.stderr).splitlines()
    except OSError:  # wrk is not installed
        first = []
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "wrk": first[0] if first else None,
        "packages": {
            d: _version(d)
            for d in (
                "onnxruntime",
                "numpy",
                "orjson",
                "fastapi",
                "starlette",
                "uvicorn",
                "httptools",
                "uvloop",
            )
        },
    }


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]
