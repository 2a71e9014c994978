"""The fast lane: infer routes served by a bare ASGI callable in front of FastAPI.

FastAPI's per-request machinery costs more than the model on CPU (see docs/architecture.md), so
`POST .../infer` and `:predict` skip it here. Same routes, codec, dataplane and error bodies as the
FastAPI versions in `api.py`, which stay in the OpenAPI schema and serve when the lane is off.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.types import Receive, Scope, Send

from service.dataplane import Answer, DataPlane, error_answer, json_too_large
from service.errors import PayloadTooLarge, ServeError
from service.transport import disconnect_probe, read_body, send_answer

INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
PREDICT = re.compile(r"^/v1/models/(?P<model>[^/:]+)(?:/versions/(?P<version>[^/:]+))?:predict$")


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
    except PayloadTooLarge as exc:  # over the JSON limit: say how to send more
        error = exc if limit == dataplane.max_body_bytes else PayloadTooLarge(json_too_large(limit))
        return error_answer(dataplane.failed(model, version, error))
    except ServeError as exc:
        return error_answer(dataplane.failed(model, version, exc))
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
        path = scope["path"]
        match, kind = INFER.match(path), "v2"
        if match is None:
            match, kind = PREDICT.match(path), "v1"
            if match is None:
                return False
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        answer = await answer_infer(
            self.dataplane, kind, match["model"], match["version"], headers, receive
        )
        await send_answer(send, answer)
        return True
