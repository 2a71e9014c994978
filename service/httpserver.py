"""The HTTP server: uvicorn (httptools) with the timeouts and shutdown a hostile network needs.

- A request's headers must arrive within `header_timeout_s` of its first byte, and its body
  within `body_timeout_s` of its headers; otherwise it is answered 408 and the connection closed
  (a stalled upload holds no memory for long).
- The infer routes are served from the parser callbacks by `service.fastlane.DirectLane` when
  the app has one (no ASGI scope, task or messages per request; a refusal before the body is
  read); everything else goes to the ASGI app.
- On SIGTERM (or SIGINT) the server stops accepting, answers every request it has, and closes idle
  keep-alive connections only after a short drain window in which a request already on the wire
  is still answered (with `Connection: close`) instead of being reset. After
  `graceful_timeout_s` what remains is cancelled; the process then exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import re
import signal
import socket
import struct
import sys
import termios
import threading
from collections.abc import Generator
from functools import partial
from typing import Any, cast

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.batcher import Batcher, Reservation
from service.config import Settings
from service.dataplane import Answer, error_answer
from service.errors import ServeError
from service.fastlane import DirectLane, LaneRequest

log = logging.getLogger(__name__)
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
MAX_HOLD_OFF_S = 2.0  # below the keep-alive timeout, which must not close a held connection
MAX_ROOM_WAIT_S = 2.0  # then a held connection is read even if its model's queue is still full
ACCEPT_BATCH = 256  # connections accepted per readiness of the listening socket


def _raw_response(status: bytes, message: str) -> bytes:
    body = b'{"error": "' + message.encode() + b'"}'
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


_RETRY_AFTER = re.compile(rb"\r\nretry-after: *(\d{1,4})\r\n", re.IGNORECASE)


def _bytes_waiting(fd: int) -> bool:
    """Whether the peer has sent bytes not read yet (FIONREAD on the socket; -1: unknown)."""
    if fd < 0:
        return True
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0] > 0
    except OSError:
        return False


def _retry_after(head: bytes) -> float:
    match = _RETRY_AFTER.search(head)
    return float(match[1]) if match else 0.0


def encode_answer(answer: Answer, keep_alive: bool) -> bytes:
    """An Answer as one HTTP/1.1 response."""
    fields = "".join([f"{k}: {v}\r\n" for k, v in answer.headers.items()])
    close = "" if keep_alive else "connection: close\r\n"
    head = f"{fields}content-length: {len(answer.body)}\r\n{close}\r\n".encode("latin-1")
    return b"".join((STATUS_LINE[answer.status], head, answer.body))


class _NoEvent:
    """Stands for uvicorn's per-request `asyncio.Event` on a lane request: nothing waits."""

    __slots__ = ()

    def set(self) -> None:
        return None


class LaneCycle:
    """A request the direct lane serves, with the flags uvicorn's connection code reads of a
    request-response cycle (connection_lost, shutdown and the read timeouts use them)."""

    __slots__ = ("request", "url", "keep_alive", "disconnected", "response_started",
                 "response_complete", "more_body", "message_event")  # fmt: skip

    def __init__(self, request: LaneRequest | None, url: bytes, keep_alive: bool) -> None:
        self.request = request  # None: refused when its headers came in
        self.url = url
        self.keep_alive = keep_alive
        self.disconnected = self.response_started = self.response_complete = False
        self.more_body = True
        self.message_event = _NoEvent()

    def gone(self) -> bool:
        """Whether the client has gone (asked just before compute)."""
        return self.disconnected


class Outbox:
    """The direct lane's answers, written at the end of the loop's turn, back to back.

    A batch's answers are made one callback after another, each with Python work between its
    write and the next. Written as each is made, every write wakes the client afresh, and the
    waking is paid in the writer's syscall: on loopback, where the kernel delivers in the
    sender's call, and in VMs, where waking another idle CPU is dear. Back to back, one wake-up
    serves many. Measured at 64 connections (docs/performance.md): 35-44 µs a write, against 17
    µs in a row."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: list[OneWrite] = []

    def add(self, writer: OneWrite) -> None:
        """Send `writer`'s pending answer at the end of this turn."""
        if not self._waiting:
            asyncio.get_running_loop().call_soon(self.flush)
        self._waiting.append(writer)

    def flush(self) -> None:
        """Send every pending answer."""
        waiting, self._waiting = self._waiting, []
        for writer in waiting:
            writer.send_pending()


class OneWrite:
    """A transport that sends a response's status line and headers in the same socket write as
    its body (uvicorn writes them separately: two syscalls per response). The head is held until
    the next write, the end of the response, or close; interim `100 Continue` goes at once.
    Whole answers (the direct lane's) wait in the outbox until the end of the loop's turn; any
    other write or close sends them first, so a connection's bytes keep their order."""

    __slots__ = ("_transport", "_outbox", "_held", "_pending", "retry_after")

    def __init__(self, transport: asyncio.Transport, outbox: Outbox) -> None:
        self._transport = transport
        self._outbox = outbox
        self._held: bytes | None = None
        self._pending: bytes | None = None  # whole answers waiting in the outbox
        self.retry_after = 0.0  # a 503's Retry-After seconds, for the protocol to enforce

    def write(self, data: bytes) -> None:
        self.send_pending()
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100"):
            self._held = data
            if data.startswith(b"HTTP/1.1 503"):
                self.retry_after = _retry_after(data)
        else:
            self._transport.write(data)

    def write_whole(self, response: bytes) -> None:
        """A whole response (the direct lane's), sent with this turn's others."""
        if self._pending is None:
            self._pending = response
            self._outbox.add(self)
        else:  # pipelined: answered in the same turn
            self._pending += response

    def send_pending(self) -> None:
        """Send the whole answers waiting in the outbox, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if not self._transport.is_closing():
                self._transport.write(pending)

    def flush(self) -> None:
        if self._held is not None:
            self.send_pending()
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.send_pending()
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:  # asked twice a request: not through __getattr__
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read timeouts and a drain on shutdown.
    The class attributes are set by `protocol_class`."""

    header_timeout_s = 10.0
    body_timeout_s = 60.0
    drain_s = 0.5
    lane: DirectLane | None = None
    outbox: Outbox = Outbox()  # one per server: `protocol_class` gives each its own

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._waiting: str | None = None  # "headers" or "body" while a request is incomplete
        self._draining = False
        self._held_on: Batcher | None = None  # refused: reading paused until its queue has room
        self._hold_timer: asyncio.TimerHandle | None = None
        self._reservation: Reservation | None = None  # a slot held for the next request
        self._idle_since: float | None = None  # loop time of the last response, while idle

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
        super().connection_made(OneWrite(transport, self.outbox))  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else -1
        self._arm(self.header_timeout_s, "headers")

    def on_response_complete(self) -> None:
        """uvicorn's, with the keep-alive timer kept across requests (`_arm_keep_alive`)."""
        transport: OneWrite = self.transport  # type: ignore[assignment]
        transport.flush()
        self.server_state.total_requests += 1
        if transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._arm_keep_alive()
        if transport.retry_after and not self._draining:
            self._hold_off(min(transport.retry_after, MAX_HOLD_OFF_S))
            transport.retry_after = 0.0

    def _hold_off(self, seconds: float) -> None:
        """Enforce a refusal's Retry-After on this connection: read nothing more from it for
        that long. A client that honours the header sees no difference; one that does not waits
        in the kernel's buffers instead of costing the event loop another refusal."""
        if self.transport.is_closing():
            return
        self._pause()
        self.loop.call_later(seconds, self._resume)

    def _pause(self) -> None:
        """Stop reading; the connection counts as busy, so the keep-alive timer leaves it open
        (a request may be waiting unread)."""
        self.transport.pause_reading()
        self._unset_keepalive_if_required()

    def _resume(self) -> None:
        """Read again, with the keep-alive timer armed until the next request comes in."""
        if self.transport.is_closing():
            return
        self.transport.resume_reading()
        self._arm_keep_alive()

    def _arm_keep_alive(self) -> None:
        """The connection is idle from now: closed if it stays so for the keep-alive timeout.

        One timer serves many requests. uvicorn makes a timer after every response and cancels
        it at the next request's first bytes (2.5 µs a request); here a request only marks the
        connection busy, and the timer, when it fires, closes the connection if it has been idle
        for the whole timeout, or waits for the rest of it."""
        if self.transport.is_closing():
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_due
            )

    def _unset_keepalive_if_required(self) -> None:
        """The connection is busy (a read, a pause): the keep-alive timer will not close it."""
        self._idle_since = None

    def _keep_alive_due(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:  # busy: armed again when it is idle again
            return
        left = self._idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_due)
        else:
            self.timeout_keep_alive_handler()

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
        reservation, self._reservation = self._reservation, None
        taken = self.lane is not None and self._lane_open(self.lane, reservation)
        if reservation is not None:
            reservation.release()  # a no-op when the request used it
        if taken:
            return
        super().on_headers_complete()
        if self.cycle is not None:
            if self._draining:
                self.cycle.keep_alive = False
            if self.cycle.more_body and self.parser.get_method() not in (b"GET", b"HEAD"):
                self._waiting = "body"

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is not LaneCycle:
            super().on_body(body)
            return
        request = cycle.request
        if request is None or cycle.response_complete:
            return  # refused already: the rest of the body is read and dropped
        request.size += len(body)
        if request.size > request.limit:
            self._lane_respond(cycle, self._lane_guarded(self.lane.too_large, request))
        else:
            request.chunks.append(body)

    def on_message_complete(self) -> None:
        self._disarm()
        self._waiting = None
        cycle = self.cycle
        if type(cycle) is not LaneCycle:
            super().on_message_complete()
            return
        cycle.more_body = False
        if cycle.request is None or cycle.response_complete:
            self._arm_keep_alive()
            return
        task = self._lane_guarded(
            self.lane.run, cycle.request, cycle.gone, partial(self._lane_respond, cycle)
        )
        if isinstance(task, Answer):
            self._lane_respond(cycle, task)
        elif task is not None:  # waited for at shutdown like uvicorn's own tasks
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    # -- the direct lane ----------------------------------------------------------------------
    def _lane_open(self, lane: DirectLane, reservation: Reservation | None) -> bool:
        """Give a POST to the direct lane if it serves the route; False leaves it to the app
        (also while an earlier request on this connection is still being answered)."""
        cycle = self.cycle
        if self.parser.get_method() != b"POST" or self.flow.write_paused:
            return False
        if cycle is not None and not cycle.response_complete:
            return False
        opened = self._lane_guarded(lane.open, self.url, self.headers, reservation)
        if opened is None:
            return False
        keep_alive = self.parser.should_keep_alive() and not self._draining
        if isinstance(opened, Answer):  # refused before the body: it is read and dropped
            lane_cycle = LaneCycle(None, self.url, keep_alive and not self.expect_100_continue)
            self.cycle = lane_cycle  # type: ignore[assignment]
            self._lane_respond(lane_cycle, opened)
        else:
            self.cycle = LaneCycle(opened, self.url, keep_alive)  # type: ignore[assignment]
            if self.expect_100_continue:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._waiting = "body"
        return True

    def _lane_guarded(self, step: Any, *args: Any) -> Any:
        """A lane step; an exception in it (a bug) is logged and answered 500, never left to
        the parser (which would answer 400) or the loop."""
        try:
            return step(*args)
        except Exception as exc:
            log.error("internal error in the direct lane", exc_info=exc)
            return error_answer(ServeError("internal server error"))

    def _lane_respond(self, cycle: LaneCycle, answer: Answer) -> None:
        """Send a lane request's answer (in one write, with this turn's others: `Outbox`), then
        carry on as uvicorn does after a response (keep-alive timer, pipelined requests,
        Retry-After hold-off)."""
        if cycle.response_complete:
            return
        cycle.response_started = cycle.response_complete = True
        transport: OneWrite = self.transport  # type: ignore[assignment]
        if cycle.disconnected or transport.is_closing():
            return
        keep_alive = cycle.keep_alive
        transport.write_whole(encode_answer(answer, keep_alive))
        retry = answer.headers.get("Retry-After", "")
        retry_s = float(retry) if retry.isdigit() else 0.0
        room = answer.room
        if room is None:  # a full queue waits for room instead of a fixed hold-off
            transport.retry_after = retry_s
        if self.lane is not None and self.lane.access_log:
            caller = cycle.request.caller if cycle.request is not None else None
            self.lane.log(caller, self.client, cycle.url, answer.status)
        if not keep_alive:
            transport.close()
        self.on_response_complete()
        if room is not None and not self._draining and not transport.is_closing():
            self._wait_for_room(room, retry_s or 1.0)

    # -- refused for a full queue: wait for room --------------------------------------------
    def _wait_for_room(self, batcher: Batcher, seconds: float) -> None:
        """Read nothing more from a connection refused for a full queue for its Retry-After (at
        most MAX_HOLD_OFF_S), and after that until the queue has room (first come, first
        served; the slot is held for a request already sent, so it is not refused again). A
        client that honours Retry-After sees no difference; one that re-sends at once waits in
        the kernel's buffers, costing no CPU, instead of drawing refusal after refusal."""
        if self._held_on is not None:
            return
        self._pause()
        self._held_on = batcher
        self._hold_timer = self.loop.call_later(min(seconds, MAX_HOLD_OFF_S), self._queue_up)

    def _queue_up(self) -> None:
        """Retry-After has passed: wait for room (MAX_ROOM_WAIT_S at most, then read anyway)."""
        batcher = self._held_on
        if batcher is None or self.transport.is_closing():
            self._hold_timer = None
            return
        self._hold_timer = self.loop.call_later(MAX_ROOM_WAIT_S, self._stop_waiting)
        batcher.wait_for_room(self._room_offered)

    def _stop_waiting(self) -> None:
        self._hold_timer = None
        if self._held_on is not None:
            self._held_on = None
            self._resume()

    def _unhold(self) -> None:
        """Forget a hold after a refusal, and its timer."""
        self._held_on = None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _room_offered(self, reservation: Reservation | None) -> bool:
        """The queue has room: read again; keep the slot if the next request is already here."""
        if self._held_on is None or self.transport.is_closing():
            return False
        self._unhold()
        self._resume()
        if reservation is None or not _bytes_waiting(self._fd):
            return False
        self._reservation = reservation
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unhold()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None
        super().connection_lost(exc)

    # -- shutdown ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Finish the request in hand; an idle connection gets a drain window first. A
        connection held after a refusal is read again at once: a retry waiting unread in the
        kernel's buffers is answered in the window, not reset. Called once per connection (a
        connection that starts while the listener closes may be told twice)."""
        if self._draining:
            return
        self._draining = True
        self._unhold()
        if not self.transport.is_closing():
            self.transport.resume_reading()
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


def protocol_class(settings: Settings, lane: DirectLane | None = None) -> type[GuardedProtocol]:
    """The protocol with the settings' timeouts, serving `lane`'s routes itself."""
    return type(
        "ServerProtocol",
        (GuardedProtocol,),
        {
            "header_timeout_s": settings.header_timeout_s,
            "body_timeout_s": settings.body_timeout_s,
            "drain_s": settings.drain_s,
            "lane": lane,
            "outbox": Outbox(),
        },
    )


class AcceptAll:
    """A listening socket served by accepting every pending connection each time it is ready.

    uvloop's libuv accepts one connection per loop iteration: under overload a new connection (a
    liveness probe) waited behind hundreds, 5 s and more (docs/hardening.md). Closing accepts
    what the kernel has queued already, so a client whose handshake is done and whose request
    may be on the wire is answered in the drain, not reset when the socket closes; uvicorn
    closes the socket itself.
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
        self.backlog = backlog
        self.closed = False
        self._connecting: set[asyncio.Task[None]] = set()
        sock.listen(backlog)
        sock.setblocking(False)
        self._fd = sock.fileno()
        loop.add_reader(self._fd, self._accept)

    def _accept(self, most: int = ACCEPT_BATCH) -> None:
        for _ in range(most):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: stop listening for a moment
                log.warning("accept failed (%s); pausing accepts for 100 ms", exc)
                self.loop.remove_reader(self._fd)
                self.loop.call_later(0.1, self._listen_again)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._connect(conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _listen_again(self) -> None:
        if not self.closed:
            self.loop.add_reader(self._fd, self._accept)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            transport, _ = await self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl)
        except Exception as exc:  # a TLS handshake that failed, a peer that went away
            log.debug("connection dropped before it started: %s", exc)
            conn.close()
            return
        if self.closed:  # accepted before the listener closed, started after: drained too
            protocol: Any = transport.get_protocol()  # ours, also under TLS's own protocol
            protocol.shutdown()

    async def started(self) -> None:
        """Wait until every accepted connection has started (or failed to): at shutdown, so
        that one still in its TLS handshake is drained before the server stops waiting."""
        if self._connecting:
            await asyncio.wait(list(self._connecting))

    def close(self) -> None:
        """Stop accepting, after accepting what is queued (those connections drain too)."""
        if self.closed:
            return
        self.loop.remove_reader(self._fd)
        self._accept(most=self.backlog)
        self.closed = True

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

    async def _wait_tasks_to_complete(self) -> None:
        """uvicorn's wait for connections and tasks (bounded by the graceful timeout), after the
        connections accepted while the listeners closed have started and been told to drain."""
        for listener in cast(list[AcceptAll], self.servers):  # as `startup` set them
            await listener.started()
        await super()._wait_tasks_to_complete()

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
        http=protocol_class(settings, getattr(app, "direct_lane", None)),
        timeout_keep_alive=int(settings.keep_alive_timeout_s),
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        backlog=settings.backlog,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    server = _Server(config)
    server.run(sockets=sockets)
    return 0 if server.started else 1
