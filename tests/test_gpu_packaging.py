"""GPU packaging: the image's CUDA major matches the pinned onnxruntime-gpu wheel's, the wheel
comes with NVIDIA's libraries, and `make` never leaves both onnxruntime flavours installed."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import ROOT
from tests.test_compose import dockerfile

pytestmark = pytest.mark.unit
GPU_DOCKERFILE = ROOT / "docker" / "Dockerfile.gpu"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: The CUDA major of onnxruntime-gpu's default PyPI builds, from the release that switched.
PYPI_CUDA_MAJOR = ((Version("1.27"), 13), (Version("1.19"), 12))


def gpu_requirement() -> Requirement:
    extra = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    return next(Requirement(r) for r in extra if Requirement(r).name == "onnxruntime-gpu")


def lowest_allowed(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert floors, f"{requirement} has no lower bound: its CUDA major is not pinned"
    return max(floors)


def wheel_cuda_major(version: Version) -> int:
    return next(major for first, major in PYPI_CUDA_MAJOR if version >= first)


def dockerfile_cuda_major() -> int:
    """CUDA_MAJOR's default, checked against every nvidia/cuda image the file names."""
    text = GPU_DOCKERFILE.read_text()
    (major,) = re.findall(r"^ARG CUDA_MAJOR=(\d+)$", text, re.MULTILINE)
    for image in re.findall(r"nvidia/cuda:(\d+)\.", text):
        assert int(image) == int(major), f"an nvidia/cuda:{image} image beside CUDA_MAJOR={major}"
    return int(major)


def test_gpu_extra_pins_a_cuda_major_and_brings_the_nvidia_libraries():
    requirement = gpu_requirement()
    assert {"cuda", "cudnn"} <= requirement.extras
    floor = lowest_allowed(requirement)
    assert all(
        wheel_cuda_major(v) == wheel_cuda_major(floor)
        for v in (floor, Version("1.31.1"))
        if requirement.specifier.contains(v)
    )
    assert not requirement.specifier.contains("2.0"), "a new major may change the CUDA major"


def test_dockerfile_cuda_major_matches_the_pinned_wheel():
    assert dockerfile_cuda_major() == wheel_cuda_major(lowest_allowed(gpu_requirement()))


def test_gpu_image_installs_the_gpu_extra_and_states_the_driver_requirement():
    runtime = next(s for s in dockerfile(GPU_DOCKERFILE) if s.name == "runtime")
    assert not runtime.base.startswith("nvidia/")  # the CUDA libraries come as wheels
    runs = " ".join(arg for k, arg in runtime.instructions if k == "RUN")
    assert "[gpu]" in runs and "[cpu]" not in runs
    env = " ".join(arg for k, arg in runtime.instructions if k == "ENV")
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=${CUDA_MAJOR}.0"' in env
    assert ("ARG", "CUDA_MAJOR") in runtime.instructions  # the global default reaches the stage
    docs = (ROOT / "docs" / "gpu.md").read_text()
    assert f"CUDA {dockerfile_cuda_major()}" in docs and "R580" in docs


def installed_gpu_wheel() -> Path | None:
    """The onnxruntime-gpu dist-info of the fallback tier's venv, if it was built."""
    found = sorted((ROOT / ".venv-gpu").glob("lib/python*/site-packages/onnxruntime_gpu-*"))
    return found[-1] if found else None


def test_the_installed_wheel_is_built_for_the_dockerfile_cuda_major():
    info = installed_gpu_wheel()
    if info is None:
        pytest.skip("no .venv-gpu: `make gpu-fallback-test` builds it")
    metadata = (info / "METADATA").read_text()
    runtime = re.search(
        r"Requires-Dist: nvidia-cuda-runtime\S*~=(\d+)\.\d+; extra == .cuda.", metadata
    )
    assert runtime, "the wheel's cuda extra no longer names nvidia-cuda-runtime"
    assert re.search(r"Requires-Dist: nvidia-cudnn-cu(\d+)", metadata)[1] == runtime[1]
    built = (info.parent / "onnxruntime" / "capi" / "build_and_package_info.py").read_text()
    assert re.search(r"cuda_version = '(\d+)\.", built)[1] == runtime[1]
    assert int(runtime[1]) == dockerfile_cuda_major()
    version = Version(re.search(r"^Version: (\S+)$", metadata, re.MULTILINE)[1])
    assert gpu_requirement().specifier.contains(version)


def make_dry_run(*args: str) -> list[str]:
    """The commands `make -n -B` would run for a target (nothing runs)."""
    out = subprocess.run(
        ["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.parametrize(
    ("flags", "target", "removed", "extra"),
    [
        ([], ".venv/bin/.installed-cpu", "onnxruntime-gpu", "cpu"),
        (["GPU=1"], ".venv/bin/.installed-gpu", "onnxruntime", "gpu"),
    ],
)
def test_make_removes_the_other_onnxruntime_before_installing(flags, target, removed, extra):
    lines = make_dry_run(*flags, target)
    uninstall = next(i for i, c in enumerate(lines) if f"pip uninstall -q -y {removed}" in c)
    install = next(i for i, c in enumerate(lines) if "pip install" in c and f".[{extra}," in c)
    assert uninstall < install


def test_fallback_venv_gets_the_bare_wheel_without_cuda_libraries():
    (install,) = [c for c in make_dry_run(".venv-gpu/.installed") if "pip install" in c]
    wanted = install.split("-e . ")[1].strip('"')
    requirement = Requirement(wanted)
    assert requirement.name == "onnxruntime-gpu" and not requirement.extras
    assert requirement.specifier == gpu_requirement().specifier
