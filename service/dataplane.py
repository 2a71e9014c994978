"""decode -> validate -> batch -> encode, for the v2 and v1 infer routes. Knows nothing of HTTP.

Every call returns an `Answer` (status, headers, body); errors come back as answers too, counted
in the metrics by reason, so the transport only has to write bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service import postprocess
from service.batcher import ONLINE, BatchResult
from service.codec import HEADER_LENGTH, NP_TYPES, decode_request, decompress, encode_response
from service.errors import BadRequest, ServeError, error_body
from service.model_config import ModelConfig
from service.repository import LoadedModel, Repository
from service.validation import Bounds, check_complete, check_finite, validate_inputs

log = logging.getLogger(__name__)
JSON = "application/json"
#: Request parameters that steer the protocol; the rest are echoed back.
_PROTOCOL_PARAMETERS = {"binary_data_output", "timeout"}


@dataclass(slots=True)
class Answer:
    """What to send back."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def error_answer(exc: ServeError) -> Answer:
    """An error as an Answer with the protocol's JSON body."""
    return Answer(exc.status, error_body(exc.message), {"content-type": JSON, **exc.headers})


def _timing(result: BatchResult, total_s: float) -> str:
    return (
        f"queue;dur={result.queue_s * 1000:.3f}, compute;dur={result.compute_s * 1000:.3f}, "
        f"total;dur={total_s * 1000:.3f}"
    )


def _as_serve_error(exc: Exception) -> ServeError:
    """ONNX Runtime refusing an input (e.g. a window too short) is the caller's error; anything
    else is ours, logged in full and answered with a fixed message."""
    if isinstance(exc, ServeError):
        return exc
    if type(exc).__module__.startswith("onnxruntime"):
        return BadRequest(f"the model could not run on this input: {exc}")
    log.error("internal error during inference", exc_info=exc)
    return ServeError("internal server error")


class DataPlane:
    """The infer routes' logic over a Repository."""

    def __init__(self, repository: Repository, max_body_bytes: int) -> None:
        self.repository = repository
        self.max_body_bytes = max_body_bytes

    def failed(self, name: str, version: str | None, exc: ServeError) -> Answer:
        """Count a refused request and answer it (unknown names stay out of the labels)."""
        versions = self.repository.loaded.get(name)
        if versions:
            if version is None:
                label = str(max(versions))
            else:
                label = version if version in {str(v) for v in versions} else "unknown"
            self.repository.metrics.failure.labels(name, label, exc.reason).inc()
        return error_answer(exc)

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
            raw = decompress(body, headers.get("content-encoding"), self.max_body_bytes)
            request = decode_request(
                raw, headers.get(HEADER_LENGTH), Bounds(model.config, model.limits)
            )
            check_complete(model.config, request.inputs)
            check_finite(model.config, request.inputs)
            wanted = self._wanted_outputs(model.config, request)
            timeout = request.parameters.get("timeout")  # Triton: microseconds
            timeout_ms = None
            if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
                timeout_ms = min(timeout / 1000, model.batching.timeout_ms)
            result = await model.batcher.submit(request.inputs, ONLINE, timeout_ms, gone)
            params = {k: v for k, v in request.parameters.items() if k not in _PROTOCOL_PARAMETERS}
            params.update(
                batch_size=result.batch_size,
                provider=model.runtime.provider,
                queue_ms=round(result.queue_s * 1000, 3),
                compute_ms=round(result.compute_s * 1000, 3),
            )
            out, header_len = encode_response(
                name,
                str(model.version),
                [(n, result.outputs[n], binary) for n, binary in wanted],
                request.id,
                params,
            )
        except Exception as exc:
            return self._failed_on(model, start, name, version, exc)
        total = time.perf_counter() - start
        self._succeeded(model, result, total)
        answer_headers = {"server-timing": _timing(result, total)}
        if header_len is None:
            answer_headers["content-type"] = JSON
        else:
            answer_headers["content-type"] = "application/octet-stream"
            answer_headers["inference-header-content-length"] = str(header_len)
        return Answer(200, out, answer_headers)

    @staticmethod
    def _wanted_outputs(config: ModelConfig, request: Any) -> list[tuple[str, bool]]:
        names = [o.name for o in config.outputs]
        if request.outputs is None:
            return [(n, request.binary_output) for n in names]
        for out in request.outputs:
            if out.name not in names:
                raise BadRequest(
                    f"unknown output '{out.name}'; model '{config.name}' has: {', '.join(names)}"
                )
        return [(o.name, o.binary) for o in request.outputs]

    def _failed_on(
        self,
        model: LoadedModel | None,
        start: float,
        name: str,
        version: str | None,
        exc: Exception,
    ) -> Answer:
        """A request that failed after `start`; counted on its model version if it had one."""
        if model is not None:
            model.stats.failed(time.perf_counter() - start)
        return self.failed(name, version, _as_serve_error(exc))

    def _succeeded(self, model: LoadedModel, result: BatchResult, total_s: float) -> None:
        m = model.metrics
        m.success.inc()
        m.request_duration.observe(total_s)
        m.queued(result.queue_s)
        model.stats.succeeded(total_s, result.queue_s)

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
            return self._failed_on(model, start, name, version, exc)
        total = time.perf_counter() - start
        self._succeeded(model, result, total)
        return Answer(200, out, {"content-type": JSON, "server-timing": _timing(result, total)})


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
