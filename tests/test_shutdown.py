"""Timeouts and shutdown against a real server: stalled uploads are cut off with a 408, and
SIGTERM under load answers every request it has (connections still in the accept queue too),
never resets one, and exits 0 in time."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvloop

from service.httpserver import AcceptAll
from tests.conftest import run_server, self_signed_certificate

e2e, unit = pytest.mark.e2e, pytest.mark.unit


def _cnn_body() -> dict:
    x = np.zeros((1, 1, 28, 28), np.float32)
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@e2e
def test_stalled_headers_and_bodies_get_a_408_and_the_connection_closes(repository, tmp_path):
    flags = ("--header-timeout-s", "1", "--body-timeout-s", "1")
    with run_server(repository, tmp_path, *flags) as srv:
        body = _raw(srv.url)
        body.sendall(
            b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n" + b"{" * 100
        )
        start = time.monotonic()
        answer = _read_all(body)
        assert answer.startswith(b"HTTP/1.1 408") and b"body" in answer
        assert time.monotonic() - start < 5
        headers = _raw(srv.url)
        headers.sendall(b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
        answer = _read_all(headers)
        assert answer.startswith(b"HTTP/1.1 408") and b"headers" in answer
        assert httpx.get(f"{srv.url}/v2/health/live").status_code == 200


class Client(threading.Thread):
    """A keep-alive client sending requests back to back; it stops at the first connection
    refused (the server closed its listener). A request that is reset or left unanswered after
    it was sent counts as lost."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.statuses: Counter[int] = Counter()
        self.lost: list[str] = []

    def run(self) -> None:
        body = _cnn_body()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            for _ in range(100_000):
                try:
                    r = client.post("/v2/models/cnn/infer", json=body)
                except httpx.ConnectError:
                    return  # never sent: the listener is closed
                except httpx.TransportError as exc:
                    self.lost.append(repr(exc))
                    return
                self.statuses[r.status_code] += 1


@e2e
def test_sigterm_under_load_answers_everything_and_exits_0(repository, tmp_path):
    with run_server(repository, tmp_path, "--graceful-timeout-s", "5") as srv:
        clients = [Client(srv.url) for _ in range(16)]
        for c in clients:
            c.start()
        time.sleep(1.5)
        # a stalled upload must not hold the shutdown past the graceful timeout
        stalled = _raw(srv.url)
        stalled.sendall(
            b"POST /v2/models/cnn/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"
        )
        sent = time.monotonic()
        srv.process.send_signal(signal.SIGTERM)
        code = srv.process.wait(timeout=30)
        took = time.monotonic() - sent
        for c in clients:
            c.join(timeout=30)
    answered = sum((c.statuses for c in clients), Counter())
    lost = [e for c in clients for e in c.lost]
    assert code == 0, srv.output()[-2000:]
    assert not lost, f"{len(lost)} requests lost: {lost[:3]}"
    assert answered[200] > 100 and set(answered) <= {200, 503}, answered
    assert took <= 5 + 1 + 1.5, f"shutdown took {took:.1f} s"  # graceful + 1 s (+ drain, slack)


@e2e
def test_responses_without_a_body_and_interim_100_continue_are_not_held(server):
    with httpx.Client(base_url=server.url, timeout=5) as client:  # one keep-alive connection
        head = client.head("/v2/health/live")
        assert head.status_code == 405 and head.content == b""
        assert client.get("/v2/health/live").status_code == 200
        body = _cnn_body()
        r = client.post("/v2/models/cnn/infer", json=body, headers={"Expect": "100-continue"})
        assert r.status_code == 200


class _Recorder(asyncio.Protocol):
    """Records what the listener does with a connection."""

    made: list[_Recorder] = []

    def __init__(self) -> None:
        self.drained = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _Recorder.made.append(self)

    def shutdown(self) -> None:
        self.drained += 1


def _tls_pair(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate, and a client context trusting it."""
    cert, key = self_signed_certificate(tmp)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@unit
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_closing_the_listener_accepts_the_queued_connections_and_drains_them(tls, tmp_path):
    """A connection whose handshake the kernel finished (its request may be on the wire) when
    the server stops listening is accepted and drained, not reset with the socket; under TLS
    too, once its TLS handshake is done (the server waits for that before it stops waiting)."""
    server_ctx, client_ctx = _tls_pair(tmp_path) if tls else (None, None)
    done = threading.Event()

    def client(address: tuple[str, int]) -> None:
        sock = socket.create_connection(address, timeout=10)
        if client_ctx is not None:  # blocks until the server takes part in the handshake
            sock = client_ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        done.wait(10)
        sock.close()

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        accept = AcceptAll(asyncio.get_running_loop(), listener, _Recorder, server_ctx, 16)
        clients = [threading.Thread(target=client, args=(listener.getsockname(),)) for _ in "abc"]
        for c in clients:
            c.start()
        time.sleep(0.3)  # the loop is held: the kernel queues the three connections
        accept.close()  # before the loop ever saw the listener ready
        listener.close()
        await asyncio.wait_for(accept.started(), 10)
        done.set()
        for c in clients:
            c.join(10)

    _Recorder.made = []
    uvloop.run(main())
    assert [p.drained for p in _Recorder.made] == [1, 1, 1]
