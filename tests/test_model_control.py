"""Model control, Triton's way: poll mode follows the repository's files under load with zero
failed requests; explicit mode loads what it is told; the version policy applies in each."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from service.model_config import latest_version_dir
from tests import foreign
from tests.conftest import run_server, samples

pytestmark = pytest.mark.e2e
POLL_S = 0.4


def _body(repository: Path) -> dict:
    x = samples(repository, "cnn")[:2]
    return {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}  # fmt: skip


def _wait_for(check, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout_s} s: {check.__doc__ or check}")


class Traffic(threading.Thread):
    """A client sending requests back to back until stopped, counting answers by status and
    by the version that answered."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.statuses: Counter[int] = Counter()
        self.versions: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                r = client.post("/v2/models/cnn/infer", json=self.body)
                self.statuses[r.status_code] += 1
                if r.status_code == 200:
                    self.versions[r.json()["model_version"]] += 1


def _index(url: str) -> dict[tuple[str, str | None], dict]:
    return {
        (e["name"], e.get("version")): e for e in httpx.post(f"{url}/v2/repository/index").json()
    }


def test_poll_mode_swaps_versions_under_load_with_zero_failures(repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(latest_version_dir(repository / "cnn"), repo / "cnn" / "1")
    shutil.copy(repository / "cnn" / "config.json", repo / "cnn" / "config.json")
    graph = (repo / "cnn" / "1" / "model.onnx").read_bytes()
    flags = ("--model-control-mode", "poll", "--repository-poll-secs", str(POLL_S),
             "--unsafe-anonymous-admin")  # fmt: skip
    with run_server(repo, tmp_path, *flags) as srv:
        url = srv.url
        refused = httpx.post(f"{url}/v2/repository/models/cnn/unload", json={})
        assert refused.status_code == 403 and "poll" in refused.json()["error"]
        traffic = Traffic(url, _body(repository))
        traffic.start()
        try:
            _wait_for(lambda: traffic.statuses[200] > 20)
            # a version copied slowly: half a file across several polls is not loaded
            (repo / "cnn" / "2").mkdir()
            with open(repo / "cnn" / "2" / "model.onnx", "wb") as f:
                f.write(graph[: len(graph) // 2])
                f.flush()
                time.sleep(POLL_S * 4)
                assert httpx.get(f"{url}/v2/models/cnn").json()["versions"] == ["1"]
                f.write(graph[len(graph) // 2 :])

            def on_two():
                """version 2 serves"""
                return httpx.get(f"{url}/v2/models/cnn").json()["versions"] == ["2"]

            _wait_for(on_two)
            seen_two = traffic.versions["2"]
            _wait_for(lambda: traffic.versions["2"] > seen_two + 20)

            # a version that fails to load leaves the serving one in place and says why
            (repo / "cnn" / "3").mkdir()
            (repo / "cnn" / "3" / "model.onnx").write_bytes(b"not a model")
            _wait_for(lambda: _index(url).get(("cnn", "3"), {}).get("state") == "UNAVAILABLE")
            entry = _index(url)[("cnn", "3")]
            assert entry["reason"] and "/tmp" not in entry["reason"]
            assert _index(url)[("cnn", "2")]["state"] == "READY"
            assert httpx.get(f"{url}/v2/health/ready").status_code == 200
            shutil.rmtree(repo / "cnn" / "3")

            # a changed config.json reloads; here its version policy serves every version
            config = json.loads((repo / "cnn" / "config.json").read_text())
            config["version_policy"] = {"all": {}}
            (repo / "cnn" / "config.json").write_text(json.dumps(config))

            def both():
                """versions 1 and 2 serve"""
                return httpx.get(f"{url}/v2/models/cnn").json()["versions"] == ["1", "2"]

            _wait_for(both)
            seen = traffic.statuses[200]
            _wait_for(lambda: traffic.statuses[200] > seen + 20)
        finally:
            traffic.stop.set()
            traffic.join(timeout=30)
        assert set(traffic.statuses) == {200}, traffic.statuses
        assert traffic.versions["1"] > 0 and traffic.versions["2"] > 0

        # a model added is served; a model removed stops being served
        foreign.half(repo / "half" / "1" / "model.onnx")
        _wait_for(lambda: httpx.get(f"{url}/v2/models/half/ready").status_code == 200)
        shutil.rmtree(repo / "cnn")
        _wait_for(
            lambda: (
                httpx.post(f"{url}/v2/models/cnn/infer", json=_body(repository)).status_code == 404
            )
        )
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_explicit_mode_loads_only_what_it_is_told(repository, tmp_path):
    flags = ("--model-control-mode", "explicit", "--load-model", "cnn", "--unsafe-anonymous-admin")
    with run_server(repository, tmp_path, *flags) as srv:
        index = _index(srv.url)
        cnn = latest_version_dir(repository / "cnn").name
        lstm = latest_version_dir(repository / "lstm").name
        assert index[("cnn", cnn)]["state"] == "READY"
        assert index[("lstm", lstm)]["state"] == "UNLOADED"
        assert httpx.get(f"{srv.url}/v2/models/lstm/ready").status_code == 503
        loaded = httpx.post(f"{srv.url}/v2/repository/models/lstm/load", json={}, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["state"] == "READY"
        assert httpx.get(f"{srv.url}/v2/models/lstm/ready").status_code == 200
