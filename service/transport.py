"""ASGI plumbing shared by the fast lane and the FastAPI routes: bounded body reads, disconnect
watching, and writing an `Answer`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.dataplane import Answer
from service.errors import PayloadTooLarge

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def read_body(receive: Receive, limit: int, content_length: str | None) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(
            f"request body of {content_length} bytes exceeds the {limit}-byte limit"
        )
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_watching(work: Awaitable[Answer], receive: Receive) -> Answer | None:
    """Await `work`, but cancel it if the client disconnects first (then return None).

    Cancelling drops a request that is still queued before it is computed.
    """
    current = asyncio.current_task()
    assert current is not None
    gone = False

    def on_disconnect(task: asyncio.Task) -> None:
        nonlocal gone
        if not task.cancelled() and task.exception() is None:
            gone = True
            current.cancel()

    watcher = asyncio.get_running_loop().create_task(_until_disconnect(receive))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            current.uncancel()
            return None
        raise
    finally:
        watcher.remove_done_callback(on_disconnect)
        watcher.cancel()


async def send_answer(send: Send, answer: Answer) -> None:
    """Write an Answer as one ASGI response."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
