"""onnxserve's own gRPC server: HTTP/2 for unary calls, on the event loop, no grpcio.

Why: a `grpc.aio` server spends ~0.45 ms of CPU on an empty call on our benchmark core, more
than a whole REST inference, and hands the batcher one call per loop turn. This server parses
every frame of a read at once (the kernel reads into its buffer: `asyncio.BufferedProtocol`),
runs each call as one task and writes all the answers of a loop turn in one socket write; many
calls share a read, a write and a batch.

What it speaks (RFC 9113 and gRPC's HTTP/2 mapping), as a server of unary calls only:
- the connection preface, SETTINGS (with ACK), PING (ACK), WINDOW_UPDATE, RST_STREAM (the call
  is cancelled: dropped before compute), GOAWAY both ways, CONTINUATION, padding, PRIORITY
  (ignored); a protocol error ends the connection with GOAWAY and the error's code;
- flow control both ways: answers wait for the client's windows; a call may send
  `STREAM_WINDOW` bytes, and a larger message gets the rest of its window at once while the
  connection's grants stay within its budget, else as earlier calls finish (`_reserve`); the
  connection's window is acknowledged as read; DATA past a window is FLOW_CONTROL_ERROR;
- header blocks decoded by `hpack` (a well-kept HPACK decoder: dynamic table, Huffman); answers
  are encoded as literals without indexing, so the server keeps no encoder state;
- gRPC framing: one length-prefixed message a call, `grpc-encoding` gzip or deflate in (answers
  are never compressed), `grpc-timeout` as the call's deadline, `grpc-status` / `grpc-message`
  and trailing metadata in trailers (trailers-only for errors before an answer);
- limits: messages over `max_body_bytes` are RESOURCE_EXHAUSTED as soon as their length prefix
  is read; `MAX_STREAMS` concurrent calls a connection (more are refused with REFUSED_STREAM,
  which clients retry); SETTINGS and reset floods end the connection (ENHANCE_YOUR_CALM); the
  preface must come within `header_timeout_s` and a call's message within `body_timeout_s`
  (DEADLINE_EXCEEDED, then RST_STREAM);
- TLS with ALPN `h2` (the HTTP server's certificate), SO_REUSEPORT under `--workers`.

The RPCs themselves are `GRPCInferenceService`'s: each is a coroutine `(request, context)`, and
the `Call` here is its context (metadata, deadline, trailing metadata, abort, peer), as grpc.aio's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple, NoReturn, cast

import grpc
from google.protobuf.message import DecodeError
from hpack import Decoder
from hpack.exceptions import HPACKError

from service.config import Settings

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# frame types (RFC 9113 6.x)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
# flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x9
# settings
MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x3, 0x4, 0x5
MAX_HEADER_LIST_SIZE = 0x6

MAX_STREAMS = 256  # concurrent calls a connection (clients queue more); the batcher's queue
# is the real bound
STREAM_WINDOW = 256 * 1024  # a call's request window to start with (a 32-row CNN batch fits)
CONN_WINDOW = 16 * 1024 * 1024  # the connection's request window, acknowledged as read
SETTINGS_PER_S = 100  # SETTINGS frames a client may send a second (each may touch every call)
RESETS_PER_S = 1000  # calls a client may start and reset a second ("rapid reset" floods)
ENHANCE_YOUR_CALM = 0xB
MAX_FRAME = 1 << 20  # the largest frame we accept (fewer frames for large tensors)
MAX_HEADER_LIST = 16 * 1024
READ_CHUNK = 16 * 1024  # a connection's read buffer to start with (idle ones keep it)
READ_ROOM = 64 * 1024  # what a busy connection's buffer has room for past the unparsed rest
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
FRAME_HEADER = struct.Struct(">IBI")  # (length << 8 | type, flags, stream id)
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
ENCODINGS = "identity,deflate,gzip"
MAX_DETAILS = 2000  # characters of grpc-message: trailers fit one frame of the smallest size
ONE_BYTE_INDEXED = bytes(range(0x81, 0xFF))  # HPACK: an indexed field, index 1-126
# gRPC status codes, as grpc-status carries them
CANCELLED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = (
    c.value[0] for c in (grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL)
)  # fmt: skip

RPC = Callable[[Any, "Call"], Awaitable[Any]]
#: path -> (the RPC's coroutine, its request class): what the server serves.
Methods = Mapping[str, tuple[RPC, Any]]
Buffer = bytes | bytearray | memoryview


class ConnectionError_(Exception):
    """A connection error (RFC 9113 5.4.1): GOAWAY with `code`, then close."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class Abort(Exception):
    """Raised by `Call.abort`: the call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


def _frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload) << 8 | ftype, flags, sid) + payload


def _hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """HPACK's integer with a `prefix`-bit prefix, OR-ed into `first`."""
    top = (1 << prefix) - 1
    if value < top:
        return bytes((first | value,))
    out, value = bytearray((first | top,)), value - top
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str | bytes) -> bytes:
    """One header as a literal without indexing, new name, no Huffman."""
    raw = name.encode("ascii")
    data = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
    return b"\x00" + _hpack_int(len(raw), 7) + raw + _hpack_int(len(data), 7) + data


#: `:status: 200` (static index 8) and `content-type: application/grpc`
OK_HEADERS = b"\x88" + _literal("content-type", "application/grpc")


def _percent(text: str) -> bytes:
    """grpc-message's percent-encoding (bytes outside printable ASCII, and '%')."""
    return b"".join(
        bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
        for b in text.encode("utf-8")
    )


def _trailers(code: int, details: str, trailing: tuple) -> bytes:
    block = [_literal("grpc-status", str(code))]
    if details:
        block.append(_literal("grpc-message", _percent(details)))
    for key, value in trailing:
        block.append(_literal(key.lower(), value))
    return b"".join(block)


def _rate_limit(seen: deque[float], most: int, what: str) -> None:
    """Note one event; more than `most` in the last second ends the connection."""
    now = time.monotonic()
    seen.append(now)
    while now - seen[0] > 1.0:
        seen.popleft()
    if len(seen) > most:
        raise ConnectionError_(ENHANCE_YOUR_CALM, f"too many {what} a second (over {most})")


def _timeout_s(text: str) -> float | None:
    """grpc-timeout (`<1-8 digits><unit>`) in seconds; None if malformed (no deadline)."""
    digits, unit = text[:-1], text[-1:]
    if not (0 < len(digits) <= 8 and digits.isdigit() and digits.isascii()):
        return None
    scale = TIMEOUT_UNITS.get(unit)
    return None if scale is None else int(digits) * scale


class Head(NamedTuple):
    """What a call's request headers say."""

    path: str
    grpc: bool  # a POST of application/grpc
    timeout_s: float | None  # grpc-timeout
    encoding: str  # grpc-encoding
    metadata: tuple[tuple[str, str], ...]  # the rest, for the RPC (authorization, ...)

    @classmethod
    def of(cls, headers: list[tuple[str, str]]) -> Head:
        path = method = content_type = ""
        timeout, encoding, metadata = None, "identity", []
        for name, value in headers:
            if name == ":path":
                path = value
            elif name == ":method":
                method = value
            elif name == "content-type":
                content_type = value
            elif name == "grpc-timeout":
                timeout = _timeout_s(value)
            elif name == "grpc-encoding":
                encoding = value
            elif not name.startswith(":") and name not in (
                "te",
                "user-agent",
                "grpc-accept-encoding",
            ):
                metadata.append((name, value))
        grpc = method == "POST" and content_type.startswith("application/grpc")
        return cls(path, grpc, timeout, encoding, tuple(metadata))


class Call:
    """One call: its stream's state, and the context its RPC coroutine gets (as grpc.aio's)."""

    __slots__ = ("sid", "conn", "path", "metadata", "deadline", "body", "encoding", "send_window",
                 "trailing", "task", "done", "started", "recv_window", "expect",
                 "reserved")  # fmt: skip

    def __init__(self, sid: int, conn: Connection, head: Head, send_window: int) -> None:
        self.sid, self.conn, self.path = sid, conn, head.path
        self.metadata = head.metadata
        self.started = time.monotonic()
        self.deadline = None if head.timeout_s is None else self.started + head.timeout_s
        self.body = bytearray()
        self.encoding = head.encoding
        self.send_window = send_window
        self.trailing: tuple = ()
        self.task: asyncio.Task | None = None
        self.done = False  # answered (or reset): nothing more is sent on it
        self.recv_window = conn.server.stream_window  # request bytes the client may still send
        self.expect = -1  # the whole request body's size, once its length prefix is in
        self.reserved = 0  # window granted beyond the first, out of the connection's budget

    # -- the context of grpc.aio's ServicerContext that the servicer uses --------------------
    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def set_trailing_metadata(self, trailing: tuple) -> None:
        self.trailing = tuple(trailing)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing: tuple = ()
    ) -> NoReturn:
        raise Abort(code, details, tuple(trailing))

    def peer(self) -> str:
        return self.conn.peer


class Connection(asyncio.BufferedProtocol):
    """One client's HTTP/2 connection."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.rbuf = bytearray(READ_CHUNK)
        self.rstart = self.rend = 0  # what is read and not yet parsed: rbuf[rstart:rend]
        self.preface = False
        self.decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self.heads: dict[bytes, Head] = {}  # see _head
        self.calls: dict[int, Call] = {}
        self.last_sid = 0  # the highest stream the client opened
        self.continuing: tuple[int, bytearray, int] | None = None  # (sid, block, flags)
        self.peer_window = DEFAULT_WINDOW  # the client's initial stream window
        self.peer_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW  # connection-level, toward the client
        self.unacked = 0  # request bytes received since the connection's last WINDOW_UPDATE
        self.recv_window = CONN_WINDOW  # request bytes the client may still send
        self.reserved = 0  # stream window granted beyond the first ones (see _reserve)
        self.waiting: deque[Call] = deque()  # calls waiting for such a grant, in order
        # answers with data left: waiting for the connection's window (`blocked`) or, parked,
        # for their own stream's; sid -> (data left, trailers)
        self.blocked: dict[int, tuple[memoryview, bytes]] = {}
        self.parked: dict[int, tuple[memoryview, bytes]] = {}
        self.settings_seen: deque[float] = deque()  # when the last SETTINGS frames came
        self.resets_seen: deque[float] = deque()  # when the last resets of started calls came
        self.out: list[bytes] = []
        self.flushing = False
        self.draining = False  # GOAWAY sent
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.born = time.monotonic()

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            family = "ipv6" if ":" in peer[0] else "ipv4"
            self.peer = f"{family}:{peer[0]}:{peer[1]}"
        self.server.connections.add(self)
        self.send(_frame(SETTINGS, 0, 0, self.server.settings_payload))
        self.send(_frame(WINDOW_UPDATE, 0, 0, (CONN_WINDOW - DEFAULT_WINDOW).to_bytes(4)))
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for call in self.calls.values():
            self._cancel(call)
        self.calls.clear()
        self.server.changed()

    def pause_writing(self) -> None:  # the client does not read: stop reading it too
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- reading: the kernel writes into our buffer; frames are parsed from views of it -------
    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self.rbuf) - self.rend < READ_CHUNK // 4:
            self._make_room()
        return memoryview(self.rbuf)[self.rend :]

    def _make_room(self) -> None:
        """A new buffer (views of the old one stay valid) that starts with what is unparsed and
        holds the frame in progress and a read more."""
        left = self.rend - self.rstart
        size = left + READ_ROOM
        if left >= 9 and self.preface:
            size = max(size, 9 + int.from_bytes(self.rbuf[self.rstart : self.rstart + 3]) + 1024)
        new = bytearray(size)
        new[:left] = self.rbuf[self.rstart : self.rend]
        self.rbuf, self.rstart, self.rend = new, 0, left

    def buffer_updated(self, nbytes: int) -> None:
        self.rend += nbytes
        buf, pos, end = self.rbuf, self.rstart, self.rend
        try:
            if not self.preface:
                pos = self._preface(buf, pos, end)
                if pos < 0:
                    return
            view = memoryview(buf)
            while end - pos >= 9:
                head, flags, sid = FRAME_HEADER.unpack_from(buf, pos)
                length, ftype = head >> 8, head & 0xFF
                if length > MAX_FRAME:
                    raise ConnectionError_(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - pos - 9 < length:
                    break
                payload = view[pos + 9 : pos + 9 + length]  # handlers copy what they keep
                pos += 9 + length
                self._frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                if self.closed:
                    return
        except ConnectionError_ as exc:
            self._fail(exc.code, str(exc))
            return
        except Exception:  # ours: end this connection cleanly, keep serving the others
            log.exception("gRPC connection %s: unexpected error", self.peer)
            self._fail(INTERNAL_ERROR, "internal error")
            return
        if pos == end:  # all parsed: the next read starts at the buffer's start again
            pos = self.rend = 0
            if len(buf) > 16 * READ_ROOM:  # a large frame is done: give its room back
                self.rbuf = bytearray(READ_CHUNK)
        self.rstart = pos
        self._acknowledge()

    def _preface(self, buf: bytearray, pos: int, end: int) -> int:
        """Where the frames start once the client's preface is in (-1 while it is not)."""
        got = bytes(buf[pos : min(end, pos + len(PREFACE))])
        if not PREFACE.startswith(got):
            raise ConnectionError_(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
        if len(got) < len(PREFACE):
            return -1
        self.preface = True
        return pos + len(PREFACE)

    # -- frames -----------------------------------------------------------------------------
    def _frame(self, ftype: int, flags: int, sid: int, payload: memoryview) -> None:
        if self.continuing is not None and ftype != CONTINUATION:
            raise ConnectionError_(PROTOCOL_ERROR, "a header block was interrupted")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if self.continuing is None or self.continuing[0] != sid:
                raise ConnectionError_(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            _, block, first = self.continuing
            block += payload
            if len(block) > MAX_HEADER_LIST * 2:
                raise ConnectionError_(PROTOCOL_ERROR, "header block too large")
            if flags & END_HEADERS:
                self.continuing = None
                self._header_block(sid, bytes(block), first)
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise ConnectionError_(PROTOCOL_ERROR, "malformed RST_STREAM")
            call = self.calls.pop(sid, None)
            if call is not None:
                if call.task is not None:  # its RPC had started: a flood of these costs work
                    _rate_limit(self.resets_seen, RESETS_PER_S, "calls reset")
                self._cancel(call)
                self.server.changed()
                self._close_if_idle()
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise ConnectionError_(PROTOCOL_ERROR, "malformed PING")
            if not flags & ACK:
                self.send(_frame(PING, ACK, 0, bytes(payload)))
        elif ftype == GOAWAY:
            self.draining = True  # the client will open no more calls
            self._close_if_idle()
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == PUSH_PROMISE:
            raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored

    def _headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0 or sid % 2 == 0:
            raise ConnectionError_(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        payload = self._unpad(flags, payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(sid, bytes(payload), flags)
        else:
            self.continuing = (sid, bytearray(payload), flags)

    def _head(self, block: bytes) -> Head:
        """A header block's call head. Blocks of one-byte indexed fields only change nothing in
        the HPACK table, so their heads are kept by their bytes (clients repeat them: gRPC's
        encoders index every header a call repeats, the deadline's value included); any other
        block may change the table, and empties that cache."""
        pure = not block.translate(None, ONE_BYTE_INDEXED)
        if pure:
            head = self.heads.get(block)
            if head is not None:
                return head
        else:
            self.heads.clear()
        try:  # always decoded: the HPACK table must stay in step with the client's
            headers = cast(list[tuple[str, str]], self.decoder.decode(block))
        except HPACKError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, f"header block: {exc}") from None
        head = Head.of(headers)
        if pure and len(self.heads) < 256:
            self.heads[block] = head
        return head

    def _header_block(self, sid: int, block: bytes, flags: int) -> None:
        head = self._head(block)
        call = self.calls.get(sid)
        if call is not None:  # trailers from the client: they end its half of the stream
            if not flags & END_STREAM:
                raise ConnectionError_(PROTOCOL_ERROR, "trailers without END_STREAM")
            if call.task is None and not call.done:
                self._dispatch(call, call.body)
            return
        if sid <= self.last_sid:
            raise ConnectionError_(STREAM_CLOSED, f"HEADERS on closed stream {sid}")
        self.last_sid = sid
        if self.draining or len(self.calls) >= MAX_STREAMS:  # clients retry REFUSED_STREAM
            self.send(_frame(RST_STREAM, 0, sid, REFUSED_STREAM.to_bytes(4)))
            return
        call = self.calls[sid] = Call(sid, self, head, self.peer_window)
        if not head.grpc:
            self._trailers_only(
                call,
                INVALID_ARGUMENT,
                "a gRPC call is a POST of application/grpc",
                status=b"\x08\x03415",
            )
        elif head.path not in self.server.methods:
            self._trailers_only(call, UNIMPLEMENTED, f"Method not found: {head.path}")
        elif head.encoding not in ("identity", "gzip", "deflate"):
            self._trailers_only(
                call,
                UNIMPLEMENTED,
                f"grpc-encoding '{head.encoding}' is not supported (supported: {ENCODINGS})",
            )
        elif flags & END_STREAM:
            self._dispatch(call, call.body)

    def _data(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)  # padding included: it counts against the windows
        self.unacked += size
        self.recv_window -= size
        if self.recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "DATA past the connection's window")
        call = self.calls.get(sid)
        if call is None or call.done:
            if sid > self.last_sid:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            return  # answered early (over a limit) or reset: dropped, still acknowledged
        if call.task is not None:
            raise ConnectionError_(STREAM_CLOSED, f"DATA after END_STREAM on stream {sid}")
        call.recv_window -= size
        if call.recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, f"DATA past stream {sid}'s window")
        data = self._unpad(flags, payload)
        if flags & END_STREAM and not call.body:  # the whole message in one frame: not copied
            self._dispatch(call, data)
            return
        call.body += data
        if call.expect < 0 and len(call.body) >= 5:
            call.expect = 5 + int.from_bytes(call.body[1:5])
            limit = self.server.max_message
            if call.expect - 5 > limit:
                self._refuse(
                    call,
                    RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({call.expect - 5} vs. {limit})",
                )
                return
            self._reserve(call)
        if len(call.body) > call.expect >= 0:
            self._refuse(call, INVALID_ARGUMENT, "a unary call carries exactly one request message")
            return
        if flags & END_STREAM:
            self._dispatch(call, call.body)

    def _refuse(self, call: Call, code: int, details: str) -> None:
        """Answer a call whose request is still coming, and tell the client to stop sending."""
        self._trailers_only(call, code, details)
        self.send(_frame(RST_STREAM, 0, call.sid, NO_ERROR.to_bytes(4)))

    def _reserve(self, call: Call) -> None:
        """A message larger than the first window gets the rest of its window at once, if the
        connection's budget (a few largest messages) allows, else when earlier ones are done:
        what a connection buffers stays bounded and the calls that have their window finish."""
        if not self._grant(call):
            self.waiting.append(call)

    def _grant(self, call: Call) -> bool:
        """Grant `call` the window its message still needs, if the budget allows (or it needs
        none); False leaves it waiting."""
        extra = call.expect - len(call.body) - call.recv_window
        if extra <= 0:
            return True
        if self.reserved and self.reserved + extra > self.server.budget:
            return False
        self.reserved += extra
        call.reserved = extra
        call.recv_window += extra
        self.send(_frame(WINDOW_UPDATE, 0, call.sid, extra.to_bytes(4)))
        return True

    @staticmethod
    def _unpad(flags: int, payload: memoryview) -> memoryview:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ConnectionError_(PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0 or len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "malformed SETTINGS")
        if flags & ACK:
            return
        _rate_limit(self.settings_seen, SETTINGS_PER_S, "SETTINGS frames")
        window = frame = None  # a frame's last value of each counts
        for at in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, at)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                window = value
            elif key == MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value < 1 << 24:
                    raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                frame = value
        if frame is not None:
            self.peer_frame = frame
        self.send(_frame(SETTINGS, ACK, 0))
        if window is not None and window != self.peer_window:
            delta, self.peer_window = window - self.peer_window, window
            for call in self.calls.values():
                call.send_window += delta
            if delta > 0:
                self._unpark(list(self.parked))

    def _window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        step = int.from_bytes(payload) & 0x7FFFFFFF
        if step == 0:
            raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        if sid == 0:
            self.send_window += step
            if self.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            self._pump()
            return
        call = self.calls.get(sid)
        if call is not None:
            call.send_window += step
            if call.send_window > MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, f"stream {sid}'s window overflow")
            if sid in self.parked:
                self._unpark([sid])

    def _acknowledge(self) -> None:
        """A WINDOW_UPDATE for the request bytes read, once they are a quarter of the window."""
        if self.unacked >= CONN_WINDOW // 4:
            self.send(_frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4)))
            self.recv_window += self.unacked
            self.unacked = 0

    # -- calls ------------------------------------------------------------------------------
    def _release(self, call: Call) -> None:
        """Forget a call's buffered message; its window grant goes to calls waiting for one."""
        if call.body:
            call.body = bytearray()
        if call.reserved:
            self.reserved -= call.reserved
            call.reserved = 0
            while self.waiting and not self.closed:
                first = self.waiting[0]
                if not (first.done or first.task is not None or self._grant(first)):
                    break
                self.waiting.popleft()

    def _dispatch(self, call: Call, body: Buffer) -> None:
        """The client's half is complete (`body`): decode its message and start its RPC."""
        rpc, request_class = self.server.methods[call.path]
        size = int.from_bytes(body[1:5]) if len(body) >= 5 else -1
        if size > self.server.max_message:
            self._trailers_only(
                call,
                RESOURCE_EXHAUSTED,
                f"Received message larger than max ({size} vs. {self.server.max_message})",
            )
        elif len(body) != 5 + size:
            self._trailers_only(
                call, INVALID_ARGUMENT, "a unary call carries exactly one request message"
            )
        else:
            self._start(call, rpc, request_class, memoryview(body)[5:], body[0])
        self._release(call)

    def _start(
        self, call: Call, rpc: RPC, request_class: Any, message: Buffer, compressed: int
    ) -> None:
        if compressed:
            try:
                message = self._inflate(call.encoding, message)
            except (zlib.error, ValueError) as exc:
                self._trailers_only(call, INVALID_ARGUMENT, f"cannot decompress the request: {exc}")
                return
            if len(message) > self.server.max_message:
                self._trailers_only(
                    call,
                    RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({len(message)}+ vs. "
                    f"{self.server.max_message})",
                )
                return
        try:
            request = request_class.FromString(message)
        except DecodeError as exc:
            self._trailers_only(
                call, INVALID_ARGUMENT, f"the request is not a valid protobuf message: {exc}"
            )
            return
        call.task = self.loop.create_task(self._run(call, rpc, request))

    def _inflate(self, encoding: str, message: Buffer) -> bytes:
        if encoding == "identity":
            raise ValueError("compressed flag set without a grpc-encoding")
        inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
        return inflater.decompress(message, self.server.max_message + 1)

    async def _run(self, call: Call, rpc: RPC, request: Any) -> None:
        try:
            response = await rpc(request, call)
            message = response.SerializeToString()
        except Abort as exc:
            self._trailers_only(call, exc.code.value[0], exc.details, exc.trailing)
        except asyncio.CancelledError:
            # reset by the client (nothing to answer), or cut at the end of shutdown's grace
            self._trailers_only(call, CANCELLED, "the server is shutting down")
        except Exception:
            log.exception("gRPC %s failed", call.path)
            self._trailers_only(call, INTERNAL, "internal error (logged by the server)")
        else:
            self._answer(call, message)
        finally:
            if call.sid not in self.blocked and call.sid not in self.parked:  # else kept for
                # its window until its data is out
                self.calls.pop(call.sid, None)
            self.server.changed()
            self._close_if_idle()

    def _cancel(self, call: Call) -> None:
        call.done = True
        self._release(call)
        self.blocked.pop(call.sid, None)
        self.parked.pop(call.sid, None)
        if call.task is not None:
            call.task.cancel()

    def _answer(self, call: Call, message: bytes) -> None:
        if call.done or self.closed:
            return
        call.done = True
        sid = call.sid
        data = b"\x00" + len(message).to_bytes(4) + message
        trailers = _trailers(0, "", call.trailing)
        size = len(data)
        if size <= call.send_window and size <= self.send_window and size <= self.peer_frame:
            call.send_window -= size
            self.send_window -= size
            self.send(
                _frame(HEADERS, END_HEADERS, sid, OK_HEADERS)
                + _frame(DATA, 0, sid, data)
                + _frame(HEADERS, END_HEADERS | END_STREAM, sid, trailers)
            )
            return
        self.send(_frame(HEADERS, END_HEADERS, sid, OK_HEADERS))
        self.blocked[sid] = (memoryview(data), trailers)
        self._pump()

    def _unpark(self, sids: list[int]) -> None:
        """Answers whose stream window grew wait for the connection's again."""
        for sid in sids:
            call = self.calls.get(sid)
            if call is not None and call.send_window > 0:
                self.blocked[sid] = self.parked.pop(sid)
        self._pump()

    def _pump(self) -> None:
        """Send what the windows allow of the answers waiting for them, in order; an answer
        whose own stream window is spent is parked until it grows."""
        moved: list[int] = []
        for sid, (data, trailers) in self.blocked.items():
            if self.send_window <= 0:
                break
            moved.append(sid)
            call = self.calls.get(sid)
            if call is None:
                continue
            while data and call.send_window > 0 and self.send_window > 0:
                n = min(len(data), call.send_window, self.send_window, self.peer_frame)
                self.send(_frame(DATA, 0, sid, bytes(data[:n])))
                data = data[n:]
                call.send_window -= n
                self.send_window -= n
            if data:
                if call.send_window > 0:  # the connection's window is spent: stays first
                    self.blocked[sid] = (data, trailers)
                    moved.pop()
                    break
                self.parked[sid] = (data, trailers)
            else:
                self.send(_frame(HEADERS, END_HEADERS | END_STREAM, sid, trailers))
                self.calls.pop(sid, None)
                self.server.changed()
        for sid in moved:
            del self.blocked[sid]
        self._close_if_idle()

    def _trailers_only(
        self, call: Call, code: int, details: str, trailing: tuple = (), status: bytes = b"\x88"
    ) -> None:
        """End the call with a status and no message (one HEADERS frame, END_STREAM)."""
        if call.done or self.closed:
            return
        call.done = True
        if call.task is None:  # answered before its RPC ran: forget it now
            self.calls.pop(call.sid, None)
            self._release(call)
        block = status + OK_HEADERS[1:] + _trailers(code, details[:MAX_DETAILS], trailing)
        self.send(_frame(HEADERS, END_HEADERS | END_STREAM, call.sid, block))
        self.server.changed()

    # -- writing, timers, the end -----------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue `data`; everything queued in one loop turn goes out in one write."""
        self.out.append(data)
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.out and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _arm(self) -> None:
        self.timer = self.loop.call_later(1.0, self._tick)

    def _tick(self) -> None:
        """The preface within header_timeout_s; each call's message within body_timeout_s."""
        now = time.monotonic()
        server = self.server
        if not self.preface:
            if now - self.born > server.header_timeout_s:
                self._fail(PROTOCOL_ERROR, "no connection preface in time")
                return
        for call in list(self.calls.values()):
            if call.task is None and not call.done and now - call.started > server.body_timeout_s:
                self._refuse(call, DEADLINE_EXCEEDED, "the request message did not arrive in time")
        if not self.closed:
            self._arm()

    def goaway(self) -> None:
        """Shutdown: no new calls (clients retry them elsewhere); close once idle."""
        if not self.draining and not self.closed:
            self.draining = True
            self.send(_frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4) + NO_ERROR.to_bytes(4)))
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.draining and not self.calls and not self.closed and self.transport is not None:
            self._flush()
            self.transport.close()

    def _fail(self, code: int, why: str) -> None:
        log.info("gRPC connection %s closed: %s", self.peer, why)
        if self.transport is None or self.closed:
            return
        self.out.append(
            _frame(GOAWAY, 0, 0, self.last_sid.to_bytes(4) + code.to_bytes(4) + why.encode()[:200])
        )
        self._flush()
        self.transport.close()
        self.closed = True
        for call in self.calls.values():
            self._cancel(call)
        self.calls.clear()
        self.server.changed()


class H2Server:
    """The listener(s), the served methods and the connections; `close` then `wait` to stop."""

    def __init__(self, settings: Settings, methods: Methods) -> None:
        self.loop = asyncio.get_running_loop()
        self.methods = methods
        self.max_message = settings.max_body_bytes
        self.header_timeout_s = settings.header_timeout_s
        self.body_timeout_s = settings.body_timeout_s
        self.stream_window = min(STREAM_WINDOW, settings.max_body_bytes + 5)
        # window granted beyond the first ones, on one connection: a few largest messages
        self.budget = 4 * (settings.max_body_bytes + 5)
        self.settings_payload = b"".join(
            struct.pack(">HI", key, value)
            for key, value in (
                (MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (INITIAL_WINDOW_SIZE, self.stream_window),
                (MAX_FRAME_SIZE, MAX_FRAME),
                (MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            )
        )
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._idle = asyncio.Event()
        self._closing = False  # `changed` looks at the connections only while shutting down

    def changed(self) -> None:
        """A call or connection ended: during shutdown, wake `wait` when nothing is left."""
        if self._closing and not any(c.calls for c in self.connections):
            self._idle.set()

    async def listen(
        self, host: str, port: int, tls: ssl.SSLContext | None, reuse_port: bool
    ) -> None:
        server = await self.loop.create_server(
            lambda: Connection(self),
            host.strip("[]"),
            port,
            ssl=tls,
            reuse_port=reuse_port or None,
            backlog=2048,
        )
        self._servers.append(server)

    def close(self) -> None:
        """Stop listening; GOAWAY to every connection (calls already opened go on)."""
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.goaway()

    async def wait(self, grace_s: float) -> None:
        """Wait for the open calls to finish, at most `grace_s`; then cut the rest."""
        deadline = time.monotonic() + grace_s
        while any(c.calls for c in self.connections):
            self._idle.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._idle.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
        cut = [c.task for n in self.connections for c in n.calls.values() if c.task is not None]
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut, timeout=1.0)
        await asyncio.sleep(0.05)  # the last answers' writes
        for conn in list(self.connections):
            conn._flush()
            if conn.transport is not None:  # a client that does not read is not waited for
                if conn.transport.get_write_buffer_size():
                    conn.transport.abort()
                else:
                    conn.transport.close()
        for server in self._servers:
            await server.wait_closed()


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server's TLS context: the HTTP server's certificate, ALPN h2 (gRPC requires it)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["h2"])
    return context
