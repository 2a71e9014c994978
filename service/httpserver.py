"""The HTTP server: uvicorn (httptools) with the timeouts and shutdown a hostile network needs.

- A request's headers must arrive within `header_timeout_s` of its first byte, and its body
  within `body_timeout_s` of its headers; otherwise it is answered 408 and the connection closed
  (a stalled upload holds no memory for long).
- On SIGTERM (or SIGINT) the server stops accepting, answers every request it has, and closes idle
  keep-alive connections only after a short drain window in which a request already on the wire
  is still answered (with `Connection: close`) instead of being reset. After
  `graceful_timeout_s` what remains is cancelled; the process then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

log = logging.getLogger(__name__)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raw_response(status: bytes, message: str) -> bytes:
    body = b'{"error": "' + message.encode() + b'"}'
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


class OneWrite:
    """A transport that sends a response's status line and headers in the same socket write as
    its body (uvicorn writes them separately: two syscalls per response). The head is held until
    the next write, the end of the response, or close; interim `100 Continue` goes at once."""

    __slots__ = ("_transport", "_held")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100"):
            self._held = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read timeouts and a drain on shutdown.
    The class attributes are set by `protocol_class`."""

    header_timeout_s = 10.0
    body_timeout_s = 60.0
    drain_s = 0.5

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._draining = False

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(seconds, self._read_timed_out, what)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self, what: str) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            seconds = self.header_timeout_s if what == "headers" else self.body_timeout_s
            message = f"request {what} not received within {seconds:g} s"
            self.transport.write(_raw_response(b"408 Request Timeout", message))
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    # -- timers around uvicorn's parser callbacks ------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWrite(transport))  # type: ignore[arg-type]
        self._arm(self.header_timeout_s, "headers")

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]
        super().on_response_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_timer is None:
            self._arm(self.header_timeout_s, "headers")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None:
            if self._draining:
                self.cycle.keep_alive = False
            if self.cycle.more_body and self.parser.get_method() not in (b"GET", b"HEAD"):
                self._arm(self.body_timeout_s, "body")

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Finish the request in hand; an idle connection gets a drain window first."""
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(self.drain_s, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        else:  # a request arrived in the window: it is answered, then the connection closes
            self.cycle.keep_alive = False


def protocol_class(settings: Settings) -> type[GuardedProtocol]:
    """The protocol with the settings' timeouts."""
    return type(
        "ServerProtocol",
        (GuardedProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "drain_s": settings.drain_s,
        },
    )


class _Server(uvicorn.Server):
    """uvicorn's server, except that a signal that led to a clean shutdown is not re-raised
    (the process exits 0, not -15)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(app: Any, settings: Settings, sockets: list[socket.socket] | None = None) -> int:
    """Serve `app` until a signal; 0 after a clean shutdown. `sockets`: listening sockets
    already bound (a worker of `--workers`), instead of binding host:port."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # the app logs access itself, with the caller's key name
        proxy_headers=False,
        server_header=False,
        loop="auto",
        http=protocol_class(settings),
        timeout_keep_alive=int(settings.keep_alive_timeout_s),
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        backlog=settings.backlog,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    server = _Server(config)
    server.run(sockets=sockets)
    return 0 if server.started else 1
