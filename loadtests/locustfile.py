"""Locust users for onnxserve: one per demo model, one for any served model, and a weighted mix.

    locust -f loadtests/locustfile.py -H http://127.0.0.1:8000            # web UI on :8089
    locust -f loadtests/locustfile.py -H URL --headless -u 8 -t 30s --model cnn --protocol v2-binary
    locust -f loadtests/locustfile.py -H URL --headless -u 8 -t 30s --model mymodel \
        --shape "tokens:16"                                    # a model of yours, random inputs

Options (each also an env var; shown in the web UI): `--model` cnn|lstm|autoencoder|mixed or any
served model's name (LOADTEST_MODEL; picks the user class unless classes are named on the
command line: ModelUser for a model that is not one of ours, GrpcUser for `--protocol grpc`),
`--protocol` v2-json|v2-binary|v1|grpc|mixed (LOADTEST_PROTOCOL; mixed draws from the HTTP
ones), `--grpc-host` HOST:PORT of the gRPC port (LOADTEST_GRPC_HOST; default: --host's host and
Triton's 8001), `--rows` per request (LOADTEST_ROWS), `--mix`
weights for MixedUser (LOADTEST_MIX, "cnn:6,autoencoder:3,lstm:1"), `--repository` holding the
held-out samples (LOADTEST_REPOSITORY), `--inputs` auto|samples|random (LOADTEST_INPUTS: auto
takes samples.npz when the repository has it, else random data from the metadata), `--shape`
sizes of dynamic axes for random inputs, `NAME:D1,D2;NAME2:...` without the batch axis
(LOADTEST_SHAPE), `--timings-file` CSV of per-request client latency beside the Server-Timing
header (LOADTEST_TIMINGS_FILE).
A step-load shape runs when LOADTEST_STEPS="1,8,32" is set (LOADTEST_STEP_DURATION seconds each).

Worker-safe: every process loads its own payloads lazily; workers send their timing rows to the
master in their regular reports, and only the master (or a local runner) writes the file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import orjson
from gevent.lock import Semaphore
from locust import FastHttpUser, LoadTestShape, User, constant, events, task
from locust.exception import StopUser
from locust.runners import WorkerRunner

if importlib.util.find_spec("loadtests") is None:  # a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.payloads import (
    GRPC,
    GRPC_OK,
    HEADER_LENGTH,
    INPUT_SOURCES,
    PROTOCOLS,
    V2_JSON,
    ModelTraffic,
    grpc_target,
    parse_mix,
    parse_server_timing,
    parse_shapes,
    traffic_for,
)
from loadtests.timing import TimingLog
from service.grpc.messages import method_path

log = logging.getLogger("loadtests")
MODELS = ("cnn", "lstm", "autoencoder")
DEFAULT_MIX = "cnn:6,autoencoder:3,lstm:1"

# Per-process state: payloads per (host, model), built once; timing rows not yet reported.
_traffic: dict[tuple[str, str], ModelTraffic] = {}
_traffic_lock = Semaphore()
_timings = TimingLog()
_rng = np.random.default_rng()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    env = os.environ.get
    parser.add_argument(
        "--model", default=env("LOADTEST_MODEL", "mixed"), include_in_web_ui=False,
        help="cnn, lstm, autoencoder, mixed, or any served model (env LOADTEST_MODEL)",
    )  # fmt: skip
    parser.add_argument(
        "--protocol", choices=[*PROTOCOLS, "mixed"], default=env("LOADTEST_PROTOCOL", V2_JSON),
        help="v2-json, v2-binary, v1, grpc or mixed (HTTP ones) (env LOADTEST_PROTOCOL)",
    )  # fmt: skip
    parser.add_argument(
        "--grpc-host", default=env("LOADTEST_GRPC_HOST", ""),
        help="HOST:PORT of the gRPC port for --protocol grpc (default: --host's host, port "
        "8001) (env LOADTEST_GRPC_HOST)",
    )  # fmt: skip
    parser.add_argument(
        "--rows", type=int, default=int(env("LOADTEST_ROWS", "1")),
        help="rows (samples) per request (env LOADTEST_ROWS)",
    )  # fmt: skip
    parser.add_argument(
        "--mix", default=env("LOADTEST_MIX", DEFAULT_MIX),
        help="MixedUser's model weights, e.g. cnn:6,autoencoder:3,lstm:1 (env LOADTEST_MIX)",
    )  # fmt: skip
    parser.add_argument(
        "--repository", default=env("LOADTEST_REPOSITORY", "model_repository"),
        help="model repository holding samples.npz per model (env LOADTEST_REPOSITORY)",
    )  # fmt: skip
    parser.add_argument(
        "--inputs", choices=INPUT_SOURCES, default=env("LOADTEST_INPUTS", "auto"),
        help="samples.npz, random data from the metadata, or auto (env LOADTEST_INPUTS)",
    )  # fmt: skip
    parser.add_argument(
        "--shape", default=env("LOADTEST_SHAPE", ""),
        help="dynamic axes of random inputs, NAME:D1,D2;... without the batch axis",
    )  # fmt: skip
    parser.add_argument(
        "--timings-file", default=env("LOADTEST_TIMINGS_FILE", ""), include_in_web_ui=False,
        help="CSV of per-request client latency and Server-Timing (env LOADTEST_TIMINGS_FILE)",
    )  # fmt: skip


@events.init.add_listener
def _select_user_class(environment: Any, **_: Any) -> None:
    """`--model` picks the user class when none is named on the command line (not on workers:
    they spawn whatever class the master sends)."""
    options = environment.parsed_options
    if options is None or isinstance(environment.runner, WorkerRunner) or options.user_classes:
        return
    wanted = {"cnn": CnnUser, "lstm": LstmUser, "autoencoder": AutoencoderUser, "mixed": MixedUser}
    chosen = GrpcUser if options.protocol == GRPC else wanted.get(options.model, ModelUser)
    if chosen in environment.user_classes:
        environment.user_classes[:] = [chosen]


def _fetch_metadata(host: str, model: str) -> dict[str, Any]:
    url = f"{host.rstrip('/')}/v2/models/{model}"
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return orjson.loads(answer.read())
    except (urllib.error.URLError, OSError, orjson.JSONDecodeError) as exc:
        raise RuntimeError(f"cannot read the metadata of '{model}' from {url}: {exc}") from exc


def traffic(host: str, model: str, options: Any) -> ModelTraffic:
    """The model's metadata (from the server) and its inputs (samples from the repository, or
    random), once a process."""
    key = (host, model)
    with _traffic_lock:
        if key not in _traffic:
            metadata = _fetch_metadata(host, model)
            _traffic[key] = traffic_for(
                metadata,
                Path(getattr(options, "repository", "model_repository")),
                getattr(options, "inputs", "auto"),
                parse_shapes(getattr(options, "shape", "")),
            )
            log.info("%s inputs: %s", model, _traffic[key].source)
        return _traffic[key]


@events.request.add_listener
def _record(name: str, response_time: float, exception: Any, response: Any = None, **kw: Any):
    """One timing row per request: client latency and the server's queue/compute/total."""
    headers = getattr(response, "headers", None) or {}
    server = parse_server_timing(headers.get("server-timing") or headers.get("Server-Timing"))
    nan = float("nan")
    start = round(kw.get("start_time") or 0.0, 4)
    _timings.add((
        start, name, int(exception is None), round(response_time, 3),
        server.get("queue", nan), server.get("compute", nan), server.get("total", nan),
    ))  # fmt: skip


@events.report_to_master.add_listener
def _ship_timings(data: dict[str, Any], **_: Any) -> None:
    data["server_timing_rows"] = [list(r) for r in _timings.drain()]


@events.worker_report.add_listener
def _collect_timings(data: dict[str, Any], **_: Any) -> None:
    _timings.extend(data.get("server_timing_rows") or [])


@events.test_start.add_listener
def _reset_timings(environment: Any, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        _timings.clear()


def _write_timings(environment: Any, **_: Any) -> None:
    path = getattr(environment.parsed_options, "timings_file", "")
    if path and not isinstance(environment.runner, WorkerRunner):
        _timings.write(Path(path))
        kept, seen = len(_timings.rows), _timings.seen
        log.info("wrote %d timing rows (of %d requests) to %s", kept, seen, path)


events.test_stop.add_listener(_write_timings)
events.quitting.add_listener(_write_timings)  # again, after the workers' final reports


class _InferenceUser(FastHttpUser):
    """Sends one model's requests as fast as its answers come back (closed loop, no think time)."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 30.0
    connection_timeout = 10.0
    models: tuple[str, ...] = ()

    def setup(self) -> None:
        """Read the options and load each model's traffic (ValueError etc. if impossible)."""
        options = self.environment.parsed_options
        self.protocol = getattr(options, "protocol", V2_JSON)
        self.rows = int(getattr(options, "rows", 1))
        if self.rows < 1:
            raise ValueError(f"--rows must be at least 1, got {self.rows}")
        self.traffic = {m: traffic(self.host, m, options) for m in self.models}
        for model_traffic in self.traffic.values():  # refused here, before any request
            model_traffic.can_send(self.protocol, self.rows)

    def on_start(self) -> None:
        try:
            self.setup()
        except (RuntimeError, OSError, ValueError) as exc:
            log.error("cannot load test %s: %s", ",".join(self.models), exc)
            self.environment.events.request.fire(
                request_type="SETUP", name=f"{','.join(self.models)} setup", response_time=0,
                response_length=0, exception=exc, context={},
            )  # fmt: skip
            runner, options = self.environment.runner, self.environment.parsed_options
            if getattr(options, "headless", False) and not isinstance(runner, WorkerRunner):
                gevent.spawn(runner.quit)  # nothing to measure: end a headless run at once
            raise StopUser() from exc

    def infer(self, model: str) -> None:
        """Send one request to `model` with rows drawn from its inputs and check the answer."""
        model_traffic = self.traffic[model]
        protocol = self.protocol
        if protocol == "mixed":
            protocol = random.choice(model_traffic.protocols)
        payload = random.choice(model_traffic.pool(protocol, self.rows, _rng))
        with self.client.post(
            payload.path, data=payload.body, headers=payload.headers,
            name=f"{model} {protocol}", catch_response=True,
        ) as response:  # fmt: skip
            problem = model_traffic.check(
                protocol, payload.rows, response.status_code, response.content,
                response.headers.get(HEADER_LENGTH),
            )  # fmt: skip
            if problem:
                response.failure(problem)
            else:
                response.success()


class CnnUser(_InferenceUser):
    """Digit classification (`cnn`)."""

    models = ("cnn",)

    @task
    def classify(self) -> None:
        self.infer("cnn")


class AutoencoderUser(_InferenceUser):
    """Anomaly scoring of digits (`autoencoder`)."""

    models = ("autoencoder",)

    @task
    def score(self) -> None:
        self.infer("autoencoder")


class LstmUser(_InferenceUser):
    """CO2 forecasts from weekly windows (`lstm`)."""

    models = ("lstm",)

    @task
    def forecast(self) -> None:
        self.infer("lstm")


class ModelUser(_InferenceUser):
    """Any served model, named by `--model`; inputs from its samples.npz, else random."""

    def setup(self) -> None:
        self.models = (str(getattr(self.environment.parsed_options, "model", "")),)
        super().setup()

    @task
    def infer_model(self) -> None:
        self.infer(self.models[0])


class MixedUser(_InferenceUser):
    """Several models (by default our three), each request's model drawn by the `--mix` weights."""

    models = MODELS

    def setup(self) -> None:
        mix = parse_mix(getattr(self.environment.parsed_options, "mix", DEFAULT_MIX))
        self.models = tuple(mix)
        self.weights = list(mix.values())
        super().setup()

    @task
    def mixed(self) -> None:
        self.infer(random.choices(self.models, self.weights)[0])


class _GrpcAnswer:
    """What the timing listener reads of an answer: its Server-Timing, from the trailers."""

    def __init__(self, trailing: Any) -> None:
        self.headers = {k: v for k, v in trailing or () if k == "server-timing"}


class GrpcFailure(Exception):
    """A wrong or failed gRPC answer (what `ModelTraffic.check` found)."""


_GEVENT_READY = False


class GrpcUser(User):
    """Served models over gRPC (`--protocol grpc`): pre-serialized ModelInfer requests on one
    channel per user; `--model` names one model, or `mixed` draws by the `--mix` weights. The
    models' metadata comes from --host (HTTP), as for the other users."""

    wait_time = constant(0)

    def setup(self) -> None:
        global _GEVENT_READY
        import grpc

        if not _GEVENT_READY:  # gRPC's blocking calls yield to other users' greenlets
            import grpc.experimental.gevent as grpc_gevent

            grpc_gevent.init_gevent()
            _GEVENT_READY = True
        options = self.environment.parsed_options
        model = str(getattr(options, "model", "cnn"))
        mix = parse_mix(getattr(options, "mix", DEFAULT_MIX)) if model == "mixed" else {model: 1}
        self.models, self.weights = tuple(mix), list(mix.values())
        self.rows = int(getattr(options, "rows", 1))
        if self.rows < 1:
            raise ValueError(f"--rows must be at least 1, got {self.rows}")
        self.traffic = {m: traffic(self.host, m, options) for m in self.models}
        for model_traffic in self.traffic.values():
            model_traffic.can_send(GRPC, self.rows)
        target = grpc_target(self.host, getattr(options, "grpc_host", ""))
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(target, options=unlimited)
        self.call = self.channel.unary_unary(method_path("ModelInfer"))
        self.rpc_error = grpc.RpcError

    def on_start(self) -> None:
        try:
            self.setup()
        except (RuntimeError, OSError, ValueError) as exc:
            model = getattr(self.environment.parsed_options, "model", "?")
            log.error("cannot load test %s over gRPC: %s", model, exc)
            self.environment.events.request.fire(
                request_type="SETUP", name="grpc setup", response_time=0, response_length=0,
                exception=exc, context={},
            )  # fmt: skip
            runner, options = self.environment.runner, self.environment.parsed_options
            if getattr(options, "headless", False) and not isinstance(runner, WorkerRunner):
                gevent.spawn(runner.quit)
            raise StopUser() from exc

    def on_stop(self) -> None:
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()

    @task
    def infer(self) -> None:
        """One ModelInfer call with rows drawn from the model's inputs; the answer checked."""
        model = random.choices(self.models, self.weights)[0]
        model_traffic = self.traffic[model]
        payload = random.choice(model_traffic.pool(GRPC, self.rows, _rng))
        start_time, start = time.time(), time.perf_counter()
        trailing: Any = ()
        try:
            content, call = self.call.with_call(payload.body, timeout=30.0)
            status, trailing = GRPC_OK, call.trailing_metadata()
        except self.rpc_error as exc:
            status, content = exc.code().value[0], (exc.details() or "").encode()
        elapsed_ms = (time.perf_counter() - start) * 1000
        problem = model_traffic.check(GRPC, payload.rows, status, content)
        self.environment.events.request.fire(
            request_type="gRPC", name=f"{model} grpc", response_time=elapsed_ms,
            response_length=len(content), exception=GrpcFailure(problem) if problem else None,
            context={}, response=_GrpcAnswer(trailing), start_time=start_time,
        )  # fmt: skip


def _steps() -> list[int]:
    return [int(s) for s in os.environ.get("LOADTEST_STEPS", "").split(",") if s.strip()]


class StepLoadShape(LoadTestShape):
    """Hold each user count of LOADTEST_STEPS for LOADTEST_STEP_DURATION seconds, then stop.

    Active only when LOADTEST_STEPS is set (otherwise `-u/-r/-t` drive the run).
    """

    abstract = not _steps()

    def __init__(self) -> None:
        super().__init__()
        self.steps = _steps()
        self.step_s = float(os.environ.get("LOADTEST_STEP_DURATION", "10"))

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // self.step_s)
        if step >= len(self.steps):
            return None
        users = self.steps[step]
        return users, float(max(users, 1))  # reach each step within about a second
