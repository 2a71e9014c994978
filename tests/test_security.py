"""API keys with scopes, allowed hosts and cross-site refusals, against a real server."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.security import Guard, parse_keys, required_scope
from tests.conftest import run_server

pytestmark = pytest.mark.e2e

KEYS = {
    "alice-infer": ("alice-secret-key-0001", ["infer", "read"]),
    "bob-jobs": ("bob-secret-key-00002", ["jobs"]),
    "carol-jobs": ("carol-secret-key-003", ["jobs", "read"]),
    "ops-admin": ("ops-secret-key-00004", ["admin", "read", "metrics"]),
}


def _write_keys(path: Path, keys: dict) -> None:
    doc = {
        "keys": [
            {"name": name, "sha256": hashlib.sha256(key.encode()).hexdigest(), "scopes": scopes}
            for name, (key, scopes) in keys.items()
        ]
    }
    path.write_text(json.dumps(doc))


def _auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def _cnn(x_rows: int = 1) -> dict:
    x = np.zeros((x_rows, 1, 28, 28), np.float32)
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


@pytest.fixture(scope="module")
def secured(repository, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    keys = tmp / "keys.json"
    _write_keys(keys, KEYS)
    jobs = tmp / "jobs"
    jobs.mkdir()
    np.save(jobs / "x.npy", np.zeros((40, 1, 28, 28), np.float32))
    flags = ("--api-keys-file", str(keys), "--jobs-root", str(jobs),
             "--model-control-mode", "explicit", "--load-model", "*", "--access-log")  # fmt: skip
    with run_server(repository, tmp, *flags) as server:
        server.keys_file = keys  # type: ignore[attr-defined]
        yield server


def test_health_never_needs_a_key(secured):
    assert httpx.get(f"{secured.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{secured.url}/v2/health/ready").status_code == 200


def test_without_a_key_401_with_the_wrong_scope_403(secured):
    url = f"{secured.url}/v2/models/cnn/infer"
    missing = httpx.post(url, json=_cnn())
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.post(url, json=_cnn(), headers={"Authorization": "Bearer not-a-real-key-xxxx"})
    assert wrong.status_code == 401
    no_scope = httpx.post(url, json=_cnn(), headers=_auth("bob-jobs"))
    assert no_scope.status_code == 403 and "'infer'" in no_scope.json()["error"]
    ok = httpx.post(url, json=_cnn(), headers=_auth("alice-infer"))
    assert ok.status_code == 200
    meta = httpx.get(f"{secured.url}/v2/models/cnn", headers=_auth("alice-infer"))
    assert meta.status_code == 200
    assert httpx.get(f"{secured.url}/metrics", headers=_auth("alice-infer")).status_code == 403
    assert httpx.get(f"{secured.url}/metrics", headers=_auth("ops-admin")).status_code == 200


def test_model_control_needs_admin(secured):
    url = f"{secured.url}/v2/repository/models/autoencoder/unload"
    assert httpx.post(url, headers=_auth("alice-infer")).status_code == 403
    r = httpx.post(url, headers=_auth("ops-admin"))
    assert r.status_code == 200, r.text
    load = f"{secured.url}/v2/repository/models/autoencoder/load"
    assert httpx.post(load, headers=_auth("ops-admin"), timeout=60).status_code == 200


def test_jobs_are_seen_by_their_owner_and_admins_only(secured):
    spec = {"model": "cnn", "input": "x.npy", "output": "out-bob"}
    job = httpx.post(f"{secured.url}/v1/jobs", json=spec, headers=_auth("bob-jobs"))
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert job.json()["owner"] == "bob-jobs"
    mine = httpx.get(f"{secured.url}/v1/jobs", headers=_auth("bob-jobs")).json()
    assert [j["id"] for j in mine] == [job_id]
    theirs = httpx.get(f"{secured.url}/v1/jobs", headers=_auth("carol-jobs")).json()
    assert theirs == []
    assert (
        httpx.get(f"{secured.url}/v1/jobs/{job_id}", headers=_auth("carol-jobs")).status_code == 404
    )
    cancel = httpx.delete(f"{secured.url}/v1/jobs/{job_id}", headers=_auth("carol-jobs"))
    assert cancel.status_code == 404
    every = httpx.get(f"{secured.url}/v1/jobs", headers=_auth("ops-admin")).json()
    assert job_id in [j["id"] for j in every]
    log = secured.output()
    assert "bob-jobs" in log and KEYS["bob-jobs"][0] not in log


def test_foreign_hosts_and_origins_are_refused(secured):
    live = httpx.get(f"{secured.url}/v2/health/live", headers={"Host": "evil.example"})
    assert live.status_code == 400 and "Host" in live.json()["error"]
    infer = httpx.post(
        f"{secured.url}/v2/models/cnn/infer",
        json=_cnn(),
        headers={**_auth("alice-infer"), "Origin": "http://evil.example"},
    )
    assert infer.status_code == 403


def test_keys_file_is_reloaded_without_a_restart(secured):
    keys_file: Path = secured.keys_file
    new = {**KEYS, "dave-infer": ("dave-secret-key-0005", ["infer"])}
    url = f"{secured.url}/v2/models/cnn/infer"
    headers = {"Authorization": f"Bearer {new['dave-infer'][0]}"}
    assert httpx.post(url, json=_cnn(), headers=headers).status_code == 401
    try:
        _write_keys(keys_file, new)
        deadline = time.monotonic() + 10
        status = 401
        while status == 401 and time.monotonic() < deadline:
            time.sleep(0.3)
            status = httpx.post(url, json=_cnn(), headers=headers).status_code
        assert status == 200
    finally:
        _write_keys(keys_file, KEYS)


def test_without_keys_control_and_jobs_are_refused_and_simple_posts_too(repository, tmp_path):
    with run_server(repository, tmp_path, "--unsafe-anonymous-admin",
                    "--model-control-mode", "explicit", "--load-model", "*") as srv:  # fmt: skip
        url = f"{srv.url}/v2/repository/models/lstm/unload"
        for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
            headers = {"Content-Type": content_type} if content_type else {}
            r = httpx.post(url, content=b"x" if content_type else b"", headers=headers)
            assert r.status_code == 400 and "JSON body" in r.json()["error"]
        assert httpx.get(f"{srv.url}/v2/models/lstm/ready").status_code == 200
        assert httpx.post(url, json={}).status_code == 200


@pytest.mark.unit
def test_route_scopes():
    assert required_scope("GET", "/v2/health/ready") is None
    assert required_scope("POST", "/v2/models/cnn/versions/1/infer") == "infer"
    assert required_scope("POST", "/v1/models/cnn:predict") == "infer"
    assert required_scope("POST", "/v2/repository/models/cnn/unload") == "admin"
    assert required_scope("POST", "/v2/repository/index") == "read"
    assert required_scope("DELETE", "/v1/jobs/abc") == "jobs"
    assert required_scope("GET", "/metrics") == "metrics"


@pytest.mark.unit
@pytest.mark.parametrize(
    "doc",
    [{}, {"keys": [{"name": "x", "scopes": ["infer"]}]},
     {"keys": [{"name": "x", "key": "short", "scopes": ["infer"]}]},
     {"keys": [{"name": "x", "sha256": "ab", "scopes": ["infer"]}]},
     {"keys": [{"name": "x", "key": "a-long-enough-key-1", "scopes": ["root"]}]}],
)  # fmt: skip
def test_bad_keys_files_are_refused(doc):
    with pytest.raises(ValueError):
        parse_keys(doc)


@pytest.mark.unit
def test_a_missing_keys_file_stops_the_server_from_starting(tmp_path):
    with pytest.raises(ValueError, match="keys file"):
        Guard(tmp_path / "absent.json", ["*"])
