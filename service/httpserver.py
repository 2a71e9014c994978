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
import re
import signal
import socket
import sys
import threading
from collections.abc import Generator
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings

log = logging.getLogger(__name__)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MAX_HOLD_OFF_S = 2.0  # below the keep-alive timeout, which must not close a held connection
ACCEPT_BATCH = 256  # connections accepted per readiness of the listening socket


def _raw_response(status: bytes, message: str) -> bytes:
    body = b'{"error": "' + message.encode() + b'"}'
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


_RETRY_AFTER = re.compile(rb"\r\nretry-after: *(\d{1,4})\r\n", re.IGNORECASE)


def _retry_after(head: bytes) -> float:
    match = _RETRY_AFTER.search(head)
    return float(match[1]) if match else 0.0


class OneWrite:
    """A transport that sends a response's status line and headers in the same socket write as
    its body (uvicorn writes them separately: two syscalls per response). The head is held until
    the next write, the end of the response, or close; interim `100 Continue` goes at once."""

    __slots__ = ("_transport", "_held", "retry_after")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self.retry_after = 0.0  # a 503's Retry-After seconds, for the protocol to enforce

    def write(self, data: bytes) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100"):
            self._held = data
            if data.startswith(b"HTTP/1.1 503"):
                self.retry_after = _retry_after(data)
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
        self._waiting: str | None = None  # "headers" or "body" while a request is incomplete
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
        transport: OneWrite = self.transport  # type: ignore[assignment]
        transport.flush()
        super().on_response_complete()
        if transport.retry_after and not self._draining:
            self._hold_off(min(transport.retry_after, MAX_HOLD_OFF_S))
            transport.retry_after = 0.0

    def _hold_off(self, seconds: float) -> None:
        """Enforce a refusal's Retry-After on this connection: read nothing more from it for
        that long. A client that honours the header sees no difference; one that does not waits
        in the kernel's buffers instead of costing the event loop another refusal."""
        if self.transport.is_closing():
            return
        self.transport.pause_reading()
        self.loop.call_later(seconds, self._resume_after_hold_off)

    def _resume_after_hold_off(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._waiting = None
        super().data_received(data)
        # Timers only for what is still incomplete after this read: a request that arrived
        # whole (the common case) costs no timer at all.
        waiting = self._waiting
        if waiting is not None and self._read_timer is None and not self.transport.is_closing():
            self._arm(self.header_timeout_s if waiting == "headers" else self.body_timeout_s,
                      waiting)  # fmt: skip

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._waiting = "headers"

    def on_headers_complete(self) -> None:
        self._disarm()
        self._waiting = None
        super().on_headers_complete()
        if self.cycle is not None:
            if self._draining:
                self.cycle.keep_alive = False
            if self.cycle.more_body and self.parser.get_method() not in (b"GET", b"HEAD"):
                self._waiting = "body"

    def on_message_complete(self) -> None:
        self._disarm()
        self._waiting = None
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


class AcceptAll:
    """A listening socket served by accepting every pending connection each time it is ready.

    uvloop's libuv accepts one connection per loop iteration: under overload a new connection (a
    liveness probe) waited behind hundreds, 5 s and more (docs/hardening.md). Closing stops
    accepting; uvicorn closes the socket itself.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Any,
        ssl: Any,
        backlog: int,
    ) -> None:
        self.loop, self.sock, self.factory, self.ssl = loop, sock, factory, ssl
        sock.listen(backlog)
        sock.setblocking(False)
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: stop listening for a moment
                log.warning("accept failed (%s); pausing accepts for 100 ms", exc)
                self.loop.remove_reader(self._fd)
                self.loop.call_later(0.1, self.loop.add_reader, self._fd, self._accept)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.loop.create_task(self._connect(conn))

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl)
        except Exception as exc:  # a TLS handshake that failed, a peer that went away
            log.debug("connection dropped before it started: %s", exc)
            conn.close()

    def close(self) -> None:
        self.loop.remove_reader(self._fd)

    async def wait_closed(self) -> None:
        return None


class _Server(uvicorn.Server):
    """uvicorn's server, with listeners that accept every pending connection at once, and a
    signal that led to a clean shutdown not re-raised (the process exits 0, not -15)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (lifespan, then listen), on `AcceptAll` listeners."""
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        loop = asyncio.get_running_loop()
        listeners = sockets if sockets is not None else [config.bind_socket()]
        accepting: list[Any] = [
            AcceptAll(loop, sock, create_protocol, config.ssl, config.backlog) for sock in listeners
        ]
        self.servers = accepting
        self._owned = [] if sockets is not None else listeners
        self.started = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown([*(sockets or []), *getattr(self, "_owned", [])])

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
