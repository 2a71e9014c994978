"""The direct lane (infer routes served from the HTTP protocol's callbacks) on the wire: refusals
before the body is read, pipelining, interim 100 Continue, bodies that grow past the limit, and
the access log, with raw sockets against a real server."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx
import numpy as np
import orjson
import pytest

from service.codec import encode_request
from tests.conftest import run_server
from tests.test_server import _metric, reference

pytestmark = pytest.mark.e2e


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


class Reader:
    """HTTP/1.1 responses read off a raw socket (content-length bodies)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body


def _head(path: str, length: int, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {length}", *extra]  # fmt: skip
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def _post(path: str, body: bytes) -> bytes:
    return _head(path, len(body)) + body


def _cnn_request(rid: str, seed: int) -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(seed).random((1, 1, 28, 28), dtype=np.float32)
    doc = {"id": rid, "inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                  "data": x.ravel().tolist()}]}  # fmt: skip
    return orjson.dumps(doc), x


def test_a_refusal_is_sent_before_the_body_and_the_connection_goes_on(server):
    body, _ = _cnn_request("after", 0)
    with _connect(server.url) as sock:
        reader = Reader(sock)
        # headers for a model that does not exist, announcing a body that has not been sent
        sock.sendall(_head("/v2/models/nope/infer", 50000))
        sock.settimeout(5)
        start = time.monotonic()
        status, headers, error = reader.response()
        assert status == 404 and "nope" in orjson.loads(error)["error"]
        assert time.monotonic() - start < 2
        assert headers.get("connection") != "close"
        sock.sendall(b"0" * 50000)  # the announced body is read and dropped
        sock.sendall(_post("/v2/models/cnn/infer", body))
        status, _, answer = reader.response()
        assert status == 200 and orjson.loads(answer)["id"] == "after"


def test_pipelined_requests_are_answered_in_order(server, repository):
    import onnxruntime as ort

    from service.model_config import latest_version_dir

    model = latest_version_dir(repository / "cnn")
    session = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    requests = [_cnn_request(f"r{i}", i) for i in range(6)]
    wire = b"".join(_post("/v2/models/cnn/infer", body) for body, _ in requests)
    with _connect(server.url) as sock:
        sock.sendall(wire)  # six requests in one write
        reader = Reader(sock)
        for i, (_, x) in enumerate(requests):
            status, _, answer = reader.response()
            doc = orjson.loads(answer)
            assert status == 200 and doc["id"] == f"r{i}"
            probabilities = next(o for o in doc["outputs"] if o["name"] == "probabilities")
            expected = session.run(["probabilities"], {"image": x})[0]
            np.testing.assert_allclose(probabilities["data"], expected.ravel(), rtol=1e-4,
                                       atol=1e-6)  # fmt: skip


def test_answers_keep_their_order_across_the_lane_the_app_and_a_closing_request(server):
    """Lane answers wait for the end of the loop's turn (the outbox): a refusal, an answer from
    the ASGI app and a last request that closes the connection, all sent in one write, still
    come back in order, and a closing request's answer is sent whole before the close."""
    first, _ = _cnn_request("first", 3)
    last, _ = _cnn_request("last", 4)
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    closing = _head("/v2/models/cnn/infer", len(last), "Connection: close") + last
    wire = _post("/v2/models/cnn/infer", first) + _post("/v2/models/nope/infer", b"{}")
    with _connect(server.url) as sock:
        sock.sendall(wire + ready + closing)
        reader = Reader(sock)
        status, _, answer = reader.response()
        assert status == 200 and orjson.loads(answer)["id"] == "first"
        status, _, error = reader.response()
        assert status == 404 and "nope" in orjson.loads(error)["error"]
        status, _, health = reader.response()
        assert status == 200 and orjson.loads(health)["ready"] is True
        status, headers, answer = reader.response()
        assert status == 200 and orjson.loads(answer)["id"] == "last"
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # and then the server closed it
    with _connect(server.url) as sock:  # alone, the closing request is the lane's own
        sock.sendall(closing)
        status, headers, answer = Reader(sock).response()
        assert status == 200 and orjson.loads(answer)["id"] == "last"
        assert headers["connection"] == "close" and sock.recv(1) == b""


def test_keep_alive_closes_an_idle_connection_but_not_a_busy_one(repository, tmp_path):
    """One keep-alive timer serves all of a connection's requests: a connection that sends a
    request every 0.4 s for longer than the 1 s timeout stays open, and once left idle it is
    closed about a timeout after its last answer."""
    body, _ = _cnn_request("kept", 5)
    with (
        run_server(repository, tmp_path, "--keep-alive-timeout-s", "1") as srv,
        _connect(srv.url) as sock,
    ):
        reader = Reader(sock)
        for _ in range(6):  # 2.4 s of requests
            sock.sendall(_post("/v2/models/cnn/infer", body))
            status, headers, answer = reader.response()
            assert status == 200 and orjson.loads(answer)["id"] == "kept"
            assert headers.get("connection") != "close"
            time.sleep(0.4)
        start = time.monotonic()
        assert sock.recv(1) == b""  # closed by the server
        assert time.monotonic() - start < 2.0


def test_interim_100_continue_then_the_answer_and_a_refusal_without_it(server):
    body, _ = _cnn_request("continued", 1)
    with _connect(server.url) as sock:
        reader = Reader(sock)
        sock.sendall(_head("/v2/models/cnn/infer", len(body), "Expect: 100-continue"))
        status, _, _ = reader.response()
        assert status == 100
        sock.sendall(body)
        status, _, answer = reader.response()
        assert status == 200 and orjson.loads(answer)["id"] == "continued"
    with _connect(server.url) as sock:
        reader = Reader(sock)
        sock.sendall(_head("/v2/models/nope/infer", 10, "Expect: 100-continue"))
        status, headers, _ = reader.response()  # no 100: the refusal, and the connection ends
        assert status == 404 and headers["connection"] == "close"


def test_a_chunked_body_that_grows_past_the_limit_is_413(repository, tmp_path):
    env = {"ONNXSERVE_MAX_BODY_BYTES": "100000", "ONNXSERVE_MAX_JSON_BODY_BYTES": "20000"}
    with run_server(repository, tmp_path, env=env) as srv, _connect(srv.url) as sock:
        reader = Reader(sock)
        head = ("POST /v2/models/cnn/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode())
        for _ in range(5):  # 25 KB of JSON, no length announced
            sock.sendall(b"1388\r\n" + b" " * 5000 + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        status, _, error = reader.response()
        assert status == 413 and "max_json_body_bytes" in orjson.loads(error)["error"]
        # binary bodies may go further: the same size as binary tensors is taken
        x = np.zeros((8, 1, 28, 28), np.float32)  # 25 KB of tensor data
        wire, header_len = encode_request({"image": x}, binary_output=False)
        r = httpx.post(f"{srv.url}/v2/models/cnn/infer", content=wire,
                       headers={"Inference-Header-Content-Length": str(header_len)})  # fmt: skip
        assert r.status_code == 200, r.text


def test_the_access_log_names_the_key_of_a_lane_request(repository, tmp_path):
    keys = tmp_path / "keys.json"
    key = {"name": "scorer", "key": "k-0123456789abcdef", "scopes": ["infer"]}
    keys.write_bytes(orjson.dumps({"keys": [key]}))
    env = {"ONNXSERVE_ACCESS_LOG": "true"}
    body, _ = _cnn_request("logged", 2)
    with run_server(repository, tmp_path, "--api-keys-file", str(keys), env=env) as srv:
        url = f"{srv.url}/v2/models/cnn/infer"
        assert httpx.post(url, content=body).status_code == 401
        ok = httpx.post(url, content=body, headers={"Authorization": "Bearer k-0123456789abcdef"})
        assert ok.status_code == 200
        time.sleep(0.2)
        log = srv.log.read_text()
    assert '"POST /v2/models/cnn/infer" 401 key=-' in log
    assert '"POST /v2/models/cnn/infer" 200 key=scorer' in log
    assert "k-0123456789abcdef" not in log


FULL_LSTM = {"ONNXSERVE_MODEL_OVERRIDES": '{"lstm": {"max_batch_size": 1, "max_queue_size": 1, '
             '"max_dim": 400000, "max_elements": 400000}}'}  # fmt: skip


def _lstm_body(steps: int) -> bytes:
    window = np.linspace(300, 420, steps, dtype=np.float32).reshape(1, -1, 1)
    doc = {"inputs": [{"name": "series", "shape": list(window.shape), "datatype": "FP32",
                       "data": window.ravel().tolist()}]}  # fmt: skip
    return orjson.dumps(doc)


def _fill_lstm_queue(url: str, compute_ms: float) -> list[socket.socket]:
    """Two LSTM requests of about `compute_ms` each on a server started with FULL_LSTM: one
    runs, one fills the queue of 1. Their connections, to read the answers from."""
    probe = httpx.post(f"{url}/v2/models/lstm/infer", content=_lstm_body(20_000), timeout=60)
    ms = float(probe.headers["server-timing"].split("compute;dur=")[1].split(",")[0])
    steps = int(20_000 * min(20.0, max(1.0, compute_ms / ms)))
    window = np.linspace(300, 420, steps, dtype=np.float32).reshape(1, -1, 1)
    body, header_len = encode_request({"series": window}, binary_output=False)
    length = f"Inference-Header-Content-Length: {header_len}"
    busy = [_connect(url) for _ in range(2)]
    for sock in busy:
        sock.sendall(_head("/v2/models/lstm/infer", len(body), length) + body)
    time.sleep(0.2)
    return busy


def _refused_then_resent(url: str) -> tuple[socket.socket, Reader]:
    """A client refused for the full queue at once, which re-sends at once (Retry-After
    ignored): its retry now waits unread."""
    sock = _connect(url)
    reader = Reader(sock)
    start = time.monotonic()
    sock.sendall(_post("/v2/models/lstm/infer", _lstm_body(64)))
    status, headers, _ = reader.response()
    assert status == 503 and headers["retry-after"] == "1"
    assert time.monotonic() - start < 0.2  # refused at once
    sock.sendall(_post("/v2/models/lstm/infer", _lstm_body(64)))
    return sock, reader


def test_a_client_refused_for_a_full_queue_that_resends_at_once_is_served_when_room_comes(
    repository, tmp_path
):
    with run_server(repository, tmp_path, env=FULL_LSTM) as srv:
        busy = _fill_lstm_queue(srv.url, 600)
        sock, reader = _refused_then_resent(srv.url)
        with sock:
            status, _, answer = reader.response()
            assert status == 200, answer  # read once there was room, into the slot held for it
        for sock in busy:
            assert Reader(sock).response()[0] == 200
            sock.close()


def test_sigterm_answers_a_retry_that_waits_unread(repository, tmp_path):
    with run_server(repository, tmp_path, env=FULL_LSTM) as srv:
        busy = _fill_lstm_queue(srv.url, 1500)
        sock, reader = _refused_then_resent(srv.url)
        srv.process.send_signal(signal.SIGTERM)  # while the retry waits in the kernel's buffers
        with sock:
            status, headers, _ = reader.response()  # answered (not reset), and the connection ends
            assert status in (200, 503) and headers["connection"] == "close"
        for sock in busy:
            assert Reader(sock).response()[0] == 200
            sock.close()
        assert srv.process.wait(timeout=30) == 0


def test_on_one_cpu_batches_run_on_the_loop_and_a_burst_still_merges(repository, tmp_path):
    """A server confined to one CPU says that its batches run on the event loop; 64 requests
    sent at once on 64 connections each get their own answer, and they share batches (a batch
    run the moment its request was read would leave one execution per request). That the runs
    are on the loop is tests/test_batcher.py's to show."""
    cpu = str(min(os.sched_getaffinity(0)))
    with run_server(repository, tmp_path, "--models", "cnn", cpus=cpu) as srv:
        assert "one CPU: batches expected to take under 5 ms run on the event loop" in srv.output()
        first, _ = _cnn_request("warm", 0)  # the shape's first run, in the thread, measures it
        with _connect(srv.url) as sock:
            sock.sendall(_post("/v2/models/cnn/infer", first))
            assert Reader(sock).response()[0] == 200
        before = httpx.get(f"{srv.url}/metrics").text
        requests = [_cnn_request(f"r{i}", i) for i in range(64)]
        socks = [_connect(srv.url) for _ in requests]
        for sock, (body, _) in zip(socks, requests, strict=True):
            sock.sendall(_post("/v2/models/cnn/infer", body))
        answers = []
        for sock in socks:
            with sock:
                answers.append(Reader(sock).response())
        after = httpx.get(f"{srv.url}/metrics").text
    want = reference(repository, "cnn", np.concatenate([x for _, x in requests]))
    for i, (status, _, body) in enumerate(answers):
        assert status == 200, body
        doc = orjson.loads(body)
        assert doc["id"] == f"r{i}"
        got = {o["name"]: o["data"] for o in doc["outputs"]}
        assert got["label"] == [int(want["label"][i])]
        np.testing.assert_allclose(got["probabilities"], want["probabilities"][i], atol=1e-6)
    rows, execs = (
        _metric(after, name, "cnn") - _metric(before, name, "cnn")
        for name in ("onnxserve_inference_count_total", "onnxserve_inference_exec_count_total")
    )
    assert rows == 64 and execs < rows, (rows, execs)
