"""ASGI plumbing shared by the fast lane and the FastAPI routes: bounded body reads, disconnect
watching, and writing an `Answer`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.dataplane import Answer
from service.errors import Cancelled, PayloadTooLarge

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def read_body(receive: Receive, limit: int, content_length: str | None) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed `limit` bytes."""
    check_length(content_length, limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Cancelled("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse (413) a body whose declared length exceeds `limit` bytes."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(
            f"request body of {content_length} bytes exceeds the {limit}-byte limit"
        )


def disconnect_probe(receive: Receive) -> Callable[[], bool]:
    """A cheap, synchronous "has the client gone?" for a request whose body was read.

    It steps `receive()` once: servers answer an already-closed connection without suspending
    (uvicorn does), so a coroutine that finishes at once with `http.disconnect` means gone; one
    that would wait means the client is still there (it is closed, not awaited).
    """

    def gone() -> bool:
        step = receive()
        try:
            step.send(None)  # type: ignore[attr-defined]
        except StopIteration as done:
            return bool(done.value and done.value.get("type") == "http.disconnect")
        except Exception:
            return False
        step.close()  # type: ignore[attr-defined]
        return False

    return gone


async def send_answer(send: Send, answer: Answer) -> None:
    """Write an Answer as one ASGI response."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})
