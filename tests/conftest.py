"""Shared fixtures: the built model repository, real server processes, held-out samples, and a
repository of models without a task or a config.json (`foreign_repository`, `foreign_server`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from loadtests import serverproc
from loadtests.serverproc import free_port, serve_command
from service.model_config import CONFIG_FILE, MODEL_FILE, SAMPLES_FILE, latest_version_dir

ROOT = Path(__file__).resolve().parents[1]
# Apps built in-process (create_app with its lifespan) would all reach for gRPC's default port
# 8001, which other test runs or a dev server on this machine may hold: off unless a test asks
# (run_server(..., grpc=True) passes --grpc-port, which wins over the environment).
os.environ.setdefault("ONNXSERVE_GRPC_PORT", "0")
REPOSITORY = Path(os.environ.get("ONNXSERVE_TEST_REPOSITORY", ROOT / "model_repository"))
MODELS = ("cnn", "lstm", "autoencoder")
#: Models of `foreign_repository`: ONNX files alone (no config.json, no task, no samples.npz).
FOREIGN = ("tensors", "tagged", "fixed")


@pytest.fixture(scope="session")
def repository() -> Path:
    """The real repository that `make test` builds; built here if a bare pytest run lacks it."""
    if not all((REPOSITORY / m / CONFIG_FILE).is_file() for m in MODELS):
        from export.build import build_repository

        build_repository(REPOSITORY)
    return REPOSITORY


def latest_version(repository: Path, model: str) -> Path:
    """The folder of a model's highest version."""
    return latest_version_dir(repository / model)


def samples(repository: Path, model: str) -> np.ndarray:
    """Real held-out inputs that the build stored beside the model."""
    with np.load(latest_version(repository, model) / SAMPLES_FILE) as data:
        return data["inputs"]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    grpc: str | None = None  # host:port of its gRPC port, when it was asked for one

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    repository: Path,
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    grpc: bool = False,
    cpus: str | None = None,
) -> Iterator[Server]:
    """`onnxserve serve` in a subprocess on a free loopback port, until ready; stopped after.
    gRPC is off unless `grpc` (then on a free port too: `Server.grpc`); `cpus`: pinned there
    with taskset."""
    port = free_port()
    grpc_port = next(p for p in iter(free_port, None) if p != port) if grpc else 0
    log = tmp / f"server-{port}.log"
    cmd = serve_command(repository, *args, port=port, grpc_port=grpc_port)
    process = serverproc.start(cmd, log, env=env, cpus=cpus)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    if grpc:
        server.grpc = f"127.0.0.1:{grpc_port}"
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
    """One real server over the real repository, shared by the end-to-end tests (gRPC too, at
    `server.grpc`)."""
    tmp = tmp_path_factory.mktemp("server")
    env = {"ONNXSERVE_MAX_BODY_BYTES": "2000000"}
    with run_server(repository, tmp, env=env, grpc=True) as s:
        yield s


def write_tensor_models(root: Path) -> Path:
    """Plain tensor models, each only `<name>/1/model.onnx` under `root`:

    - `tensors`: series FP32 [N,T,3] -> total [N], mean [N,3], doubled [N,T,3] (outputs of
      three ranks; T is a dynamic non-batch axis);
    - `tagged`: x FP32 [N,2] and tag BYTES [N,1] -> y = 2x [N,2], tag_copy BYTES [N,1];
    - `fixed`: no batch axis, x FP32 [2,3] -> y = relu(x) [2,3] (tests/foreign.py's).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tests.foreign import OPSET, fixed_shape

    def save(name: str, nodes: list, inputs: list, outputs: list, consts: list) -> None:
        graph = helper.make_graph(nodes, name, inputs, outputs, consts)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(root / name / "1" / MODEL_FILE))

    f32, axes = TensorProto.FLOAT, numpy_helper.from_array(np.array([1, 2], np.int64), "axes")
    save(
        "tensors",
        [
            helper.make_node("ReduceSum", ["series", "axes"], ["total"], keepdims=0),
            helper.make_node("ReduceMean", ["series"], ["mean"], axes=[1], keepdims=0),
            helper.make_node("Add", ["series", "series"], ["doubled"]),
        ],
        [helper.make_tensor_value_info("series", f32, ["batch", "time", 3])],
        [
            helper.make_tensor_value_info("total", f32, ["batch"]),
            helper.make_tensor_value_info("mean", f32, ["batch", 3]),
            helper.make_tensor_value_info("doubled", f32, ["batch", "time", 3]),
        ],
        [axes],
    )
    save(
        "tagged",
        [
            helper.make_node("Add", ["x", "x"], ["y"]),
            helper.make_node("Identity", ["tag"], ["tag_copy"]),
        ],
        [
            helper.make_tensor_value_info("x", f32, ["batch", 2]),
            helper.make_tensor_value_info("tag", TensorProto.STRING, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("y", f32, ["batch", 2]),
            helper.make_tensor_value_info("tag_copy", TensorProto.STRING, ["batch", 1]),
        ],
        [],
    )
    fixed_shape(root / "fixed" / "1" / MODEL_FILE)
    return root


@pytest.fixture(scope="session")
def foreign_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository of `FOREIGN` models: ONNX files alone, as users drop them in."""
    return write_tensor_models(tmp_path_factory.mktemp("foreign") / "repository")


@pytest.fixture(scope="session")
def foreign_server(
    foreign_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One real server over `foreign_repository`."""
    with run_server(foreign_repository, tmp_path_factory.mktemp("foreign-server")) as s:
        yield s


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for localhost and 127.0.0.1 (openssl): (cert, key)."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key
