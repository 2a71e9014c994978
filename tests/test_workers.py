"""`onnxserve serve --workers 2` as clients see it: one server. Metrics and Triton statistics are
totals, an explicit load or unload reaches every worker, a job runs once (and is taken over when
its worker dies), a killed worker is restarted while the other keeps answering, readiness waits
for every worker, and SIGTERM under load answers every admitted request and exits 0. Which
worker answered a request is read from /proc: the worker process holding the server side of the
client's connection."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtests.serverproc import free_port, serve_command
from service.config import Settings
from service.stats import ModelStats, merge_triton
from service.workers import worker_count, worker_threads
from service.workerstate import FOLLOW_S
from tests.conftest import run_server
from tests.test_jobs import committed, wait_for
from tests.test_scoring import assert_same_answers, read_output, rows_of, score
from tests.test_shutdown import Client, _cnn_body

WORKERS = ("--workers", "2", "--models", "cnn")
CNN = "/v2/models/cnn/infer"


# -- which worker holds a connection ---------------------------------------------------------------
def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (spawned children running the server)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == supervisor and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return sorted(found)


def served_by(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The pid among `pids` holding the server side of the connection from `client_port`."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if int(local, 16) == server_port and int(remote, 16) == client_port:
            inode = fields[9]
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
        except OSError:
            continue
    return None


class Connection:
    """One keep-alive HTTP connection and the worker that serves it."""

    def __init__(self, url: str, pids: list[int]) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.conn = http.client.HTTPConnection(host, self.port, timeout=30)
        self.pids = pids
        self.pid: int | None = None

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        if body is None and method == "POST":
            body = {}  # a POST that changes nothing still goes as JSON (service.security)
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        self.conn.request(method, path, body=data, headers=headers)
        answer = self.conn.getresponse()
        content = answer.read()
        if self.pid is None:
            self.pid = served_by(self.port, self.conn.sock.getsockname()[1], self.pids)
        return answer.status, content

    def close(self) -> None:
        self.conn.close()


def ask_every_worker(url: str, pids: list[int], method: str, path: str, tries: int = 60) -> dict:
    """Send the request on new connections until every worker has answered it: the answers
    (status, body) by worker pid."""
    answers: dict[int, list[tuple[int, bytes]]] = {}
    for _ in range(tries):
        c = Connection(url, pids)
        answer = c.request(method, path)
        c.close()
        if c.pid is not None:
            answers.setdefault(c.pid, []).append(answer)
        if set(answers) == set(pids) and min(map(len, answers.values())) >= 2:
            break
    assert set(answers) == set(pids), f"only workers {sorted(answers)} of {pids} answered"
    return answers


def bodies(answers: dict) -> list:
    """Every answer's JSON body (answers of `ask_every_worker`)."""
    return [json.loads(body) for a in answers.values() for _, body in a]


def success_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.findall(r'^onnxserve_request_success_total\{model="cnn",.*\} (\S+)$', text, re.M)
    return sum(map(float, found))


# -- unit ---------------------------------------------------------------------------------------
@pytest.mark.unit
def test_threads_are_divided_between_workers():
    assert worker_threads(Settings(), 2, 2) == 1
    assert worker_threads(Settings(), 4, 16) == 4
    assert worker_threads(Settings(intra_op_threads=2), 4, 16) == 2
    assert worker_threads(Settings(intra_op_threads=8), 4, 16) == 4  # lowered to the share
    assert worker_threads(Settings(), 3, 2) == 1
    assert worker_count(Settings(workers=3)) == 3
    assert worker_count(Settings(workers="auto", providers=["CPUExecutionProvider"])) == len(
        os.sched_getaffinity(0)
    )


@pytest.mark.unit
def test_statistics_of_several_workers_merge_into_what_one_would_have_counted():
    a, b, together = ModelStats(), ModelStats(), ModelStats()
    events = [
        (a, 1, 1, 10, 100, 5),
        (b, 3, 4, 20, 300, 7),
        (b, 1, 1, 11, 90, 6),
        (a, 2, 8, 9, 700, 8),
    ]
    for worker, requests, rows, input_ns, infer_ns, output_ns in events:
        for stats in (worker, together):
            stats.batch(requests, rows, input_ns, infer_ns, output_ns)
            stats.succeeded(0.002, 0.001)
    b.failed(0.003)
    together.failed(0.003)
    merged = merge_triton([a.triton("cnn", "1"), b.triton("cnn", "1")])
    expected = together.triton("cnn", "1")
    assert merged.pop("last_inference") >= expected.pop("last_inference") - 1000
    assert merged == expected
    assert [s["batch_size"] for s in merged["batch_stats"]] == [1, 4, 8]


# -- one server, several checks ---------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs_root(repository, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers-jobs")
    np.save(root / "small.npy", rows_of(repository, "cnn", 3000))
    np.save(root / "big.npy", rows_of(repository, "cnn", 24_000))
    return root


@pytest.fixture(scope="module")
def workers(repository, jobs_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    flags = ("--model-control-mode", "explicit", "--load-model", "cnn")
    env = {"ONNXSERVE_JOBS_ROOT": str(jobs_root), "ONNXSERVE_UNSAFE_ANONYMOUS_ADMIN": "true"}
    with run_server(repository, tmp, *WORKERS, *flags, env=env) as server:
        server.pids = worker_pids(server.process.pid)
        assert len(server.pids) == 2, server.output()[-2000:]
        yield server


def infer_on_every_worker(url: str, pids: list[int]) -> int:
    """CNN requests over new connections until every worker has answered some: how many."""
    sent, seen = 0, set()
    for _ in range(40):
        c = Connection(url, pids)
        for _ in range(5):
            status, _ = c.request("POST", CNN, _cnn_body())
            assert status == 200
            sent += 1
        seen.add(c.pid)
        c.close()
        if seen == set(pids):
            break
    assert seen == set(pids)
    return sent


@pytest.mark.e2e
def test_metrics_are_totals_across_workers(workers):
    before = success_total(workers.url)
    sent = infer_on_every_worker(workers.url, workers.pids)
    assert success_total(workers.url) - before == sent
    text = httpx.get(f"{workers.url}/metrics").text
    assert "onnxserve_worker_restarts_total 0.0" in text
    assert len(re.findall(r"^onnxserve_saturation\{", text, re.M)) == 1  # one series, not per pid


@pytest.mark.e2e
def test_triton_statistics_are_totals_across_workers(workers):
    def successes() -> set[int]:
        """The CNN's success count as each worker answers it, once all have published."""
        time.sleep(4 * FOLLOW_S)
        answers = ask_every_worker(workers.url, workers.pids, "GET", "/v2/models/cnn/stats")
        return {
            doc["model_stats"][0]["inference_stats"]["success"]["count"] for doc in bodies(answers)
        }

    before = successes()
    assert len(before) == 1, before  # every worker answers the same total
    sent = infer_on_every_worker(workers.url, workers.pids)
    assert successes() == {before.pop() + sent}


@pytest.mark.e2e
def test_explicit_load_and_unload_reach_every_worker(workers):
    ready = "/v2/models/lstm/ready"
    assert httpx.post(f"{workers.url}/v2/repository/models/lstm/load", json={}).status_code == 200
    answers = ask_every_worker(workers.url, workers.pids, "GET", ready)
    assert {status for a in answers.values() for status, _ in a} == {200}, answers
    assert httpx.post(f"{workers.url}/v2/repository/models/lstm/unload", json={}).status_code == 200
    answers = ask_every_worker(workers.url, workers.pids, "GET", ready)
    assert {status for a in answers.values() for status, _ in a} == {503}, answers
    index = ask_every_worker(workers.url, workers.pids, "POST", "/v2/repository/index")
    states = {json.dumps(entries) for entries in bodies(index)}
    assert len(states) == 1, states  # the same index from every worker


@pytest.mark.e2e
def test_a_job_runs_once_and_every_worker_answers_for_it(workers, jobs_root, repository, tmp_path):
    spec = {"model": "cnn", "input": "small.npy", "output": "small-out", "chunk_rows": 1000}
    job = httpx.post(f"{workers.url}/v1/jobs", json=spec).json()
    done = wait_for(workers.url, job["id"])
    assert done["state"] == "succeeded" and done["rows_done"] == 3000, done
    answers = ask_every_worker(workers.url, workers.pids, "GET", f"/v1/jobs/{job['id']}")
    seen = {(j["id"], j["state"], j["rows_done"], j["started"]) for j in bodies(answers)}
    assert seen == {(job["id"], "succeeded", 3000, done["started"])}, seen
    listed = ask_every_worker(workers.url, workers.pids, "GET", "/v1/jobs")
    assert all(job["id"] in [j["id"] for j in jobs] for jobs in bodies(listed))
    assert workers.output().count(f"job {job['id']} runs in worker") == 1
    cli = tmp_path / "cli"
    assert score(repository, "cnn", jobs_root / "small.npy", cli, "--chunk-rows", 1000) == 0
    assert_same_answers(read_output(jobs_root / "small-out"), read_output(cli))


class Loader(threading.Thread):
    """A keep-alive client sending CNN requests back to back until stopped; a failed request
    is recorded with the worker that held its connection, and the client reconnects."""

    def __init__(self, url: str, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.pids = url, pids
        self.stop = threading.Event()
        self.answered: Counter[int | None] = Counter()  # by worker pid
        self.failed: list[tuple[int | None, str]] = []

    def run(self) -> None:
        body = _cnn_body()
        c = Connection(self.url, self.pids)
        while not self.stop.is_set():
            try:
                status, _ = c.request("POST", CNN, body)
                assert status == 200, status
                self.answered[c.pid] += 1
            except (OSError, http.client.HTTPException) as exc:
                self.failed.append((c.pid, repr(exc)))
                c.close()
                c = Connection(self.url, self.pids)
        c.close()


@pytest.mark.e2e
def test_a_killed_worker_is_restarted_and_only_its_connections_fail(
    workers, jobs_root, repository, tmp_path
):
    """kill -9 of the worker running a job, under load: the other worker keeps answering,
    only requests on the dead worker's connections fail, readiness is 503 until the new
    worker is ready, the job is taken over and its output is a single run's."""
    spec = {"model": "cnn", "input": "big.npy", "output": "big-out", "chunk_rows": 400}
    job = httpx.post(f"{workers.url}/v1/jobs", json=spec).json()
    deadline = time.monotonic() + 60
    while committed(jobs_root / "big-out") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    owner = int(re.search(rf"job {job['id']} runs in worker pid (\d+)", workers.output())[1])
    survivor = next(p for p in workers.pids if p != owner)
    loaders = [Loader(workers.url, workers.pids) for _ in range(6)]
    for loader in loaders:
        loader.start()
    time.sleep(1.0)
    on_victim = sum(1 for loader in loaders if loader.answered[owner])
    answered_before = sum(loader.answered[survivor] for loader in loaders)
    os.kill(owner, signal.SIGKILL)
    readiness, why_not = [], set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.get(f"{workers.url}/v2/health/ready")
        readiness.append(r.status_code)
        if r.status_code == 503:
            why_not.add(r.json()["error"])
        if 503 in readiness and r.status_code == 200:
            break
        time.sleep(0.05)
    for loader in loaders:
        loader.stop.set()
        loader.join(timeout=30)
    failed = [f for loader in loaders for f in loader.failed]
    print(f"{on_victim} connections on the killed worker, {len(failed)} requests failed: {failed}")
    assert 503 in readiness and readiness[-1] == 200, readiness
    assert all(re.match(r"worker \d: (restarting|starting)", w) for w in why_not), why_not
    assert all(pid == owner for pid, _ in failed), failed  # only the killed worker's
    assert len(failed) <= on_victim
    assert sum(loader.answered[survivor] for loader in loaders) > answered_before
    log = workers.output()
    assert re.search(rf"ERROR .*worker \d \(pid {owner}\) was killed by SIGKILL", log), log[-3000:]
    assert "onnxserve_worker_restarts_total 1.0" in httpx.get(f"{workers.url}/metrics").text
    new = worker_pids(workers.process.pid)
    assert survivor in new and owner not in new and len(new) == 2

    done = wait_for(workers.url, job["id"], timeout=120)
    assert done["state"] == "succeeded" and done["rows_done"] == 24_000, done
    owners = re.findall(rf"job {job['id']} runs in worker pid (\d+)", workers.output())
    assert len(owners) == 2 and int(owners[0]) == owner, owners  # taken over once
    cli = tmp_path / "cli"
    assert score(repository, "cnn", jobs_root / "big.npy", cli, "--chunk-rows", 400) == 0
    assert_same_answers(read_output(jobs_root / "big-out"), read_output(cli))


class Persistent(Client):
    """test_shutdown's keep-alive client, which also says why it stopped."""

    def run(self) -> None:
        self.why = "ran out of requests"
        try:
            super().run()
        finally:
            self.why = self.lost[-1] if self.lost else "connection refused"


@pytest.mark.e2e
def test_sigterm_under_load_answers_every_admitted_request_and_exits_0(repository, tmp_path):
    with run_server(repository, tmp_path, *WORKERS, "--graceful-timeout-s", "5") as srv:
        clients = [Persistent(srv.url) for _ in range(16)]
        for c in clients:
            c.start()
        time.sleep(1.5)
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
    why = Counter(c.why for c in clients)
    assert answered[200] > 100 and set(answered) <= {200, 503}, (answered, why, srv.output())
    assert took <= 5 + 0.5 + 5, f"shutdown took {took:.1f} s"  # graceful + drain + slack
    assert not worker_pids(srv.process.pid)


@pytest.mark.e2e
def test_a_worker_that_cannot_start_stops_the_server(repository, tmp_path):
    """A setting every worker fails on is not retried for ever: exit 1, with the reason."""
    cmd = serve_command(repository, *WORKERS, "--api-keys-file", str(tmp_path / "no.json"),
                        port=free_port())  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "No such file" in done.stderr and "while starting: stopping" in done.stderr
