"""The GPU check's CPU-side parts: reading nvidia-smi, refusing cleanly without a GPU, metrics
and parity arithmetic, target verdicts, the report, the Python load generator against the real
server, and the whole check run on the CPU provider (`--simulate-on-cpu`).

`nvidia-smi` is stood in for by a script printing what the real one prints for these queries."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from loadtests.gpu import env, loadgen, report
from loadtests.gpu.parity import auroc, differences, graphs, load_model, task_metric
from loadtests.gpu.served import requests_for
from loadtests.serverproc import free_port
from tests.conftest import ROOT

unit = pytest.mark.unit
QUERY = "0, NVIDIA H200, 580.95.05, 143771 MiB\n1, NVIDIA H200, 580.95.05, 143771 MiB\n"
BANNER = (
    "+-----------------------------------------------------------------------------------------+\n"
    "| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |\n"
)
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure "
    "that the latest NVIDIA driver is installed and running."
)


def fake_smi(folder: Path, *, gpus: str = QUERY, banner: str = BANNER, fail: str = "") -> Path:
    """A `nvidia-smi` on PATH answering the check's queries as the real one does."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    (folder / "query.txt").write_text(gpus)
    (folder / "banner.txt").write_text(banner)
    if fail:
        body = f"echo {json.dumps(fail)}\nexit 9\n"
    else:
        body = (
            'case "$*" in\n'
            f"  *--query-gpu=index*) cat {folder / 'query.txt'} ;;\n"
            '  *--query-compute-apps*) echo "$FAKE_PID, 2048" ;;\n'
            "  *--query-gpu=memory.used*) echo 4096 ;;\n"
            f"  *) cat {folder / 'banner.txt'} ;;\n"
            "esac\n"
        )
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return folder


# -- the machine ---------------------------------------------------------------------------------
@unit
def test_nvidia_smi_output_is_read():
    rows = env.parse_gpu_query(QUERY)
    assert rows[0] == {"index": "0", "name": "NVIDIA H200", "driver_version": "580.95.05",
                       "memory.total": "143771 MiB"}  # fmt: skip
    assert len(rows) == 2 and env.parse_gpu_query("") == []
    assert env.parse_driver_cuda(BANNER) == "13.0" and env.parse_driver_cuda("nothing") is None
    assert env.cuda_too_old("12.8", 13).startswith("the driver supports CUDA 12.8")
    assert env.cuda_too_old("13.0", 13) is None and env.cuda_too_old(None, 13) is None


@unit
def test_find_gpus_through_nvidia_smi(tmp_path, monkeypatch):
    system = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert env.find_gpus().problem.startswith("nvidia-smi not found")
    monkeypatch.setenv("PATH", f"{fake_smi(tmp_path / 'broken', fail=NO_DRIVER)}:{system}")
    assert env.find_gpus().problem == f"nvidia-smi failed: {NO_DRIVER}"
    monkeypatch.setenv("PATH", f"{fake_smi(tmp_path / 'none', gpus='')}:{system}")
    assert env.find_gpus().problem.startswith("nvidia-smi lists no GPU")
    monkeypatch.setenv("PATH", f"{fake_smi(tmp_path / 'ok')}:{system}")
    found = env.find_gpus()
    assert found.problem is None and found.driver_cuda == "13.0" and len(found.devices) == 2
    monkeypatch.setenv("FAKE_PID", str(os.getpid()))
    assert env.gpu_memory_mib(os.getpid()) == (2048.0, "process")
    assert env.gpu_memory_mib(1) == (4096.0, "all GPUs")


@unit
def test_nvidia_wheel_libraries_go_on_the_library_path(tmp_path, monkeypatch):
    for part in ("cu13", "cudnn"):
        (tmp_path / "nvidia" / part / "lib").mkdir(parents=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    dirs = env.nvidia_library_dirs()
    assert dirs == [str(tmp_path / "nvidia" / p / "lib") for p in ("cu13", "cudnn")]
    assert env.library_path_with(dirs, "/opt/x") == os.pathsep.join([*dirs, "/opt/x"])
    assert env.library_path_with(dirs, os.pathsep.join(dirs)) is None


# -- arithmetic ------------------------------------------------------------------------------------
@unit
def test_auroc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert np.isnan(auroc(np.ones(3), np.zeros(3)))


@unit
def test_differences_split_floats_from_labels():
    cpu = {"p": np.array([[0.1, 0.9]], np.float32), "label": np.array([1, 0])}
    dev = {"p": np.array([[0.1, 0.90002]], np.float32), "label": np.array([1, 1])}
    floats, others = differences(dev, cpu)
    assert floats["p"] == pytest.approx(2e-5, rel=1e-2) and others == {"label": 0.5}


@pytest.mark.integration
def test_task_metrics_and_graphs_from_the_real_repository(repository):
    cnn = load_model(repository, "cnn")
    kinds = [g.kind for g in graphs(cnn)]
    assert kinds[0] == "fp32" and all(g.path.is_file() for g in graphs(cnn))
    probs = np.eye(10, dtype=np.float32)[cnn.targets.astype(int)]
    outputs = {"probabilities": probs, "label": cnn.targets.astype(np.int64)}
    assert task_metric(cnn.config, outputs, cnn.targets) == ("accuracy", 1.0)
    lstm = load_model(repository, "lstm")
    exact = {"forecast": lstm.targets.reshape(-1, 1).astype(np.float32)}
    assert task_metric(lstm.config, exact, lstm.targets) == ("rmse", pytest.approx(0, abs=1e-4))


# -- verdicts and the report -----------------------------------------------------------------------
def measured(**changes):
    result = {
        "parity": [
            {"model": "cnn", "kind": "fp32", "max_abs_diff": {"probabilities": 3e-6},
             "labels_identical": True},
            {"model": "cnn", "kind": "fp16", "device_value": 0.988, "fp32_cpu_value": 0.99},
            {"model": "lstm", "kind": "fp32", "max_abs_diff": {"forecast": 2e-4}},
            {"model": "lstm", "kind": "fp16", "device_value": 0.41, "fp32_cpu_value": 0.40},
        ],
        "throughput": [{"model": "cnn", "mode": "run", "batch": 256, "rows_per_s": 100_000.0}],
        "served": [
            {"model": "cnn", "rows": 256, "connections": 8, "batching": True, "rps": 250.0,
             "rows_per_s": 64_000.0},
            {"model": "cnn", "rows": 1, "connections": 64, "batching": True, "rps": 9000.0},
            {"model": "cnn", "rows": 1, "connections": 64, "batching": False, "rps": 2000.0},
        ],
    }  # fmt: skip
    result.update(changes)
    return result


@unit
def test_targets_are_judged_as_the_issue_states():
    verdicts = {t["target"].split(" (")[0]: t["met"] for t in report.evaluate(measured())}
    assert verdicts == {
        "cnn FP32 max abs diff vs CPU": True,
        "cnn FP32 labels identical": True,
        "lstm FP32 max abs diff vs CPU": False,  # 2e-4 > 1e-4
        "cnn FP16 accuracy": True,  # 0.2 point drop
        "lstm FP16 rmse": False,  # 2.5 % rise
        "cnn served 256-row rows/s over in-process batch 256": True,  # 64 %
        "cnn single-sample c=64 batching on over off": True,  # 4.5x
    }
    bare = report.evaluate({"parity": [], "served": []})
    assert {t["met"] for t in bare} == {None}  # not measured is neither met nor missed


@unit
def test_report_says_when_nothing_ran_and_when_it_is_simulated():
    text = report.markdown({"no_gpu": "nvidia-smi not found", "onnxruntime": {"version": "1.31"}})
    assert "No usable GPU: nvidia-smi not found" in text and "Nothing was measured" in text
    full = measured(simulated=True)
    full["targets"] = report.evaluate(full)
    full["parity"][0].update(provider="CUDAExecutionProvider", metric="accuracy", nodes={},
                             device_value=0.99, cpu_value=0.99, cpu_compute_nodes=[])  # fmt: skip
    full["parity"] = full["parity"][:1]
    for row in full["served"]:
        row.update(cell="c", latency_ms={"p50": 1.0, "p99": 2.0}, non2xx=0, tool="wrk")
        row.setdefault("rows_per_s", row["rps"])
    text = report.markdown(full)
    assert "Simulated on the CPU provider" in text and "## Targets" in text
    assert "| cnn FP32 max abs diff vs CPU | 3e-06 | <= 0.0001 | yes |" in text


# -- refusing, load, the whole run -----------------------------------------------------------------
def check(tmp_path: Path, *args: str, path: Path | None = None, python: str = sys.executable):
    env_vars = {**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}" if path else
                os.environ["PATH"]}  # fmt: skip
    out = tmp_path / "report"
    done = subprocess.run(
        [python, "-m", "loadtests.gpu_check", "--out", str(out), *args],
        cwd=ROOT, env=env_vars, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    doc = json.loads((out / "gpu-check.json").read_text())
    return done, doc, (out / "gpu-check.md").read_text()


@pytest.mark.e2e
def test_without_a_gpu_it_says_so_and_exits_non_zero(tmp_path):
    done, doc, text = check(tmp_path, path=fake_smi(tmp_path / "bin", fail=NO_DRIVER))
    assert done.returncode == 2, done.stderr[-2000:]
    assert doc["no_gpu"] == f"nvidia-smi failed: {NO_DRIVER}" and "parity" not in doc
    assert "No usable GPU" in text and "no usable GPU" in done.stderr


@pytest.mark.e2e
def test_a_gpu_without_a_cuda_build_of_onnxruntime_is_refused(tmp_path, repository):
    done, doc, _ = check(tmp_path, "--repository", str(repository), path=fake_smi(tmp_path / "b"))
    assert done.returncode == 2
    assert doc["gpus"]["devices"][0]["name"] == "NVIDIA H200"
    assert "offers no CUDAExecutionProvider: install the gpu extra" in doc["no_gpu"]


@pytest.mark.e2e
def test_load_generator_against_the_real_server(server, repository):
    cnn = load_model(repository, "cnn")
    result = loadgen.run_load(server.url, requests_for(cnn, 2, count=4), 2, 1.0, processes=1)
    assert result["requests"] > 10 and result["non2xx"] == 0 and result["socket_errors"] == 0
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["p99"]
    bad = [loadgen.Request("/v2/models/nope/infer", b"{}", {"Content-Type": "application/json"})]
    refused = loadgen.run_load(server.url, bad, 1, 0.5, processes=1)
    assert refused["requests"] == 0 and refused["statuses"].keys() == {"404"}


@pytest.mark.integration
def test_load_generator_reports_a_refused_connection_at_once():
    result = loadgen.run_load(f"http://127.0.0.1:{free_port()}", [loadgen.Request("/", b"", {})],
                              4, 0.5, processes=2)  # fmt: skip
    assert result["requests"] == 0 and result["socket_errors"] == 2
    assert all("Connection refused" in f for f in result["failures"])


@unit
def test_chunked_and_sized_responses_are_read():
    async def read(raw: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw + b"NEXT")
        reader.feed_eof()
        status = await loadgen.read_response(reader)
        return status, await reader.read()

    sized = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"
    chunked = b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert asyncio.run(read(sized)) == (200, b"NEXT")
    assert asyncio.run(read(chunked)) == (503, b"NEXT")


@pytest.mark.e2e
def test_the_whole_check_runs_on_the_cpu_provider(tmp_path, repository):
    done, doc, text = check(
        tmp_path, "--simulate-on-cpu", "--repository", str(repository), "--models", "cnn",
        "--seconds", "0.1", "--load-seconds", "1", "--batches", "1,4",
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert not doc.get("errors"), doc.get("errors")
    assert {r["kind"] for r in doc["parity"]} >= {"fp32"}
    assert {(r["mode"], r.get("batch")) for r in doc["throughput"]} >= {("run", 4), ("cpu", 1)}
    assert doc["first_request"][0]["unseen_batch"] > doc["first_request"][0]["warmed_sizes"][1]
    cells = {(r["cell"], r["batching"]) for r in doc["served"]}
    assert len(cells) == 6 and all(r["non2xx"] == 0 and r["requests"] > 0 for r in doc["served"])
    assert "Simulated on the CPU provider" in text and "## Served (v2 binary)" in text
