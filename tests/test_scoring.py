"""Batch scoring (`onnxserve score`): formats, bad rows, early failures, exact resume after
SIGKILL, and remote scoring through a real server. Inputs are real held-out samples, tiled; models
without a task (ONNX files alone) get random inputs of their shapes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.grpc import messages as pb
from service.grpc.tensors import encode_response as encode_grpc
from service.model_config import CONFIG_FILE, MODEL_FILE, load_config
from service.scoring import ScoringError
from service.scoring.cli import main
from service.scoring.engine import BadInput, score_chunk
from service.scoring.plan import ModelInput
from service.scoring.readers import make_chunk, npz_arrays
from service.scoring.remote import grpc_infer, remote_infer
from service.scoring.writer import ERRORS, MANIFEST, SHAPES, result_table
from tests.conftest import ROOT, latest_version, samples


# -- helpers (also used by test_jobs and test_ray_engine) ------------------------------------
def rows_of(repository: Path, model: str, n: int) -> np.ndarray:
    """`n` real samples of a model, one flattened row each (tiled from the held-out set)."""
    x = samples(repository, model).astype(np.float32)
    return np.resize(x, (n, *x.shape[1:])).reshape(n, -1)


def list_parquet(path: Path, rows: list | np.ndarray, fixed: bool = True, **extra) -> Path:
    """Rows as one (fixed-size) list column `x`, plus any extra columns."""
    if fixed:
        column = pa.FixedSizeListArray.from_arrays(pa.array(np.ravel(rows)), len(rows[0]))
    else:
        column = pa.array([None if r is None else list(r) for r in rows], pa.list_(pa.float32()))
    pq.write_table(pa.table({"x": column, **extra}), path, row_group_size=700)
    return path


def score(repository: Path, *args: str | Path) -> int:
    """`onnxserve score ...` in this process (no progress bar)."""
    return main([*map(str, args), "--repository", str(repository), "--no-progress"])


def read_output(folder: Path) -> pa.Table:
    return pq.read_table(folder).sort_by("row")


def reference(repository: Path, model: str, rows: np.ndarray, index=None) -> pa.Table:
    """What the task columns must be: plain ONNX Runtime, then `postprocess.predictions`."""
    config = load_config(repository / model / CONFIG_FILE)
    session = ort.InferenceSession(str(latest_version(repository, model) / MODEL_FILE))
    shape = ModelInput.of(config).fit(rows.shape[1], model).shape
    spec = config.inputs[0].name
    outs = session.run(None, {spec: rows.reshape(len(rows), *shape).astype(np.float32)})
    outputs = dict(zip([o.name for o in session.get_outputs()], outs, strict=True))
    index = np.arange(len(rows)) if index is None else np.asarray(index)
    return result_table(config, index, outputs)


def assert_same_answers(got: pa.Table, want: pa.Table) -> None:
    """Equal rows and labels; floats equal to ORT's batch-to-batch noise."""
    assert got.column_names == want.column_names
    assert got.schema.equals(want.schema)
    for name in got.column_names:
        a, b = got.column(name), want.column(name)
        element = a.type.value_type if pa.types.is_fixed_size_list(a.type) else a.type
        if pa.types.is_floating(element):
            a = np.asarray(a.to_pylist(), np.float64)
            np.testing.assert_allclose(a, np.asarray(b.to_pylist()), rtol=1e-5, atol=1e-6)
        else:
            assert a.equals(b), name


# -- formats ---------------------------------------------------------------------------------
@pytest.mark.integration
def test_every_input_format_gives_the_models_answers(repository, tmp_path):
    x = rows_of(repository, "cnn", 1500)
    want = reference(repository, "cnn", x)
    header = ",".join(f"p{i}" for i in range(x.shape[1]))
    np.savetxt(tmp_path / "h.csv", x, delimiter=",", fmt="%.9g", header=header, comments="")
    np.savetxt(tmp_path / "plain.csv", x, delimiter=",", fmt="%.9g")
    np.save(tmp_path / "in.npy", x.reshape(-1, 1, 28, 28))
    list_parquet(tmp_path / "fixed.parquet", x, id=np.arange(len(x)))
    list_parquet(tmp_path / "var.parquet", x, fixed=False)
    features = {f"p{i}": x[:, i] for i in range(x.shape[1])}
    pq.write_table(pa.table({"id": np.arange(len(x)), **features}), tmp_path / "wide.parquet")
    raw = pa.array([row.tobytes() for row in x], pa.binary(x.shape[1] * 4))  # float32 bytes
    pq.write_table(pa.table({"raw": raw}), tmp_path / "bytes.parquet")
    inputs = {
        "in.npy": [],
        "fixed.parquet": [],  # the only list column is found without --column
        "var.parquet": ["--column", "x"],
        "wide.parquet": ["--column", ",".join(features)],
        "bytes.parquet": [],
        "h.csv": [],
        "plain.csv": [],
    }
    for name, extra in inputs.items():
        out = tmp_path / f"out-{name.replace('.', '-')}"
        assert score(repository, "cnn", tmp_path / name, out, "--chunk-rows", 400, *extra) == 0
        got = read_output(out)
        assert_same_answers(got, want)
        assert len(list(out.glob("part-*.parquet"))) == 4
        summary = json.loads((out / "_summary.json").read_text())
        assert summary["rows"] == summary["scored"] == 1500 and summary["errors"] == 0
    assert set(want.column_names) == {"row", "label", "class_index", "probabilities"}
    assert want.schema.field("probabilities").type == pa.list_(pa.float32(), 10)


@pytest.mark.integration
def test_forecast_and_anomaly_columns(repository, tmp_path):
    windows = rows_of(repository, "lstm", 300)
    list_parquet(tmp_path / "series.parquet", windows)
    assert score(repository, "lstm", tmp_path / "series.parquet", tmp_path / "f") == 0
    got = read_output(tmp_path / "f")
    assert got.column_names == ["row", "forecast"]
    assert_same_answers(got, reference(repository, "lstm", windows))

    images = rows_of(repository, "autoencoder", 300)
    np.save(tmp_path / "img.npy", images)
    assert score(repository, "autoencoder", tmp_path / "img.npy", tmp_path / "a") == 0
    got = read_output(tmp_path / "a")
    assert got.column_names == ["row", "score", "is_anomaly"]
    assert_same_answers(got, reference(repository, "autoencoder", images))


@pytest.mark.integration
def test_npy_output_is_one_structured_array(repository, tmp_path):
    x = rows_of(repository, "cnn", 700)
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "scores.npy"
    assert score(repository, "cnn", tmp_path / "in.npy", out, "--chunk-rows", 300) == 0
    got = np.load(out)
    want = reference(repository, "cnn", x)
    assert got.dtype.names == ("row", "label", "class_index", "probabilities")
    assert got["probabilities"].shape == (700, 10)
    np.testing.assert_array_equal(got["row"], np.arange(700))
    np.testing.assert_array_equal(got["label"], want["label"].to_pylist())
    np.testing.assert_allclose(got["probabilities"], np.asarray(want["probabilities"].to_pylist()),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    parts = tmp_path / "scores.npy.parts"
    assert not list(parts.glob("part-*")) and (parts / "_summary.json").is_file()
    assert score(repository, "cnn", tmp_path / "in.npy", out, "--chunk-rows", 300) == 0  # done


# -- bad rows --------------------------------------------------------------------------------
@pytest.mark.integration
def test_bad_rows_go_to_the_errors_file_and_the_job_goes_on(repository, tmp_path, capsys):
    x = rows_of(repository, "cnn", 600)
    lines = [",".join(f"{v:.9g}" for v in row) for row in x]
    lines[3] = ",".join(lines[3].split(",")[:-5])  # wrong width
    lines[10] = lines[10].replace(",", ",abc,", 1).rsplit(",", 1)[0]  # non-numeric cell
    lines[11] = "nan," + lines[11].split(",", 1)[1]  # NaN
    lines[450] = "," + lines[450].split(",", 1)[1]  # empty cell
    lines[599] = ""  # blank line
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert score(repository, "cnn", tmp_path / "bad.csv", out, "--chunk-rows", 200) == 0
    errors = (out / ERRORS).read_text().splitlines()
    assert errors[0] == "row,reason"
    reasons = dict(line.split(",", 1) for line in errors[1:])
    assert list(reasons) == ["3", "10", "11", "450", "599"]
    assert "779 values, expected 784" in reasons["3"]
    assert "non-numeric value 'abc'" in reasons["10"]
    assert "NaN" in reasons["11"] and "empty" in reasons["450"]
    assert "5 errors" in capsys.readouterr().out
    good = [i for i in range(600) if str(i) not in reasons]
    assert_same_answers(read_output(out), reference(repository, "cnn", x[good], good))

    rows = [*x[:5], None, x[6][:100], *x[7:9]]  # a null row and a short one
    list_parquet(tmp_path / "bad.parquet", rows, fixed=False)
    out = tmp_path / "out2"
    assert score(repository, "cnn", tmp_path / "bad.parquet", out, "--max-error-ratio", "0.1") == 1
    reasons = (out / ERRORS).read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in reasons] == ["5", "6"]
    assert "null" in reasons[0] and "100 values, expected 784" in reasons[1]
    assert score(repository, "cnn", tmp_path / "bad.parquet", out, "--max-error-ratio", "0.3") == 0


@pytest.mark.unit
async def test_rows_the_model_refuses_are_retried_alone_and_set_aside():
    model_input = ModelInput("x", np.dtype(np.float32), (2,))
    chunk = make_chunk(100, np.arange(20, dtype=np.float32).reshape(10, 2), {})

    async def infer(inputs):
        x = inputs["x"]
        if (x[:, 0] == 8).any():  # the row [8, 9] (row 104) is refused
            raise BadInput("cannot run this one")
        return {"y": x.sum(axis=1)}

    rows, outputs, refused = await score_chunk(model_input, 4, chunk, infer, concurrency=2)
    assert refused == [(104, "model refused the row: cannot run this one")]
    np.testing.assert_array_equal(rows, [100, 101, 102, 103, 105, 106, 107, 108, 109])
    np.testing.assert_array_equal(outputs["y"], [1, 5, 9, 13, 21, 25, 29, 33, 37])


# -- failing early ---------------------------------------------------------------------------
@pytest.mark.integration
def test_early_failures_exit_2_with_a_clear_message(repository, tmp_path, capsys):
    x = rows_of(repository, "cnn", 50)
    np.save(tmp_path / "ok.npy", x)
    np.save(tmp_path / "narrow.npy", x[:, :100])
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all" * 10)
    (tmp_path / "in.txt").write_text("1,2,3\n")
    pq.write_table(pa.table({"s": ["a", "b"]}), tmp_path / "text.parquet")
    cases = {
        ("cnn", tmp_path / "missing.npy"): "does not exist",
        ("nope", tmp_path / "ok.npy"): "unknown model 'nope'",
        ("cnn", tmp_path / "in.txt"): "unsupported input format '.txt'",
        ("cnn", tmp_path / "garbage.parquet"): "not a readable Parquet file",
        ("cnn", tmp_path / "narrow.npy"): "rows have 100 values",
        ("cnn", tmp_path / "text.parquet"): "no numeric or list column",
    }
    for (model, path), message in cases.items():
        out = tmp_path / "never"
        assert score(repository, model, path, out) == 2, message
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert score(repository, "cnn", tmp_path / "ok.npy", tmp_path / "o", "--version", "99") == 2
    assert "no version 99" in capsys.readouterr().err

    out = tmp_path / "o"
    assert score(repository, "cnn", tmp_path / "ok.npy", out, "--batch-size", "8") == 0
    assert score(repository, "cnn", tmp_path / "ok.npy", out, "--batch-size", "16") == 2
    assert "made with other arguments (differ: batch_size)" in capsys.readouterr().err


# -- resume after kill -9 --------------------------------------------------------------------
@pytest.mark.e2e
def test_a_run_killed_with_sigkill_resumes_to_the_exact_same_output(repository, tmp_path):
    x = rows_of(repository, "cnn", 16_000)
    x[[5, 4321, 15_999]] = np.nan  # bad rows are part of what must come out the same
    np.save(tmp_path / "in.npy", x)
    args = ["cnn", tmp_path / "in.npy", None, "--chunk-rows", "160", "--batch-size", "32"]

    out = tmp_path / "killed"
    args[2] = out
    cmd = [sys.executable, "-m", "service.cli", "score", *map(str, args),
           "--repository", str(repository), "--no-progress"]  # fmt: skip
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done, deadline = 0, time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            done = json.loads((out / MANIFEST).read_text())["chunks_done"]
        except (FileNotFoundError, ValueError):
            done = 0
        if done >= 3:
            break
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    committed = json.loads((out / MANIFEST).read_text())["chunks_done"]
    assert 3 <= committed < 100, f"expected a run killed midway, {committed} of 100 committed"
    (out / f"part-{committed + 1:05d}.parquet").write_bytes(b"half a part")  # debris of a crash

    assert score(repository, *args) == 0  # the same command resumes
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["resumed_from_row"] == committed * 160

    args[2] = tmp_path / "straight"
    assert score(repository, *args) == 0
    assert read_output(out).equals(read_output(tmp_path / "straight"))
    parts = sorted(p.name for p in out.glob("part-*"))
    assert parts == sorted(p.name for p in (tmp_path / "straight").glob("part-*"))
    assert len(parts) == 100
    for name in parts:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert (out / ERRORS).read_text() == (tmp_path / "straight" / ERRORS).read_text()
    assert (out / ERRORS).read_text().count("\n") == 4


# -- remote ----------------------------------------------------------------------------------
@pytest.mark.e2e
def test_remote_scoring_equals_in_process(repository, server, tmp_path):
    x = rows_of(repository, "cnn", 2000)
    x[17] = np.nan
    list_parquet(tmp_path / "in.parquet", x)
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert score(repository, "cnn", tmp_path / "in.parquet", local, "--chunk-rows", 600) == 0
    code = score(repository, "cnn", tmp_path / "in.parquet", remote, "--chunk-rows", 600,
                 "--url", server.url, "--concurrency", 3, "--batch-size", 64)  # fmt: skip
    assert code == 0
    assert_same_answers(read_output(remote), read_output(local))
    assert (remote / ERRORS).read_text() == (local / ERRORS).read_text()
    assert json.loads((remote / "_summary.json").read_text())["engine"] == "remote"


@pytest.mark.e2e
def test_remote_scoring_over_grpc_equals_in_process(repository, server, tmp_path):
    """`--url grpc://`: Triton's ModelInfer on the server's gRPC port; the task's labels come
    from its ModelConfig; a NaN row is refused (INVALID_ARGUMENT) and listed, as over HTTP."""
    x = rows_of(repository, "cnn", 700)
    x[5] = np.nan
    list_parquet(tmp_path / "in.parquet", x)
    local, remote = tmp_path / "local", tmp_path / "remote"
    assert score(repository, "cnn", tmp_path / "in.parquet", local, "--chunk-rows", 300) == 0
    url = f"grpc://{server.grpc}"
    code = score(repository, "cnn", tmp_path / "in.parquet", remote, "--chunk-rows", 300,
                 "--url", url, "--concurrency", 3, "--batch-size", 64)  # fmt: skip
    assert code == 0
    assert_same_answers(read_output(remote), read_output(local))
    assert (remote / ERRORS).read_text() == (local / ERRORS).read_text()
    assert score(repository, "nope", tmp_path / "in.parquet", tmp_path / "x", "--url", url) == 2


@pytest.mark.unit
async def test_remote_grpc_retries_a_full_queue_after_its_hint_then_gives_the_outputs():
    """grpc_infer against a real grpc.aio server whose ModelInfer refuses twice with the queue's
    RESOURCE_EXHAUSTED and retry hint, then answers; INVALID_ARGUMENT is the rows' fault."""
    calls = []

    async def model_infer(request, context):
        calls.append(request)
        if request.model_name == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "non-finite")
        if len(calls) < 3:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("retry-after", "0"),))
        return encode_grpc("m", "1", [("y", np.array([1.5, 2.5], np.float32))], None, {})

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        model_infer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(pb.SERVICE, {"ModelInfer": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                pb.method_path("ModelInfer"),
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            out = await grpc_infer(call, "t", "m", "1", ["y"])({"x": np.zeros((2, 3), np.float32)})
            np.testing.assert_array_equal(out["y"], [1.5, 2.5])
            assert len(calls) == 3 and calls[-1].model_version == "1"
            assert [o.name for o in calls[-1].outputs] == ["y"]
            with pytest.raises(BadInput, match="non-finite"):
                await grpc_infer(call, "t", "bad", "1", ["y"])({"x": np.zeros((1, 3), np.float32)})
    finally:
        await server.stop(0)


@pytest.mark.unit
async def test_remote_retries_503_after_retry_after_then_gives_the_outputs(monkeypatch):
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "queue full"})
        tensor = {"name": "y", "datatype": "FP32", "shape": [2]}
        tensor["parameters"] = {"binary_data_size": 8}
        head = json.dumps({"outputs": [tensor]}).encode()
        body = head + np.array([1.5, 2.5], np.float32).tobytes()
        length = {"Inference-Header-Content-Length": str(len(head))}
        return httpx.Response(200, content=body, headers=length)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer), base_url="http://x") as c:
        infer = remote_infer(c, "/v2/models/m/infer", ["y"])
        out = await infer({"x": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(out["y"], [1.5, 2.5])
    assert len(calls) == 3
    sent = calls[-1]
    n = int(sent.headers["inference-header-content-length"])
    head = json.loads(sent.content[:n])
    assert head["inputs"][0]["parameters"]["binary_data_size"] == 24
    assert head["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]


# -- models without a task (no config.json) ----------------------------------------------------
def foreign_reference(repository: Path, model: str, inputs: dict[str, np.ndarray]) -> dict:
    """Plain ONNX Runtime on the model file: every output."""
    session = ort.InferenceSession(str(latest_version(repository, model) / MODEL_FILE))
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs), strict=True))


def column_array(table: pa.Table, name: str, shape: list[int]) -> np.ndarray:
    """A flattened column back as rows of `shape`."""
    return np.asarray(table.column(name).to_pylist()).reshape(table.num_rows, *shape)


@pytest.mark.integration
def test_a_model_without_a_task_writes_one_column_per_output(foreign_repository, tmp_path):
    x = np.random.default_rng(0).random((300, 6, 3), dtype=np.float32)
    np.save(tmp_path / "in.npy", x)
    out = tmp_path / "out"
    assert score(foreign_repository, "tensors", tmp_path / "in.npy", out, "--chunk-rows", 128) == 0
    got = read_output(out)
    assert got.column_names == ["row", "total", "mean", "doubled"]
    assert got.schema.field("total").type == pa.float32()
    assert got.schema.field("mean").type == pa.list_(pa.float32(), 3)
    assert got.schema.field("doubled").type == pa.list_(pa.float32(), 18)
    shapes = json.loads(pq.read_schema(out / "part-00000.parquet").metadata[SHAPES])
    assert shapes == {"total": [], "mean": [3], "doubled": [6, 3]}
    want = foreign_reference(foreign_repository, "tensors", {"series": x})
    np.testing.assert_allclose(got.column("total").to_numpy(), want["total"], rtol=1e-5)
    for name in ("mean", "doubled"):
        np.testing.assert_allclose(column_array(got, name, shapes[name]), want[name], rtol=1e-5)

    npy = tmp_path / "scores.npy"  # the structured array gives each field its row shape
    assert score(foreign_repository, "tensors", tmp_path / "in.npy", npy) == 0
    arrays = np.load(npy)
    assert arrays["doubled"].shape == (300, 6, 3) and arrays["mean"].shape == (300, 3)
    np.testing.assert_allclose(arrays["doubled"], want["doubled"], rtol=1e-5)


@pytest.mark.integration
def test_several_inputs_and_strings_come_from_an_npz(foreign_repository, tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.random((200, 2), dtype=np.float32)
    x[7] = np.nan  # set aside like any missing value
    tag = np.array([[f"id-{i}"] for i in range(200)])  # a NumPy str array: no pickling
    np.savez(tmp_path / "in.npz", x=x, tag=tag, unused=np.zeros(200))
    out = tmp_path / "out"
    assert score(foreign_repository, "tagged", tmp_path / "in.npz", out, "--chunk-rows", 64) == 0
    got = read_output(out)
    assert got.column_names == ["row", "y", "tag_copy"]
    assert got.schema.field("tag_copy").type == pa.list_(pa.string(), 1)
    good = [i for i in range(200) if i != 7]
    assert got.column("row").to_pylist() == good
    assert got.column("tag_copy").to_pylist() == [[f"id-{i}"] for i in good]
    np.testing.assert_allclose(column_array(got, "y", [2]), 2 * x[good])
    assert (out / ERRORS).read_text().splitlines()[1].startswith('7,"missing')

    np.savez_compressed(tmp_path / "small.npz", x=x[:5], tag=tag[:5])  # read whole, same rows
    npy = tmp_path / "small.npy"
    assert score(foreign_repository, "tagged", tmp_path / "small.npz", npy) == 0
    arrays = np.load(npy)
    assert arrays.dtype["tag_copy"] == np.dtype(("U4", (1,)))
    assert arrays["tag_copy"][:, 0].tolist() == [f"id-{i}" for i in range(5)]

    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "no-tag.npz", x=x)
    np.savez(tmp_path / "wide.npz", x=np.zeros((3, 3), np.float32), tag=tag[:3])
    cases = {
        "x.npy": "takes 2 inputs (x, tag); give an .npz input with one array per input name",
        "no-tag.npz": "has no array 'tag' for model 'tagged'",
        "wide.npz": "array 'x' has a row of shape [3]; model 'tagged' input 'x' is [-1, 2]",
    }
    for name, message in cases.items():
        assert score(foreign_repository, "tagged", tmp_path / name, tmp_path / "never") == 2
        assert message in capsys.readouterr().err


@pytest.mark.integration
def test_a_model_without_a_batch_axis_scores_one_whole_tensor_per_row(foreign_repository, tmp_path):
    x = np.random.default_rng(2).normal(size=(40, 6)).astype(np.float32)  # each row: [2, 3]
    pq.write_table(pa.table({f"f{i}": x[:, i] for i in range(6)}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    assert score(foreign_repository, "fixed", tmp_path / "in.parquet", out) == 0
    got = read_output(out)
    assert json.loads(got.schema.metadata[SHAPES]) == {"y": [2, 3]}
    np.testing.assert_allclose(column_array(got, "y", [2, 3]), np.maximum(x, 0).reshape(40, 2, 3))
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["scored"] == 40 and summary["errors"] == 0


@pytest.mark.unit
def test_npz_members_saved_plainly_are_memory_mapped(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.savez(tmp_path / "plain.npz", x=x, words=np.array(["a", "bc", "d", "e"]))
    np.savez_compressed(tmp_path / "packed.npz", x=x)
    plain, packed = npz_arrays(tmp_path / "plain.npz"), npz_arrays(tmp_path / "packed.npz")
    assert isinstance(plain["x"], np.memmap) and not isinstance(packed["x"], np.memmap)
    np.testing.assert_array_equal(plain["x"], x)
    np.testing.assert_array_equal(packed["x"], x)
    assert plain["words"].tolist() == ["a", "bc", "d", "e"]
    np.savez(tmp_path / "objects.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ScoringError, match="save strings as NumPy str arrays"):
        npz_arrays(tmp_path / "objects.npz")


@pytest.mark.e2e
def test_remote_scoring_of_models_without_a_task_equals_in_process(
    foreign_repository, foreign_server, tmp_path
):
    rng = np.random.default_rng(3)
    series = rng.random((500, 4 * 3), dtype=np.float32)
    list_parquet(tmp_path / "series.parquet", series)
    tag = np.array([[f"t{i % 7}"] for i in range(300)])
    np.savez(tmp_path / "tagged.npz", x=rng.random((300, 2), dtype=np.float32), tag=tag)
    np.save(tmp_path / "grid.npy", rng.normal(size=(20, 2, 3)).astype(np.float32))
    for model, name in (("tensors", "series.parquet"), ("tagged", "tagged.npz"),
                        ("fixed", "grid.npy")):  # fmt: skip
        local, remote = tmp_path / f"{model}-local", tmp_path / f"{model}-remote"
        assert score(foreign_repository, model, tmp_path / name, local, "--chunk-rows", 128) == 0
        code = score(foreign_repository, model, tmp_path / name, remote, "--chunk-rows", 128,
                     "--url", foreign_server.url, "--batch-size", 16)  # fmt: skip
        assert code == 0, model
        got, want = read_output(remote), read_output(local)
        assert_same_answers(got, want)
        assert got.schema.metadata[SHAPES] == want.schema.metadata[SHAPES]
