"""`onnxserve export` and `export_to_repository` on modules the project does not ship (defined
here): a small residual CNN, a GRU taking an FP32 sequence and INT64 lengths, and a module whose
forward depends on Python-side state, which ONNX cannot follow. Exported through the real CLI (a
subprocess) and the Python function into a temporary repository, then served by the real server.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from export import cli
from export.inputs import InputSpec, SpecError
from export.user import export_to_repository
from export.verify import ParityError
from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    SAMPLES_FILE,
    ModelConfig,
    load_config,
    version_dirs,
)
from tests.conftest import ROOT, run_server

HERE = Path(__file__).resolve()
CNN_INPUT = "image:FP32:-1,3,16,16"
GRU_INPUTS = ("seq:FP32:batch,time,4", "lengths:INT64:batch:1..21")


class ResidualCNN(nn.Module):
    """Conv stem, one residual block with batch norm, global pooling, linear head: logits."""

    def __init__(self, channels: int = 8, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
        )
        self.head = nn.Linear(channels, classes)
        with torch.no_grad():  # running statistics that are not the identity
            for norm in (self.block[1], self.block[4]):
                norm.running_mean.uniform_(-0.5, 0.5)
                norm.running_var.uniform_(0.5, 2.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(image))
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


class MaskedGRU(nn.Module):
    """A GRU over `seq` [N, T, 4] whose states are averaged over the first `lengths` [N] steps:
    a score [N, 2] and the states [N, T, 8]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(
        self, seq: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        states, _ = self.gru(seq)
        steps = torch.arange(seq.shape[1], device=seq.device)
        mask = (steps[None, :] < lengths[:, None]).to(states.dtype)
        pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        return self.head(pooled), states


class PythonSideState(nn.Module):
    """Adds how many times it has been called: the tracer records one count as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * 2 + self.calls


def _export(repository: Path, *args: str) -> subprocess.Popen:
    """The real `onnxserve export` in a subprocess."""
    command = [sys.executable, "-m", "service.cli", "export", "--repository", str(repository)]
    return subprocess.Popen(
        [*command, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding `rescnn` v1 and `gru` v1, each exported by the CLI (two processes at
    once, into two models), and `rescnn` v2 once the Python function test ran."""
    root = tmp_path_factory.mktemp("user") / "repository"
    runs = [
        _export(root, "--module", f"{HERE}:ResidualCNN", "--input", CNN_INPUT, "--name", "rescnn",
                "--variant-tolerance", "0.5"),
        _export(root, "--module", f"{HERE}:MaskedGRU", "--input", GRU_INPUTS[0], "--input",
                GRU_INPUTS[1], "--output", "score", "states", "--name", "gru"),
    ]  # fmt: skip
    for run, name in zip(runs, ["rescnn", "gru"], strict=True):
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert f"{name} v1 published" in out
    return root


@pytest.mark.e2e
def test_cli_publishes_a_verified_version(repo: Path) -> None:
    config = load_config(repo / "rescnn" / CONFIG_FILE)
    v1 = config.versions[0]
    folder = repo / "rescnn" / "1"
    assert v1.version == 1 and v1.opset == 17 and v1.file == MODEL_FILE
    assert v1.sha256 == hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()
    assert v1.size_bytes == (folder / MODEL_FILE).stat().st_size
    assert v1.parity["inputs"] == "random" and v1.parity["batches"] == 3
    assert v1.parity["samples"] == 1 + 3 + 17
    assert v1.parity["max_abs_diff"]["output"] <= 1e-4
    assert [v.kind for v in v1.variants] == ["optimized", "int8", "fp16"]
    for variant in v1.variants:
        assert variant.metric == "max_rel_diff" and variant.delta == variant.value
        assert variant.accepted == (variant.value <= 0.5) == (folder / variant.file).is_file()
        assert "max_abs_diff" in variant.reason
    assert any(v.kind == "fp16" and v.accepted for v in v1.variants)
    with np.load(folder / SAMPLES_FILE) as samples:
        inputs, stored = samples["inputs"], samples["output"]
    assert inputs.shape == (17, 3, 16, 16) and inputs.dtype == np.float32
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"image": inputs})[0], stored)


@pytest.mark.e2e
def test_two_inputs_of_different_datatypes(repo: Path) -> None:
    config = load_config(repo / "gru" / CONFIG_FILE)
    assert config.task is None and config.batching.max_batch_size == 32
    assert [(t.name, t.datatype, t.shape) for t in config.inputs] == [
        ("seq", "FP32", [-1, -1, 4]),
        ("lengths", "INT64", [-1]),
    ]
    assert [(t.name, t.datatype, t.shape) for t in config.outputs] == [
        ("score", "FP32", [-1, 2]),
        ("states", "FP32", [-1, -1, 8]),
    ]
    parity = config.parity
    assert parity["batches"] == 9 and parity["lengths"] == [3, 8, 21]
    assert max(parity["max_abs_diff"].values()) <= 1e-4
    folder = repo / "gru" / "1"
    for variant in config.versions[0].variants:
        assert variant.accepted == (variant.value <= 0.05) == (folder / variant.file).is_file()
    with np.load(folder / SAMPLES_FILE) as samples:
        assert set(samples.files) == {"seq", "lengths", "score", "states"}  # one key per input
        feeds = {"seq": samples["seq"], "lengths": samples["lengths"]}
        stored = [samples["score"], samples["states"]]
    assert feeds["seq"].shape == (17, 8, 4) and feeds["lengths"].dtype == np.int64
    assert 1 <= feeds["lengths"].min() and feeds["lengths"].max() <= 21
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    for got, want in zip(session.run(None, feeds), stored, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.e2e
def test_python_function_publishes_version_2(repo: Path) -> None:
    v1 = (repo / "rescnn" / "1" / MODEL_FILE).read_bytes()
    example = torch.rand(4, 3, 16, 16)
    result = export_to_repository(ResidualCNN(seed=1), example, "rescnn", repository=repo)
    assert result.version == 2 and result.path == repo / "rescnn" / "2"
    config = load_config(repo / "rescnn" / CONFIG_FILE)
    assert [v.version for v in config.versions] == [1, 2] == version_dirs(repo / "rescnn")
    assert config.inputs[0].name == "image"  # from forward's signature
    assert config.parity == result.parity and result.parity["samples"] == 21 + 4  # + example
    assert (repo / "rescnn" / "1" / MODEL_FILE).read_bytes() == v1
    assert config.versions[1].sha256 != config.versions[0].sha256


@pytest.mark.e2e
def test_task_fields(tmp_path: Path) -> None:
    """A task names the output its post-processing reads; its own fields are checked."""
    labels = ["ant", "bee", "cat", "dog", "eel"]
    example = torch.rand(2, 3, 16, 16)
    with pytest.raises(SpecError, match="labels"):
        export_to_repository(ResidualCNN(), example, "pets", repository=tmp_path,
                             task="classification", variants=[])  # fmt: skip
    assert not (tmp_path / "pets").exists()
    result = export_to_repository(ResidualCNN(), example, "pets", repository=tmp_path,
                                  task="classification", labels=labels, variants=[])  # fmt: skip
    config = load_config(tmp_path / "pets" / CONFIG_FILE)
    assert (config.task, config.labels, config.outputs[0].name) == (
        "classification", labels, "probabilities",
    )  # fmt: skip
    assert result.variants == [] and config.versions[0].variants == []


@pytest.mark.e2e
def test_module_onnx_cannot_follow_is_refused(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--module", f"{HERE}:PythonSideState", "--input", "x:FP32:-1,4", "--output",
                     "shifted", "--name", "stateful", "--repository", str(repo)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "refused, nothing published" in err and "shifted: max abs diff" in err
    assert not (repo / "stateful").exists()
    before = (repo / "rescnn" / CONFIG_FILE).read_text()
    with pytest.raises(ParityError, match=r"output: max abs diff [0-9.]+ > atol"):
        export_to_repository(
            PythonSideState(), None, "rescnn", repository=repo, inputs=["x:FP32:-1,4"]
        )
    assert (repo / "rescnn" / CONFIG_FILE).read_text() == before
    assert sorted(p.name for p in (repo / "rescnn").iterdir()) == ["1", "2", CONFIG_FILE]


@pytest.mark.e2e
def test_torchscript_file_with_parity_inputs(repo: Path, tmp_path: Path) -> None:
    scripted = tmp_path / "gru.pt"
    torch.jit.script(MaskedGRU(seed=2)).save(str(scripted))
    rng = np.random.default_rng(1)
    npz = tmp_path / "real.npz"
    np.savez(
        npz,
        seq=rng.standard_normal((40, 12, 4)),  # float64: cast to the declared FP32
        lengths=rng.integers(1, 13, size=40),
    )
    code = cli.main(["--torchscript", str(scripted), "--input", GRU_INPUTS[0], "--input",
                     GRU_INPUTS[1], "--parity-inputs", str(npz), "--name", "gru_script",
                     "--repository", str(repo), "--variants", "optimized"])  # fmt: skip
    assert code == 0
    config = load_config(repo / "gru_script" / CONFIG_FILE)
    assert config.parity["inputs"] == str(npz) and config.parity["samples"] == 40
    assert config.parity["batches"] == 4  # 1, 3, 17 rows, then the other 19
    assert [o.name for o in config.outputs] == ["output_0", "output_1"]
    assert [v.kind for v in config.versions[0].variants] == ["optimized"]
    with np.load(repo / "gru_script" / "1" / SAMPLES_FILE) as samples:
        assert samples["seq"].dtype == np.float32 and len(samples["lengths"]) == 40


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--module", "nowhere.py:Net"], "no file nowhere.py"),
        (["--module", f"{HERE}"], "expected path/to/file.py:ClassName"),
        (["--module", f"{HERE}:ResNet50"], "defines no 'ResNet50'"),
        (["--module", f"{HERE}:ResidualCNN", "--input", "image:FP32:-1,3,x y"], "dimension 2"),
        (["--module", f"{HERE}:ResidualCNN", "--input", "image:FLOAT:-1,3"], "'FLOAT' not in"),
        (["--module", f"{HERE}:ResidualCNN", "--input", "image"], "NAME:DTYPE:SHAPE"),
        (["--module", f"{HERE}:ResidualCNN", "--input", "image:FP32:-1,8"], "forward fails"),
        (["--module", f"{HERE}:ResidualCNN", "--kwargs", '{"width": 3}'], "failed"),
        (
            ["--module", f"{HERE}:ResidualCNN", "--task", "classification", "--output", "logits"],
            "'probabilities'",
        ),
    ],
)
def test_bad_requests_exit_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--input" not in argv:
        argv = [*argv, "--input", CNN_INPUT]
    code = cli.main([*argv, "--name", "bad", "--repository", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.unit
def test_input_specs() -> None:
    spec = InputSpec.parse("seq:fp32:batch,time,4")
    assert (spec.datatype, spec.dims, spec.shape) == ("FP32", ("batch", "time", 4), [-1, -1, 4])
    assert InputSpec.parse("x:FP32:-1,3,-1").dims == ("batch", 3, "x_dim2")
    ranged = InputSpec.parse("lengths:INT64:batch:1..21")
    assert (ranged.low, ranged.high, str(ranged)) == (1, 21, "lengths:INT64:batch:1..21")
    assert ranged.tensor_spec().model_dump()["shape"] == [-1]
    for bad in ("x", "x:FP32:-2", "x:BYTES:-1", "x:FP32:-1:5..1", "x:FP32:-1:a..b"):
        with pytest.raises(SpecError, match=repr(bad)):
            InputSpec.parse(bad)


@pytest.mark.e2e
def test_exported_repository_serves(repo: Path, tmp_path: Path) -> None:
    """The real server answers v2 JSON requests as in-process ONNX Runtime does."""
    rng = np.random.default_rng(7)
    seq = rng.standard_normal((3, 6, 4)).astype(np.float32)
    lengths = np.array([1, 6, 4], dtype=np.int64)
    image = rng.random((2, 3, 16, 16), dtype=np.float32)
    cases = {
        "gru": {"seq": seq, "lengths": lengths},
        "rescnn": {"image": image},
    }
    with run_server(repo, tmp_path) as server:
        for model, feeds in cases.items():
            config = ModelConfig.model_validate_json((repo / model / CONFIG_FILE).read_text())
            body = {
                "inputs": [
                    {
                        "name": name,
                        "shape": list(array.shape),
                        "datatype": next(t.datatype for t in config.inputs if t.name == name),
                        "data": array.ravel().tolist(),
                    }
                    for name, array in feeds.items()
                ]
            }
            answer = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
            latest = repo / model / str(version_dirs(repo / model)[-1]) / MODEL_FILE
            session = ort.InferenceSession(str(latest), providers=["CPUExecutionProvider"])
            expected = dict(
                zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
            )
            outputs = {o["name"]: o for o in answer.json()["outputs"]}
            assert set(outputs) == set(expected)
            for name, want in expected.items():
                assert outputs[name]["shape"] == list(want.shape)
                got = np.asarray(outputs[name]["data"], dtype=want.dtype).reshape(want.shape)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
