"""Errors that carry their HTTP status, and the handlers that render them as `{"error": ...}`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # the web stack is imported only where handlers are installed
    from fastapi import FastAPI
    from starlette.responses import Response

log = logging.getLogger(__name__)


class ServeError(Exception):
    """Base class: `status` is the HTTP code, `reason` the metrics label, `message` the body."""

    status = 500
    reason = "internal"
    room: Any = None  # QueueFull: the batcher whose queue was full (wait_for_room)

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServeError):
    status, reason = 400, "bad_request"


class Forbidden(ServeError):
    """Something this server does not allow (e.g. a job path outside the jobs root)."""

    status, reason = 403, "forbidden"


class NotFound(ServeError):
    status, reason = 404, "not_found"


class Conflict(ServeError):
    """The request clashes with work in progress (e.g. two jobs writing one output)."""

    status, reason = 409, "conflict"


class PayloadTooLarge(ServeError):
    status, reason = 413, "too_large"


class Unavailable(ServeError):
    """The model is not ready (loading, unloaded, or failed its readiness checks)."""

    status, reason = 503, "unavailable"


class QueueFull(Unavailable):
    """The batcher's bounded queue is full: refused at once, with Retry-After."""

    reason = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1, room: Any = None) -> None:
        super().__init__(message, {"Retry-After": str(retry_after_s)})
        self.room = room


class QueueTimeout(ServeError):
    """The request waited in the queue past its timeout and was never run."""

    status, reason = 504, "timeout"


class Cancelled(ServeError):
    """The client went away before the request ran (status 499, as nginx logs it)."""

    status, reason = 499, "cancelled"


def error_body(message: str) -> bytes:
    """The protocol's error body."""
    return orjson.dumps({"error": message})


def error_response(exc: ServeError) -> Response:
    """Render a ServeError as a JSON response."""
    from starlette.responses import Response

    return Response(
        error_body(exc.message),
        status_code=exc.status,
        headers=exc.headers,
        media_type="application/json",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to `{"error": ...}`; internal errors get a fixed message, logged in full."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    async def serve_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServeError)
        return error_response(exc)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return Response(
            error_body(str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
            media_type="application/json",
        )

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return error_response(BadRequest(f"invalid request: {problems}"))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(ServeError("internal server error"))

    app.add_exception_handler(ServeError, serve_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
