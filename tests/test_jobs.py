"""Batch-scoring jobs in a real server (`/v1/jobs`): submit, poll, equal to the CLI, list, cancel,
paths kept inside the jobs root, and a job that resumes after the server restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.jobs import STATE_DIR
from service.scoring.writer import ERRORS, MANIFEST
from tests.conftest import run_server
from tests.test_scoring import assert_same_answers, list_parquet, read_output, rows_of, score

pytestmark = pytest.mark.e2e
FINAL = ("succeeded", "failed", "cancelled")


def wait_for(url: str, job_id: str, timeout: float = 60) -> dict:
    """Poll a job until it is finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["state"] in FINAL:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not finished in {timeout} s: {job}")


def committed(folder: Path) -> int:
    try:
        return json.loads((folder / MANIFEST).read_text())["chunks_done"]
    except (FileNotFoundError, ValueError):
        return 0


def big_input(repository: Path, root: Path, rows: int = 24_000) -> Path:
    np.save(root / "big.npy", rows_of(repository, "cnn", rows))
    return root / "big.npy"


@pytest.fixture(scope="module")
def jobs_root(repository, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobs-root")
    x = rows_of(repository, "cnn", 3000)
    x[1234] = np.nan
    list_parquet(root / "in.parquet", x)
    big_input(repository, root)
    return root


@pytest.fixture(scope="module")
def jobs_server(repository, jobs_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs-server")
    with run_server(
        repository,
        tmp,
        env={"ONNXSERVE_JOBS_ROOT": str(jobs_root), "ONNXSERVE_UNSAFE_ANONYMOUS_ADMIN": "true"},
    ) as server:
        yield server


def test_a_job_runs_to_success_and_equals_the_cli(jobs_server, jobs_root, repository, tmp_path):
    spec = {"model": "cnn", "input": "in.parquet", "output": "out", "chunk_rows": 1000}
    r = httpx.post(f"{jobs_server.url}/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] in ("queued", "running") and job["total_rows"] == 3000
    assert job["piece_rows"] <= 32  # never more than the model's max_batch_size per batcher call
    done = wait_for(jobs_server.url, job["id"])
    assert done["state"] == "succeeded", done
    assert (done["rows_done"], done["scored"], done["errors"]) == (3000, 2999, 1)
    assert done["rows_per_s"] > 0 and done["finished"] >= done["started"]

    cli = tmp_path / "cli"
    assert score(repository, "cnn", jobs_root / "in.parquet", cli, "--chunk-rows", 1000) == 0
    assert_same_answers(read_output(jobs_root / "out"), read_output(cli))
    assert (jobs_root / "out" / ERRORS).read_text() == (cli / ERRORS).read_text()

    listed = httpx.get(f"{jobs_server.url}/v1/jobs").json()
    assert job["id"] in [j["id"] for j in listed]
    record = json.loads((jobs_root / STATE_DIR / f"{job['id']}.json").read_text())
    assert record["state"] == "succeeded"


def test_paths_outside_the_jobs_root_are_refused(jobs_server, jobs_root, tmp_path):
    (tmp_path / "secret.parquet").write_bytes(b"x")
    (jobs_root / "link").symlink_to(tmp_path, target_is_directory=True)
    refused = [
        ("../in.parquet", "o"),
        (str(tmp_path / "secret.parquet"), "o"),
        ("link/secret.parquet", "o"),
        ("in.parquet", str(tmp_path / "out")),
        ("in.parquet", "sub/../../escape"),
        ("in.parquet", f"{STATE_DIR}/x"),
    ]
    for input_, output in refused:
        spec = {"model": "cnn", "input": input_, "output": output}
        r = httpx.post(f"{jobs_server.url}/v1/jobs", json=spec)
        assert r.status_code == 403, (input_, output, r.text)
        assert "outside the jobs root" in r.json()["error"]
    assert not (tmp_path / "out").exists()

    bad = {"model": "nope", "input": "in.parquet", "output": "o"}
    assert httpx.post(f"{jobs_server.url}/v1/jobs", json=bad).status_code == 404
    r = httpx.post(f"{jobs_server.url}/v1/jobs", json={**bad, "model": "cnn", "input": "no.npy"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    r = httpx.post(f"{jobs_server.url}/v1/jobs", json={"model": "cnn"})
    assert r.status_code == 400 and "input" in r.json()["error"]
    assert httpx.get(f"{jobs_server.url}/v1/jobs/nosuchjob").status_code == 404
    r = httpx.post(f"{jobs_server.url}/v1/jobs", json={**bad, "model": "cnn", "input": "a\u0000b"})
    assert r.status_code == 400 and "not a usable path" in r.json()["error"]


def test_a_job_can_be_cancelled(jobs_server, jobs_root):
    spec = {"model": "cnn", "input": "big.npy", "output": "cancelled", "chunk_rows": 500}
    job = httpx.post(f"{jobs_server.url}/v1/jobs", json=spec).json()
    r = httpx.delete(f"{jobs_server.url}/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    time.sleep(0.3)
    again = httpx.get(f"{jobs_server.url}/v1/jobs/{job['id']}").json()
    assert again["state"] == "cancelled" and again["rows_done"] < 24_000


def test_jobs_are_refused_with_how_to_enable_them(server):
    r = httpx.post(f"{server.url}/v1/jobs", json={"model": "cnn", "input": "a", "output": "b"})
    assert r.status_code == 403 and "--api-keys-file" in r.json()["error"]


def test_a_running_job_resumes_after_the_server_restarts(repository, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    big_input(repository, root)
    env = {"ONNXSERVE_JOBS_ROOT": str(root), "ONNXSERVE_UNSAFE_ANONYMOUS_ADMIN": "true"}
    spec = {"model": "cnn", "input": "big.npy", "output": "out", "chunk_rows": 400}
    with run_server(repository, tmp_path, env=env) as first:
        job = httpx.post(f"{first.url}/v1/jobs", json=spec).json()
        deadline = time.monotonic() + 60
        while committed(root / "out") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    stopped_at = committed(root / "out")
    assert 2 <= stopped_at < 60, f"expected a job stopped midway, {stopped_at} of 60 chunks"
    assert json.loads((root / STATE_DIR / f"{job['id']}.json").read_text())["state"] == "running"

    with run_server(repository, tmp_path, env=env) as second:
        done = wait_for(second.url, job["id"])
    assert done["state"] == "succeeded" and done["rows_done"] == 24_000, done
    summary = json.loads((root / "out" / "_summary.json").read_text())
    assert summary["resumed_from_row"] >= stopped_at * 400
    cli = tmp_path / "cli"
    assert score(repository, "cnn", root / "big.npy", cli, "--chunk-rows", 400) == 0
    assert_same_answers(read_output(root / "out"), read_output(cli))
