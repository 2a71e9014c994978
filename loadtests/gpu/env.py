"""The machine under the GPU check: its NVIDIA GPUs and driver (nvidia-smi), ONNX Runtime's build
and providers, NVIDIA's pip-wheel libraries, and GPU memory per process."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

GPU_FIELDS = ("index", "name", "driver_version", "memory.total")
#: Set once the check has re-executed itself with NVIDIA's wheel libraries on LD_LIBRARY_PATH.
REEXEC_FLAG = "ONNXSERVE_GPU_CHECK_LIBS"


@dataclass
class Gpus:
    """What nvidia-smi says: the GPUs, the driver and the highest CUDA it supports, or why not."""

    devices: list[dict[str, str]] = field(default_factory=list)
    driver_cuda: str | None = None
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_gpu_query(text: str) -> list[dict[str, str]]:
    """Rows of `nvidia-smi --query-gpu=<GPU_FIELDS> --format=csv,noheader`."""
    rows = []
    for line in text.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        if len(values) == len(GPU_FIELDS):
            rows.append(dict(zip(GPU_FIELDS, values, strict=True)))
    return rows


def parse_driver_cuda(text: str) -> str | None:
    """The "CUDA Version: 13.0" of nvidia-smi's banner (the highest CUDA the driver runs)."""
    found = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return found[1] if found else None


def _smi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60)


def find_gpus() -> Gpus:
    """The NVIDIA GPUs nvidia-smi lists, or the reason there are none to use."""
    try:
        query = _smi(f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader")
    except FileNotFoundError:
        return Gpus(problem="nvidia-smi not found: no NVIDIA driver on this machine")
    except subprocess.TimeoutExpired:
        return Gpus(problem="nvidia-smi did not answer within 60 s")
    said = (query.stdout + query.stderr).strip()
    if query.returncode != 0:
        first = said.splitlines()[0] if said else f"exit status {query.returncode}"
        return Gpus(problem=f"nvidia-smi failed: {first}")
    devices = parse_gpu_query(query.stdout)
    if not devices:
        return Gpus(problem=f"nvidia-smi lists no GPU: {said[:200]!r}")
    banner = _smi()
    return Gpus(devices=devices, driver_cuda=parse_driver_cuda(banner.stdout))


def cuda_too_old(driver_cuda: str | None, needed_major: int | None) -> str | None:
    """Why the driver cannot run the wheel's CUDA major, or None."""
    if driver_cuda is None or needed_major is None:
        return None
    if int(driver_cuda.split(".")[0]) < needed_major:
        return (
            f"the driver supports CUDA {driver_cuda}, onnxruntime-gpu needs CUDA {needed_major}: "
            "update the NVIDIA driver"
        )
    return None


def onnxruntime_build() -> dict[str, Any]:
    """The installed onnxruntime: distribution, version, CUDA it was built for, providers."""
    import onnxruntime

    dists = [
        d for d in ("onnxruntime-gpu", "onnxruntime") if _installed(d)
    ]  # both at once is itself a finding
    try:
        from onnxruntime.capi import build_and_package_info as info

        cuda = getattr(info, "cuda_version", None) or None
    except ImportError:
        cuda = None
    return {
        "distributions": dists,
        "version": onnxruntime.__version__,
        "cuda_version": cuda,
        "providers": list(onnxruntime.get_available_providers()),
        "python": platform.python_version(),
    }


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def nvidia_library_dirs() -> list[str]:
    """The `lib` folders of NVIDIA's pip wheels (CUDA, cuDNN) wherever Python finds `nvidia`."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[str] = []
    for root in spec.submodule_search_locations:
        found += sorted(glob.glob(os.path.join(root, "*", "lib")))
    return found


def library_path_with(dirs: list[str], current: str | None) -> str | None:
    """LD_LIBRARY_PATH with `dirs` in front, or None when all are there already."""
    have = [p for p in (current or "").split(os.pathsep) if p]
    missing = [d for d in dirs if d not in have]
    return os.pathsep.join([*missing, *have]) if missing else None


def gpu_memory_mib(pid: int) -> tuple[float | None, str]:
    """GPU memory this process holds (MiB) and how it was read: per process from nvidia-smi, or
    the GPUs' total in use when the process is not listed (another PID namespace)."""
    try:
        apps = _smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
        for line in apps.stdout.splitlines():
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
                return float(fields[1]), "process"
        total = _smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
        used = [float(v) for v in total.stdout.split() if v.replace(".", "", 1).isdigit()]
        return (sum(used) if used else None), "all GPUs"
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None, "nvidia-smi unavailable"
