"""The fallback tier: the real server on the real onnxruntime-gpu wheel *without* its CUDA
libraries (`make gpu-fallback-test` builds `.venv-gpu` and runs this file), the situation of
every misconfigured GPU host.

- default providers: served on the CPU, with the true reason (the library that does not load,
  as ONNX Runtime's own log names it) in the model metadata, the server log and the metrics;
- `--require-gpu`: live, but `/v2/health/ready` answers 503 naming the missing library;
- `--providers CPUExecutionProvider`: no GPU noise at all;
- tests/test_runtime.py's stand-in answers as this wheel does; the GPU check refuses naming the
  library.

Without `.venv-gpu` the module is skipped (and says how to run it); with `ONNXSERVE_GPU_PYTHON`
set, as the make target does, a missing interpreter fails instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtests import serverproc
from loadtests.serverproc import free_port, serve_command
from service.model_config import MODEL_FILE, latest_version_dir
from tests.conftest import ROOT, Server, samples

GPU_PYTHON = Path(os.environ.get("ONNXSERVE_GPU_PYTHON") or ROOT / ".venv-gpu" / "bin" / "python")
if not GPU_PYTHON.is_file():
    if os.environ.get("ONNXSERVE_GPU_PYTHON"):
        raise FileNotFoundError(f"ONNXSERVE_GPU_PYTHON={GPU_PYTHON} does not exist")
    pytest.skip(
        "no .venv-gpu (the real onnxruntime-gpu wheel): run `make gpu-fallback-test`",
        allow_module_level=True,
    )

pytestmark = pytest.mark.e2e
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
#: ONNX Runtime's own log line when the CUDA provider's library does not load.
ORT_SAYS = re.compile(
    r"Failed to load library \S*libonnxruntime_providers_cuda\.so with error: (.+)"
)
GPU_NOISE = ("CUDA", "cublas", "cudnn", "TensorRT", "EP Error", "Failed to load", "preload_dlls")


def start(repository: Path, tmp: Path, *args: str) -> tuple[Server, subprocess.Popen]:
    """`onnxserve serve --models cnn` on the GPU venv's interpreter, once it answers live."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    cmd = [str(GPU_PYTHON), *serve_command(repository, "--models", "cnn", *args, port=port)[1:]]
    process = serverproc.start(cmd, log)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        serverproc.wait_ready(process, f"{server.url}/v2/health/live", log, timeout_s=90)
    except serverproc.ServerNotReady as exc:
        serverproc.stop(process)
        pytest.fail(str(exc))
    return server, process


def loaded(server: Server, timeout_s: float = 60) -> httpx.Response:
    """/v2/health/ready once the model is no longer loading (200, or 503 for another reason)."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = httpx.get(f"{server.url}/v2/health/ready")
        if answer.status_code == 200 or "LOADING" not in answer.text:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"cnn still loading after {timeout_s} s:\n{server.output()[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def default_server(repository: Path, tmp_path_factory) -> Iterator[Server]:
    server, process = start(repository, tmp_path_factory.mktemp("gpu-default"))
    try:
        assert loaded(server).status_code == 200, server.output()[-2000:]
        yield server
    finally:
        serverproc.stop(process)


def missing_library(log: str) -> str:
    """What ONNX Runtime itself logged about the CUDA provider's library."""
    found = ORT_SAYS.search(log)
    assert found, f"onnxruntime did not log a failed provider library:\n{log[-3000:]}"
    return found[1].strip()


def test_the_venv_holds_the_real_gpu_wheel_without_cuda_libraries():
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, onnxruntime as o;"
        "names = {d.metadata['Name'].lower() for d in m.distributions()};"
        "print(json.dumps({'providers': o.get_available_providers(),"
        " 'gpu': 'onnxruntime-gpu' in names, 'cpu': 'onnxruntime' in names,"
        " 'nvidia': u.find_spec('nvidia') is not None}))"
    )
    out = subprocess.run([str(GPU_PYTHON), "-c", probe], capture_output=True, text=True, timeout=60)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"providers": found["providers"], "gpu": True, "cpu": False, "nvidia": False}
    assert CUDA in found["providers"]


def test_default_providers_serve_on_cpu_with_the_true_reason(default_server, repository):
    why = missing_library(default_server.output())
    assert re.search(r"libcu\w+\.so\.13: cannot open shared object file", why), why
    meta = httpx.get(f"{default_server.url}/v2/models/cnn").json()
    params = meta["parameters"]
    assert params["provider"] == CPU
    assert params["fallback_reason"] == f"{CUDA}: {why}"
    assert f"runs on {CPU}: {CUDA}: {why}" in default_server.output()
    image = samples(repository, "cnn")[:2].astype(np.float32)
    body = {"inputs": [{"name": "image", "shape": list(image.shape), "datatype": "FP32",
                        "data": image.ravel().tolist()}]}  # fmt: skip
    answer = httpx.post(f"{default_server.url}/v2/models/cnn/infer", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["parameters"]["provider"] == CPU


def test_the_provider_metric_carries_the_reason(default_server):
    why = missing_library(default_server.output())
    text = httpx.get(f"{default_server.url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("onnxserve_model_provider{")]
    assert lines and all(f'provider="{CPU}"' in line for line in lines), lines
    assert any(why in line for line in lines), lines


def test_require_gpu_is_unready_naming_the_missing_library(repository, tmp_path):
    server, process = start(repository, tmp_path, "--require-gpu")
    try:
        answer = loaded(server)
        assert answer.status_code == 503
        why = missing_library(server.output())
        assert why in answer.json()["error"] and "require_gpu" in answer.json()["error"]
        model = httpx.get(f"{server.url}/v2/models/cnn/ready")
        assert model.status_code != 200
    finally:
        serverproc.stop(process)


def test_cpu_provider_alone_makes_no_gpu_noise(repository, tmp_path):
    server, process = start(repository, tmp_path, "--providers", CPU)
    try:
        assert loaded(server).status_code == 200
        params = httpx.get(f"{server.url}/v2/models/cnn").json()["parameters"]
        assert params["provider"] == CPU and "fallback_reason" not in params
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        serverproc.stop(process)
    log = server.output()
    assert not [word for word in GPU_NOISE if word in log], log[-3000:]
    assert not [word for word in ("cublas", "cudnn", "EP Error") if word in metrics]


def test_the_gpu_check_refuses_naming_the_missing_library(repository, tmp_path):
    """On a GPU machine (a stand-in nvidia-smi) whose CUDA libraries are missing, the check
    stops before measuring and says which library."""
    from tests.test_gpu_check import check, fake_smi

    done, doc, text = check(tmp_path, "--repository", str(repository), "--models", "cnn",
                            path=fake_smi(tmp_path / "bin"), python=str(GPU_PYTHON))  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert doc["onnxruntime"]["distributions"] == ["onnxruntime-gpu"]
    assert doc["onnxruntime"]["cuda_version"].startswith("13.")
    assert "require_gpu is set" in doc["no_gpu"] and "libcublasLt.so.13" in doc["no_gpu"]
    assert "No usable GPU" in text and "parity" not in doc


STAND_IN_CASES = (
    (["TensorrtExecutionProvider", CUDA, CPU], 1),
    (["TensorrtExecutionProvider", CUDA, CPU], 0),
    ([CUDA, CPU], 1),
    ([CUDA, CPU], 0),
    ([CUDA], 0),
)
BEHAVIOUR = """
import json, sys, onnxruntime as ort
ort.set_default_logger_severity(4)
out = []
for providers, fallback in json.loads(sys.argv[2]):
    try:
        s = ort.InferenceSession(sys.argv[1], providers=providers, enable_fallback=fallback)
        out.append(["ok", s.get_providers()])
    except Exception as exc:
        out.append(["raised", str(exc).strip()[-120:]])
print(json.dumps(out))
"""


def test_the_runtime_tests_stand_in_behaves_as_this_wheel(repository, tmp_path):
    """tests/test_runtime.py's StandIn, configured as a machine without TensorRT or CUDA
    libraries, against the real wheel on the same calls."""
    from tests.test_runtime import TRT_MISSING, StandIn

    model = latest_version_dir(repository / "cnn") / MODEL_FILE
    cases = [[p, f] for p, f in STAND_IN_CASES]
    real = subprocess.run(
        [str(GPU_PYTHON), "-c", BEHAVIOUR, str(model), json.dumps(cases)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    observed = json.loads(real.stdout.strip().splitlines()[-1])
    fake = StandIn(tmp_path, ["TensorrtExecutionProvider", CUDA, CPU],
                   raising={"TensorrtExecutionProvider": TRT_MISSING}, dropped={CUDA})  # fmt: skip
    for (providers, fallback), (outcome, detail) in zip(cases, observed, strict=True):
        try:
            session = fake.InferenceSession(model, providers=providers, enable_fallback=fallback)
            assert (outcome, detail) == ("ok", session.get_providers()), (providers, fallback)
        except RuntimeError as exc:
            assert outcome == "raised" and detail in str(exc), (providers, fallback, detail)
