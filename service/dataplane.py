"""decode -> validate -> batch -> encode, for the v2 and v1 infer routes. Knows nothing of HTTP.

The REST calls return an `Answer` (status, headers, body); errors come back as answers too,
counted in the metrics by reason, so the transport only has to write bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service import postprocess
from service.batcher import ONLINE, Batcher, BatchResult, Pending, Reservation
from service.codec import (
    HEADER_LENGTH,
    NP_TYPES,
    InferRequest,
    decode_request,
    decompress,
    encode_response,
)
from service.errors import BadRequest, PayloadTooLarge, ServeError, error_body
from service.model_config import ModelConfig
from service.repository import LoadedModel, Repository
from service.validation import Bounds, check_decoded, validate_inputs

log = logging.getLogger(__name__)
JSON = "application/json"
#: Request parameters that steer the protocol; the rest are echoed back.
_PROTOCOL_PARAMETERS = {"binary_data_output", "timeout"}
#: Bodies larger than this (or compressed) are decoded in a worker thread.
OFFLOAD_BYTES = 256 * 1024


@dataclass(slots=True)
class Answer:
    """What to send back."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    room: Batcher | None = None  # a full queue's batcher: the connection may wait for room


@dataclass(slots=True)
class V2Call:
    """A REST v2 request between its decode and its answer."""

    name: str
    version: str | None
    model: LoadedModel
    request: InferRequest
    wanted: list[tuple[str, bool]]
    start: float


def error_answer(exc: ServeError) -> Answer:
    """An error as an Answer with the protocol's JSON body."""
    return Answer(
        exc.status,
        error_body(exc.message),
        {"content-type": JSON, **exc.headers},
        exc.room,
    )


def server_timing(result: BatchResult, total_s: float) -> str:
    """The `Server-Timing` value of an answer: queue, compute and total milliseconds."""
    return (
        f"queue;dur={result.queue_s * 1000:.3f}, compute;dur={result.compute_s * 1000:.3f}, "
        f"total;dur={total_s * 1000:.3f}"
    )


def as_serve_error(exc: Exception) -> ServeError:
    """What an exception answers with: a ServeError (the runtime already typed ONNX Runtime's
    refusals as ModelRunError) as it is; anything else is ours, logged in full and answered with
    a fixed message."""
    if isinstance(exc, ServeError):
        return exc
    log.error("internal error during inference", exc_info=exc)
    return ServeError("internal server error")


def timeout_ms(requested_us: Any, limit_ms: float) -> float | None:
    """A request's own queue timeout (Triton's `timeout` parameter, microseconds), capped by
    the model's; None when it gives none."""
    if isinstance(requested_us, int | float) and not isinstance(requested_us, bool):
        if requested_us > 0:
            return min(requested_us / 1000, limit_ms)
    return None


class DataPlane:
    """decode -> validate -> batch -> encode over a Repository. REST uses `infer_v2` and
    `predict_v1`; other transports (gRPC) decode their own requests and share `infer`,
    `succeeded` and `failed`."""

    def __init__(self, repository: Repository, max_body_bytes: int) -> None:
        self.repository = repository
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = min(max_body_bytes, repository.settings.max_json_body_bytes)

    def body_limit(self, kind: str, headers: dict[str, str]) -> int:
        """The most a request body may hold: JSON bodies (v1, and v2 without binary tensors)
        are held to max_json_body_bytes, since decoding them holds the event loop."""
        if kind == "v2" and HEADER_LENGTH in headers:
            return self.max_body_bytes
        return self.max_json_bytes

    # -- shared by every transport ----------------------------------------------------------
    def admit(
        self, name: str, version: str | None, reservation: Reservation | None = None
    ) -> LoadedModel:
        """The model a request is for, if it would take the request now: refuses unknown models
        and full queues before a body is read or decoded (a `reservation` holds a slot)."""
        model = self.repository.get(name, version)
        model.batcher.admit(reservation)
        return model

    async def infer(
        self,
        model: LoadedModel,
        request: InferRequest,
        gone: Callable[[], bool] | None = None,
        deadline_ms: float | None = None,
    ) -> tuple[BatchResult, list[tuple[str, bool]]]:
        """Run a decoded, validated request: its rows of the outputs it asked for (name,
        binary?). `deadline_ms` (a gRPC deadline) caps the queue timeout."""
        wanted, wait = plan(model, request)
        if deadline_ms is not None:
            wait = min(wait or model.batching.timeout_ms, deadline_ms)
        result = await model.batcher.submit(request.inputs, ONLINE, wait, gone)
        return result, wanted

    @staticmethod
    def response_parameters(
        model: LoadedModel, request: InferRequest, result: BatchResult
    ) -> dict[str, Any]:
        """The answer's parameters: the request's own (less the protocol's), and where its time
        went."""
        params = {k: v for k, v in request.parameters.items() if k not in _PROTOCOL_PARAMETERS}
        params.update(
            batch_size=result.batch_size,
            provider=model.runtime.provider,
            queue_ms=round(result.queue_s * 1000, 3),
            compute_ms=round(result.compute_s * 1000, 3),
        )
        return params

    def succeeded(self, model: LoadedModel, result: BatchResult, total_s: float) -> None:
        """Count an answered request in the metrics and statistics."""
        m = model.metrics
        m.success.inc()
        m.request_duration.observe(total_s)
        m.queued(result.queue_s)
        model.stats.succeeded(total_s, result.queue_s)

    def failed(
        self,
        name: str,
        version: str | None,
        exc: Exception,
        model: LoadedModel | None = None,
        start: float | None = None,
    ) -> ServeError:
        """Count a refused or failed request (unknown names stay out of the labels); returns
        the error it answers with."""
        error = as_serve_error(exc)
        if model is not None and start is not None:
            model.stats.failed(time.perf_counter() - start)
        versions = self.repository.loaded.get(name)
        if versions:
            if version is None:
                label = str(max(versions))
            else:
                label = version if version in {str(v) for v in versions} else "unknown"
            self.repository.metrics.failure.labels(name, label, error.reason).inc()
        return error

    # -- REST --------------------------------------------------------------------------------
    def decode_v2(self, model: LoadedModel, body: bytes, headers: dict[str, str]) -> InferRequest:
        """A REST v2 body (JSON or binary, maybe compressed) decoded and validated."""
        raw = decompress(body, headers.get("content-encoding"), self.body_limit("v2", headers))
        if HEADER_LENGTH not in headers and len(raw) > self.max_json_bytes:
            raise PayloadTooLarge(json_too_large(self.max_json_bytes))
        request = decode_request(
            raw, headers.get(HEADER_LENGTH), Bounds(model.config, model.limits)
        )
        check_decoded(model.config, request.inputs)
        return request

    def offloaded(self, body: bytes, headers: dict[str, str]) -> bool:
        """Whether a v2 body is decoded in a worker thread (large or compressed), so that other
        clients keep going meanwhile."""
        return len(body) > OFFLOAD_BYTES or "content-encoding" in headers

    async def infer_v2(
        self,
        name: str,
        version: str | None,
        body: bytes,
        headers: dict[str, str],
        gone: Callable[[], bool] | None = None,
    ) -> Answer:
        """POST /v2/models/{name}[/versions/{version}]/infer."""
        start = time.perf_counter()
        model = None
        try:
            model = self.repository.get(name, version)
            if self.offloaded(body, headers):
                request = await asyncio.to_thread(self.decode_v2, model, body, headers)
            else:
                request = self.decode_v2(model, body, headers)
            result, wanted = await self.infer(model, request, gone)
        except Exception as exc:
            return error_answer(self.failed(name, version, exc, model, start))
        return self.answer_v2(V2Call(name, version, model, request, wanted, start), result)

    def begin_v2(
        self,
        name: str,
        version: str | None,
        body: bytes,
        headers: dict[str, str],
        gone: Callable[[], bool] | None = None,
    ) -> tuple[V2Call, Pending] | Answer:
        """`infer_v2` without a coroutine, for a body that is not `offloaded` (the direct lane):
        decode, validate and queue; `end_v2` answers once the future is done. An Answer here is
        a refusal."""
        start = time.perf_counter()
        model = None
        try:
            model = self.repository.get(name, version)
            request = self.decode_v2(model, body, headers)
            wanted, wait = plan(model, request)
            pending = model.batcher.enqueue(request.inputs, ONLINE, wait, gone)
        except Exception as exc:
            return error_answer(self.failed(name, version, exc, model, start))
        return V2Call(name, version, model, request, wanted, start), pending

    def end_v2(self, call: V2Call, done: asyncio.Future) -> Answer:
        """The answer to a request `begin_v2` queued, once its future is done."""
        try:
            result = done.result()
        except Exception as exc:
            return error_answer(self.failed(call.name, call.version, exc, call.model, call.start))
        return self.answer_v2(call, result)

    def answer_v2(self, call: V2Call, result: BatchResult) -> Answer:
        """Encode a v2 request's rows and count it."""
        model, request = call.model, call.request
        try:
            out, header_len = encode_response(
                call.name,
                str(model.version),
                [(n, result.outputs[n], binary) for n, binary in call.wanted],
                request.id,
                self.response_parameters(model, request, result),
            )
        except Exception as exc:
            return error_answer(self.failed(call.name, call.version, exc, model, call.start))
        total = time.perf_counter() - call.start
        self.succeeded(model, result, total)
        answer_headers = {"server-timing": server_timing(result, total)}
        if header_len is None:
            answer_headers["content-type"] = JSON
        else:
            answer_headers["content-type"] = "application/octet-stream"
            answer_headers["inference-header-content-length"] = str(header_len)
        return Answer(200, out, answer_headers)

    async def predict_v1(
        self, name: str, version: str | None, body: bytes, gone: Callable[[], bool] | None = None
    ) -> Answer:
        """POST /v1/models/{name}:predict with {"instances": [...]}."""
        start = time.perf_counter()
        model = None
        try:
            model = self.repository.get(name, version)
            inputs = v1_inputs(model.config, body)
            validate_inputs(model.config, model.limits, inputs)
            result = await model.batcher.submit(inputs, ONLINE, None, gone)
            columns = postprocess.predictions(model.config, result.outputs)
            out = orjson.dumps(
                {
                    "predictions": postprocess.as_instances(columns),
                    "model_name": name,
                    "model_version": str(model.version),
                }
            )
        except Exception as exc:
            return error_answer(self.failed(name, version, exc, model, start))
        total = time.perf_counter() - start
        self.succeeded(model, result, total)
        return Answer(
            200, out, {"content-type": JSON, "server-timing": server_timing(result, total)}
        )


def json_too_large(limit: int) -> str:
    """The 413 message for a JSON body over its limit, saying what to do instead."""
    return (
        f"JSON request body over the {limit}-byte limit for JSON "
        "(max_json_body_bytes): send large batches as binary tensors (Triton's binary tensor "
        "extension, Inference-Header-Content-Length)"
    )


def plan(model: LoadedModel, request: InferRequest) -> tuple[list[tuple[str, bool]], float | None]:
    """A decoded request's outputs (name, binary?) and its own queue timeout, if it gives one."""
    wait = timeout_ms(request.parameters.get("timeout"), model.batching.timeout_ms)
    return wanted_outputs(model.config, request), wait


def wanted_outputs(config: ModelConfig, request: InferRequest) -> list[tuple[str, bool]]:
    """The outputs a request asked for (all by default), each with whether it wants binary."""
    names = [o.name for o in config.outputs]
    if request.outputs is None:
        return [(n, request.binary_output) for n in names]
    for out in request.outputs:
        if out.name not in names:
            raise BadRequest(
                f"unknown output '{out.name}'; model '{config.name}' has: {', '.join(names)}"
            )
    return [(o.name, o.binary) for o in request.outputs]


def v1_inputs(config: ModelConfig, body: bytes) -> dict[str, np.ndarray]:
    """Stack `{"instances": [...]}` into input arrays; an instance is a row or a dict of them."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON in request body: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise BadRequest('request body must be {"instances": [...]}')
    instances = doc["instances"]
    if not instances:
        raise BadRequest("'instances' is empty")
    inputs = {}
    for spec in config.inputs:
        if isinstance(instances[0], dict):
            try:
                column = [inst[spec.name] for inst in instances]
            except (KeyError, TypeError):
                raise BadRequest(f"every instance needs the input '{spec.name}'") from None
        elif len(config.inputs) == 1:
            column = instances
        else:
            raise BadRequest(f"model '{config.name}' has several inputs: give instances as dicts")
        dtype = NP_TYPES[spec.datatype]
        try:
            rows = [np.asarray(row, dtype=dtype) for row in column]
        except (ValueError, TypeError, OverflowError):
            raise BadRequest(f"'instances' must hold {spec.datatype} numbers only") from None
        if len({r.size for r in rows}) != 1:
            raise BadRequest(f"instances of '{spec.name}' differ in size: give equal-sized rows")
        row_shape = list(spec.shape[1:])
        try:
            inputs[spec.name] = np.stack(rows).reshape([len(rows), *row_shape])
        except ValueError:
            raise BadRequest(
                f"an instance of '{spec.name}' has {rows[0].size} values; "
                f"it cannot be shaped as {spec.shape[1:]} (-1 = any)"
            ) from None
    return inputs
