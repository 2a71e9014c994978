"""The fast lanes: the infer routes served without FastAPI's per-request machinery.

FastAPI's per-request machinery costs more than the model on CPU (see docs/performance.md), so
`POST .../infer` and `:predict` skip it, in one of two ways:

- `DirectLane`, called from the HTTP protocol's parser callbacks (`service.httpserver`): no ASGI
  scope, task or messages per request; the guard, admission and the body limit are checked as
  soon as the headers are in, so a refusal costs no body read. A v2 request is decoded and queued
  from the last body callback and answered from its batch's callback.
- `FastLane`, a bare ASGI callable in front of FastAPI, for requests the protocol leaves to the
  ASGI app (pipelined ones) and for other ASGI servers.

Same routes, codec, dataplane and error bodies as the FastAPI versions in `api.py`, which stay in
the OpenAPI schema and serve when the lanes are off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from service.batcher import Reservation
from service.dataplane import Answer, DataPlane, error_answer, json_too_large
from service.errors import PayloadTooLarge, ServeError
from service.routes import infer_route
from service.security import ANONYMOUS_CALLER, Caller, Guard, log_access
from service.transport import check_length, disconnect_probe, read_body, send_answer


async def answer_infer(
    dataplane: DataPlane,
    kind: str,
    model: str,
    version: str | None,
    headers: dict[str, str],
    receive: Any,
) -> Answer:
    """Admit, read the body and infer (shared with `api.py`). A request for an unknown model or
    a full queue is refused before its body is read."""
    limit = dataplane.max_body_bytes
    try:
        dataplane.admit(model, version)
        limit = dataplane.body_limit(kind, headers)
        body = await read_body(receive, limit, headers.get("content-length"))
    except ServeError as exc:
        return refusal(dataplane, model, version, limit, exc)
    gone = disconnect_probe(receive)
    if kind == "v2":
        return await dataplane.infer_v2(model, version, body, headers, gone)
    return await dataplane.predict_v1(model, version, body, gone)


class FastLane:
    """Answers the infer routes itself; `handle` returns False for every other request."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve `scope` if it is an infer route; False leaves it to FastAPI."""
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        route = infer_route(scope["path"])
        if route is None:
            return False
        kind, model, version = route
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        answer = await answer_infer(self.dataplane, kind, model, version, headers, receive)
        await send_answer(send, answer)
        return True


def refusal(
    dataplane: DataPlane, model: str, version: str | None, limit: int, exc: ServeError
) -> Answer:
    """The answer to a request refused before its body was decoded (counted); a body over the
    JSON limit is told how to send more."""
    if isinstance(exc, PayloadTooLarge) and limit != dataplane.max_body_bytes:
        exc = PayloadTooLarge(json_too_large(limit))
    return error_answer(dataplane.failed(model, version, exc))


@dataclass(slots=True, eq=False)
class LaneRequest:
    """An infer request the direct lane took: what it is for, and its body so far."""

    kind: str
    model: str
    version: str | None
    headers: dict[str, str]
    caller: Caller
    limit: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class DirectLane:
    """The infer routes for the HTTP protocol (see the module docstring). `open` at the end of
    the headers, `run` at the end of the body; answers go to the protocol's `respond`."""

    def __init__(self, dataplane: DataPlane, guard: Guard | None, access_log: bool) -> None:
        self.dataplane = dataplane
        self.guard = guard
        self.access_log = access_log

    def open(
        self,
        url: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        reservation: Reservation | None = None,
    ) -> LaneRequest | Answer | None:
        """A POST's headers are in: a LaneRequest to read the body for, an Answer that refuses
        it now, or None for a route this lane does not serve. `reservation`: a queue slot held
        for this connection (`Batcher.wait_for_room`)."""
        path = url.split(b"?", 1)[0]
        if b"%" in path or not (path.endswith(b"/infer") or path.endswith(b":predict")):
            return None  # percent-encoded paths are left to the ASGI app, which decodes them
        route = infer_route(path.decode("latin-1"))
        if route is None:
            return None
        kind, model, version = route
        try:
            caller = self.guard.check_request("POST", "infer", raw_headers) if self.guard else None
        except ServeError as exc:
            return error_answer(exc)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
        dataplane, limit = self.dataplane, self.dataplane.max_body_bytes
        try:
            dataplane.admit(model, version, reservation)
            limit = dataplane.body_limit(kind, headers)
            check_length(headers.get("content-length"), limit)
        except ServeError as exc:
            return refusal(dataplane, model, version, limit, exc)
        return LaneRequest(kind, model, version, headers, caller or ANONYMOUS_CALLER, limit)

    def too_large(self, request: LaneRequest) -> Answer:
        """The answer to a body that grew past its limit."""
        exc = PayloadTooLarge(f"request body exceeds the {request.limit}-byte limit")
        return refusal(self.dataplane, request.model, request.version, request.limit, exc)

    def run(
        self,
        request: LaneRequest,
        gone: Callable[[], bool],
        respond: Callable[[Answer], None],
    ) -> asyncio.Task | None:
        """The body is in: infer, and `respond` with the answer. A small v2 body is decoded and
        queued here, and answered from its batch's callback; the rest (v1, large or compressed
        v2 bodies) run as a task, which is returned."""
        chunks, dataplane = request.chunks, self.dataplane
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        request.chunks = []
        name, version, headers = request.model, request.version, request.headers
        if request.kind == "v2" and not dataplane.offloaded(body, headers):
            started = dataplane.begin_v2(name, version, body, headers, gone)
            if isinstance(started, Answer):
                respond(started)
                return None
            call, pending = started
            pending.future.add_done_callback(lambda done: respond(dataplane.end_v2(call, done)))
            return None
        if request.kind == "v2":
            work = dataplane.infer_v2(name, version, body, headers, gone)
        else:
            work = dataplane.predict_v1(name, version, body, gone)
        task = asyncio.get_running_loop().create_task(work)

        def finished(done: asyncio.Task) -> None:
            if not done.cancelled():  # cancelled: the graceful shutdown timed out
                respond(done.result())

        task.add_done_callback(finished)
        return task

    @staticmethod
    def log(caller: Caller | None, client: Any, url: bytes, status: int) -> None:
        """The access-log line of a request the lane answered."""
        path = url.split(b"?", 1)[0].decode("latin-1")
        log_access({"client": client, "method": "POST", "path": path}, status, caller)
