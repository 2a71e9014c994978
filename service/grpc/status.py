"""Errors as gRPC status codes: the one map from onnxserve's HTTP statuses to gRPC's.

| HTTP | gRPC | when |
|---|---|---|
| 400 | INVALID_ARGUMENT | a request the model cannot take (dtype, shape, NaN, ...) |
| 401 | UNAUTHENTICATED | no key, or an unknown one, where a keys file is configured |
| 403 | PERMISSION_DENIED | a key without the RPC's scope; model control refused |
| 404 | NOT_FOUND | unknown model or version |
| 409 | ABORTED | clashes with work in progress |
| 413 | RESOURCE_EXHAUSTED | over a limit (rows, elements, size: as gRPC's own size limit) |
| 503 queue full | RESOURCE_EXHAUSTED, `retry-after` | the queue is full: retry after the hint |
| 503 | UNAVAILABLE | model loading, unloading or not ready |
| 504 | DEADLINE_EXCEEDED | waited past its timeout (or the call's deadline) in the queue |
| 499 | CANCELLED | the client went away before compute |
| 500 | INTERNAL | ours; a fixed message, the details are logged |

A refusal that may be retried carries `retry-after` (seconds, as HTTP's Retry-After) in the
trailing metadata. RESOURCE_EXHAUSTED without it is a request over a limit: do not retry it.
"""

from __future__ import annotations

import grpc

from service.errors import ServeError

CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
#: Reasons (ServeError.reason) whose code is not the one of their HTTP status.
BY_REASON: dict[str, grpc.StatusCode] = {"queue_full": grpc.StatusCode.RESOURCE_EXHAUSTED}
RETRY_AFTER = "retry-after"


def status_of(exc: ServeError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The gRPC code, details and trailing metadata (the retry hint) that answer `exc`."""
    code = BY_REASON.get(exc.reason) or CODES.get(exc.status, grpc.StatusCode.UNKNOWN)
    retry = exc.headers.get("Retry-After")
    trailing = ((RETRY_AFTER, retry),) if retry is not None else ()
    return code, exc.message, trailing


def retry_after_s(trailing: tuple[tuple[str, str | bytes], ...] | None) -> float | None:
    """The client's side: the retry hint of a refusal's trailing metadata, in seconds."""
    for key, value in trailing or ():
        if key == RETRY_AFTER:
            text = value.decode() if isinstance(value, bytes) else value
            try:
                return max(0.0, float(text))
            except ValueError:
                return None
    return None
