"""onnxserve's own HTTP/2 gRPC server (service/grpc/h2server.py) in-process, against grpcio's
real client (the C core every gRPC user has): TLS with ALPN, compression, answers and requests
larger than a window or a frame, cancellation, deadlines, metadata both ways, statuses with
details and trailing metadata, shutdown; and raw sockets for what no client library sends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hpack import Decoder, Encoder

from service.config import Settings
from service.grpc import h2server
from service.grpc import messages as pb
from tests.conftest import self_signed_certificate

pytestmark = pytest.mark.unit
ECHO, SLOW, FAIL = (pb.method_path(m) for m in ("ModelInfer", "ServerLive", "ServerReady"))
MAX_BODY = 4 * 1024 * 1024


class Service:
    """Three RPCs: ModelInfer echoes its raw inputs as outputs (with what the call saw),
    ServerLive waits for `release`, ServerReady aborts with a status, details and a hint."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def echo(self, request, context):
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.raw_output_contents.extend(request.raw_input_contents)
        remaining = context.time_remaining()
        response.parameters["remaining"].string_param = "" if remaining is None else str(remaining)
        for key, value in context.invocation_metadata():
            response.parameters[f"md-{key}"].string_param = value
        context.set_trailing_metadata((("server-timing", "queue;dur=1"),))
        return response

    async def slow(self, request, context):
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return pb.ServerLiveResponse(live=True)

    async def fail(self, request, context):
        await context.abort(
            grpc.StatusCode.NOT_FOUND, "modèle 'x' 100% absent", (("retry-after", "2"),)
        )

    def methods(self) -> h2server.Methods:
        return {
            ECHO: (self.echo, pb.ModelInferRequest),
            SLOW: (self.slow, pb.ServerLiveRequest),
            FAIL: (self.fail, pb.ServerReadyRequest),
        }


@contextlib.asynccontextmanager
async def serving(
    service: Service, tls=None, **settings
) -> AsyncIterator[tuple[h2server.H2Server, int]]:
    """The server on a free loopback port, `(server, port)`; shut down (GOAWAY, drain) after."""
    settings = {"max_body_bytes": MAX_BODY, **settings}
    server = h2server.H2Server(Settings(**settings), service.methods())
    await server.listen("127.0.0.1", 0, tls, False)
    try:
        yield server, server._servers[0].sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait(1)


def rpc(channel: grpc.aio.Channel, path: str, request_class, response_class):
    return channel.unary_unary(
        path, request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )  # fmt: skip


def echo_request(*blobs: bytes, name: str = "m") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.raw_input_contents.extend(blobs)
    return request


async def test_answers_metadata_deadlines_and_many_concurrent_calls():
    service = Service()
    async with serving(service) as (server, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            call = echo(echo_request(b"abc"), metadata=(("authorization", "Bearer k"),), timeout=30)
            answer = await call
            assert list(answer.raw_output_contents) == [b"abc"]
            assert answer.parameters["md-authorization"].string_param == "Bearer k"
            assert 25 < float(answer.parameters["remaining"].string_param) <= 30
            assert ("server-timing", "queue;dur=1") in tuple(await call.trailing_metadata())
            no_deadline = await echo(echo_request(b""))
            assert no_deadline.parameters["remaining"].string_param == ""
            # 300 calls in flight on one connection, each with its own payload
            blobs = [i.to_bytes(4, "big") * (i % 7 + 1) for i in range(300)]
            answers = await asyncio.gather(*(echo(echo_request(b, name=str(i)))
                                             for i, b in enumerate(blobs)))  # fmt: skip
            assert [a.raw_output_contents[0] for a in answers] == blobs
            assert [a.model_name for a in answers] == [str(i) for i in range(300)]


async def test_larger_than_a_window_or_a_frame_both_ways_and_the_size_limit():
    service = Service()
    async with serving(service) as (server, port):
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
        ) as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            # 3 MB in (over our 1 MiB frame limit), 3 MB out (over the client's 64 KiB window)
            big = bytes(range(256)) * (3 * 4096)
            answers = await asyncio.gather(*(echo(echo_request(big, bytes([k]))) for k in range(4)))
            assert all(
                list(a.raw_output_contents) == [big, bytes([k])] for k, a in enumerate(answers)
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo(echo_request(b"x" * (MAX_BODY + 1)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in info.value.details()
            assert list((await echo(echo_request(b"after"))).raw_output_contents) == [b"after"]


@pytest.mark.parametrize("algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate])
async def test_compressed_requests(algorithm):
    service = Service()
    async with serving(service) as (server, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", compression=algorithm) as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            blob = b"compressible " * 10_000
            assert list((await echo(echo_request(blob))).raw_output_contents) == [blob]


async def test_statuses_unknown_methods_and_cancellation():
    service = Service()
    async with serving(service) as (server, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(channel, FAIL, pb.ServerReadyRequest, pb.ServerReadyResponse)(
                    pb.ServerReadyRequest()
                )
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert info.value.details() == "modèle 'x' 100% absent"
            assert ("retry-after", "2") in tuple(info.value.trailing_metadata())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await rpc(channel, "/inference.GRPCInferenceService/Nope", pb.ServerLiveRequest,
                          pb.ServerLiveResponse)(pb.ServerLiveRequest())  # fmt: skip
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # the client cancels: RST_STREAM reaches the RPC as a cancellation
            call = rpc(channel, SLOW, pb.ServerLiveRequest, pb.ServerLiveResponse)(
                pb.ServerLiveRequest()
            )
            await asyncio.wait_for(service.started.wait(), 5)
            call.cancel()
            await asyncio.wait_for(service.cancelled.wait(), 5)
            assert not any(c.calls for c in server.connections)


async def test_shutdown_finishes_open_calls_and_refuses_new_ones():
    service = Service()
    async with serving(service) as (server, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            slow = rpc(channel, SLOW, pb.ServerLiveRequest, pb.ServerLiveResponse)
            open_call = asyncio.ensure_future(slow(pb.ServerLiveRequest()))
            await asyncio.wait_for(service.started.wait(), 5)
            server.close()
            waiting = asyncio.ensure_future(server.wait(10))
            await asyncio.sleep(0.2)
            assert not waiting.done()  # the open call holds the server
            service.release.set()
            assert (await open_call).live
            await asyncio.wait_for(waiting, 5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await slow(pb.ServerLiveRequest(), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_with_alpn_h2(tmp_path: Path):
    cert, key = self_signed_certificate(tmp_path)
    service = Service()
    async with serving(service, h2server.tls_context(str(cert), str(key))) as (server, port):
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            assert list((await echo(echo_request(b"tls"))).raw_output_contents) == [b"tls"]


# -- raw sockets ---------------------------------------------------------------------------------
def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, sid) + payload


def read_frames(sock: socket.socket, until: float = 3.0) -> list[tuple[int, int, int, bytes]]:
    """Every frame the server sends before it closes (or `until` seconds pass)."""
    sock.settimeout(until)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    frames, pos = [], 0
    while len(data) - pos >= 9:
        head, flags, sid = struct.unpack_from(">IBI", data, pos)
        frames.append((head & 0xFF, flags, sid, data[pos + 9 : pos + 9 + (head >> 8)]))
        pos += 9 + (head >> 8)
    return frames


async def test_not_http2_and_broken_frames_end_the_connection_and_the_server_serves_on():
    service = Service()
    async with serving(service) as (server, port):
        loop = asyncio.get_running_loop()

        def exchange(data: bytes) -> list[tuple[int, int, int, bytes]]:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(data)
                return read_frames(sock)

        http1 = await loop.run_in_executor(None, exchange, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        goaway = [f for f in http1 if f[0] == h2server.GOAWAY]
        assert goaway and int.from_bytes(goaway[0][3][4:8]) == h2server.PROTOCOL_ERROR
        # DATA on a stream that was never opened
        broken = await loop.run_in_executor(
            None, exchange, h2server.PREFACE + frame(h2server.SETTINGS, 0, 0) + frame(0, 1, 7, b"x")
        )
        goaway = [f for f in broken if f[0] == h2server.GOAWAY]
        assert goaway and int.from_bytes(goaway[0][3][4:8]) == h2server.PROTOCOL_ERROR
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            assert list((await echo(echo_request(b"ok"))).raw_output_contents) == [b"ok"]


async def test_a_call_whose_message_never_comes_ends_at_the_body_timeout():
    service = Service()
    async with serving(service, body_timeout_s=1.0) as (server, port):
        opened = frame(h2server.HEADERS, h2server.END_HEADERS, 1, request_headers())  # no DATA
        frames = await asyncio.get_running_loop().run_in_executor(
            None, raw_exchange, port, opened, 3.5
        )
        trailers = [f for f in frames if f[0] == h2server.HEADERS and f[2] == 1]
        assert trailers and trailers[0][1] & h2server.END_STREAM
        fields = dict(Decoder().decode(trailers[0][3]))
        assert fields["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
        # NO_ERROR, not CANCEL: clients report the trailers' DEADLINE_EXCEEDED, not CANCELLED
        assert any(f[0] == h2server.RST_STREAM and f[2] == 1 and f[3] == bytes(4) for f in frames)


def test_grpc_timeout_and_message_encodings():
    assert h2server._timeout_s("100m") == pytest.approx(0.1)
    assert h2server._timeout_s("2S") == 2.0 and h2server._timeout_s("1H") == 3600.0
    assert h2server._timeout_s("123456789S") is None  # 9 digits
    assert h2server._timeout_s("5x") is None and h2server._timeout_s("") is None
    assert h2server._percent("a 100% é\n") == b"a 100%25 %C3%A9%0A"
    block = h2server.OK_HEADERS + h2server._trailers(5, "não", (("retry-after", "1"),))
    assert Decoder().decode(block) == [(":status", "200"), ("content-type", "application/grpc"),
                                       ("grpc-status", "5"), ("grpc-message", "n%C3%A3o"),
                                       ("retry-after", "1")]  # fmt: skip
    long = "k" * 300  # a length past HPACK's 7-bit prefix
    assert Decoder().decode(h2server._literal("x-long", long)) == [("x-long", long)]


def request_headers(path: str = ECHO, extra: list[tuple[str, str]] = ()) -> bytes:
    return Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                             (":authority", "x"), ("content-type", "application/grpc"),
                             *extra])  # fmt: skip


def raw_exchange(port: int, frames: bytes, until: float = 3.0) -> list[tuple[int, int, int, bytes]]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(h2server.PREFACE + frame(h2server.SETTINGS, 0, 0) + frames)
        return read_frames(sock, until)


def goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    codes = [int.from_bytes(f[3][4:8]) for f in frames if f[0] == h2server.GOAWAY]
    return codes[0] if codes else None


async def test_many_large_requests_on_one_connection_all_get_their_window():
    """More near-maximal requests than the connection's budget of granted window: the first get
    theirs at once, the rest as those finish; none stalls (the body timeout would end it)."""
    service = Service()
    async with serving(service, body_timeout_s=4.0) as (server, port):
        big = MAX_BODY - 64
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", -1)]
        ) as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            blobs = [bytes([k]) * big for k in range(12)]
            answers = await asyncio.gather(*(echo(echo_request(b), timeout=30) for b in blobs))
            assert [a.raw_output_contents[0] for a in answers] == blobs
            conn = next(iter(server.connections))
            assert conn.reserved == 0 and not conn.waiting


async def test_flow_control_and_framing_violations():
    service = Service()
    async with serving(service) as (server, port):
        run = asyncio.get_running_loop().run_in_executor
        prefix = (4 * 1024 * 1024).to_bytes(4)  # 4 MiB declared: the budget grants four at once

        # a body longer than its length prefix: INVALID_ARGUMENT, the stream reset, the rest served
        longer = (frame(h2server.HEADERS, 4, 1, request_headers())
                  + frame(h2server.DATA, 0, 1, b"\x00" + (3).to_bytes(4) + b"abcdef")
                  + frame(h2server.HEADERS, 4, 3, request_headers())
                  + frame(h2server.DATA, 1, 3, b"\x00" + (0).to_bytes(4)))  # fmt: skip
        frames = await run(None, raw_exchange, port, longer)
        first = [Decoder().decode(f[3]) for f in frames if f[0] == h2server.HEADERS and f[2] == 1]
        assert ("grpc-status", "3") in first[0] and goaway_code(frames) is None
        assert any(f[0] == h2server.RST_STREAM and f[2] == 1 and f[3] == bytes(4) for f in frames)
        assert any(f[0] == h2server.DATA and f[2] == 3 for f in frames)  # stream 3 answered

        # the fifth such stream waits for window; sending past its first window is an error
        opened = b"".join(frame(h2server.HEADERS, 4, sid, request_headers())
                          + frame(h2server.DATA, 0, sid, b"\x00" + prefix)
                          for sid in (1, 3, 5, 7, 9))  # fmt: skip
        granted = await run(None, raw_exchange, port, opened, 1.0)
        grants = {f[2] for f in granted if f[0] == h2server.WINDOW_UPDATE and f[2]}
        assert grants == {1, 3, 5, 7}
        over = opened + frame(h2server.DATA, 0, 9, bytes(h2server.STREAM_WINDOW))
        assert goaway_code(await run(None, raw_exchange, port, over)) == h2server.FLOW_CONTROL_ERROR

        # SETTINGS floods (each may touch every call) are refused
        flood = frame(h2server.SETTINGS, 0, 0) * (h2server.SETTINGS_PER_S + 10)
        assert goaway_code(await run(None, raw_exchange, port, flood)) == h2server.ENHANCE_YOUR_CALM

        # an empty header name is metadata like any other, not a crash
        odd = Encoder().encode([("", "v")])
        frames = await run(None, raw_exchange, port,
                           frame(h2server.HEADERS, 4, 1, request_headers() + odd)
                           + frame(h2server.DATA, 1, 1, b"\x00" + (0).to_bytes(4)))  # fmt: skip
        assert (
            any(f[0] == h2server.DATA and f[2] == 1 for f in frames) and goaway_code(frames) is None
        )


async def test_a_small_message_limit_still_serves():
    """max_body_bytes under HTTP/2's default windows (the config allows 1 KiB)."""
    async with serving(Service(), max_body_bytes=2048) as (server, port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = rpc(channel, ECHO, pb.ModelInferRequest, pb.ModelInferResponse)
            assert list((await echo(echo_request(b"small"))).raw_output_contents) == [b"small"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo(echo_request(bytes(3000)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_rapid_reset_flood_ends_the_connection():
    """Calls started and reset at once (CVE-2023-44487's pattern) cost work each: past
    RESETS_PER_S a second the connection ends with ENHANCE_YOUR_CALM."""
    service = Service()
    async with serving(service) as (server, port):
        block = request_headers(SLOW)
        calls = b"".join(
            frame(h2server.HEADERS, 4, sid, block)
            + frame(h2server.DATA, 1, sid, b"\x00" + (0).to_bytes(4))
            + frame(h2server.RST_STREAM, 0, sid, (8).to_bytes(4))
            for sid in range(1, 2 * (h2server.RESETS_PER_S + 50), 2)
        )
        frames = await asyncio.get_running_loop().run_in_executor(None, raw_exchange, port, calls)
        assert goaway_code(frames) == h2server.ENHANCE_YOUR_CALM
