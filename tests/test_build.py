"""`build_repository` end to end in quick mode: a loadable repository, skips, new versions."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

import export.build as build
from export.build import MODEL_NAMES, build_repository
from export.specs import SPECS
from export.verify import ParityError
from service.model_config import CONFIG_FILE, MODEL_FILE, SAMPLES_FILE, load_config, version_dirs
from tests.conftest import run_server

pytestmark = pytest.mark.e2e

ORT_TYPES = {"FP32": "tensor(float)", "INT64": "tensor(int64)"}  # the datatypes used here


@pytest.fixture(scope="module")
def quick_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("repo")
    return root, build_repository(root, quick=True)


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


def test_first_build_writes_version_1_of_each_model(quick_repo: tuple[Path, list[dict]]) -> None:
    root, results = quick_repo
    assert [r["name"] for r in results] == list(MODEL_NAMES) == ["cnn", "lstm", "autoencoder"]
    assert all(r["version"] == 1 and not r["skipped"] and r["seconds"] > 0 for r in results)
    for r in results:
        folder = root / r["name"] / "1"
        assert {MODEL_FILE, "checkpoint.pt", "metrics.json", SAMPLES_FILE} <= {
            p.name for p in folder.iterdir()
        }
        assert json.loads((folder / "metrics.json").read_text())["metrics"] == {
            k: v for k, v in r["metrics"].items() if k not in ("best_epoch", "train_seconds")
        }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_repository_loads_and_matches_its_config(
    quick_repo: tuple[Path, list[dict]], name: str
) -> None:
    root, _ = quick_repo
    config = load_config(root / name / CONFIG_FILE)
    assert config.name == name and version_dirs(root / name) == [1]
    (entry,) = config.versions
    model = root / name / "1" / entry.file
    assert entry.size_bytes == model.stat().st_size and len(entry.sha256) == 64
    assert entry.opset == 17 and entry.fingerprint == build.fingerprint(SPECS[name], quick=True)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for found, spec in zip(
        [*session.get_inputs(), *session.get_outputs()],
        [*config.inputs, *config.outputs],
        strict=True,
    ):
        assert (found.name, _dims(found.shape)) == (spec.name, spec.shape)
        assert found.type == ORT_TYPES[spec.datatype]
    assert all(d <= 1e-4 for d in config.parity["max_abs_diff"].values())
    assert config.parity["onnx"] == pytest.approx(config.parity["torch"], abs=1e-6)
    assert [v.kind for v in entry.variants] == ["optimized", "int8", "fp16"]
    for variant in entry.variants:
        assert (root / name / "1" / variant.file).is_file() == variant.accepted


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fp16_variant_is_built_and_measured(quick_repo: tuple[Path, list[dict]], name: str) -> None:
    """An FP16 graph per model, FP32 at its inputs and outputs, measured like the others."""
    root, _ = quick_repo
    config = load_config(root / name / CONFIG_FILE)
    (fp16,) = [v for v in config.versions[0].variants if v.kind == "fp16"]
    assert fp16.accepted and fp16.file == "model.fp16.onnx"
    assert fp16.metric == SPECS[name].tolerance.metric
    assert fp16.value == pytest.approx(config.parity["onnx"] + fp16.delta)
    folder = root / name / "1"
    assert fp16.size_bytes == (folder / fp16.file).stat().st_size
    assert fp16.size_bytes < (folder / MODEL_FILE).stat().st_size
    session = ort.InferenceSession(str(folder / fp16.file), providers=["CPUExecutionProvider"])
    io = [*session.get_inputs(), *session.get_outputs()]
    assert [t.type for t in io] == [
        ORT_TYPES[s.datatype] for s in (*config.inputs, *config.outputs)
    ]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_samples_replay_through_the_served_graph(
    quick_repo: tuple[Path, list[dict]], name: str
) -> None:
    root, _ = quick_repo
    config = load_config(root / name / CONFIG_FILE)
    samples = np.load(root / name / "1" / SAMPLES_FILE)
    inputs = samples["inputs"]
    assert 0 < len(inputs) <= 256 and len(samples["targets"]) == len(inputs)
    assert inputs.dtype == np.float32
    session = ort.InferenceSession(str(root / name / "1" / MODEL_FILE))
    outputs = session.run(None, {config.inputs[0].name: inputs})
    for spec, got in zip(config.outputs, outputs, strict=True):
        np.testing.assert_array_equal(samples[spec.name], got)
    if name == "lstm":
        assert inputs.shape[1:] == (52, 1)


def test_fp16_variant_serves_through_the_override(
    quick_repo: tuple[Path, list[dict]], tmp_path: Path
) -> None:
    """`variant: fp16` serves the FP16 graph: FP32 on the wire, its own answers."""
    root, _ = quick_repo
    overrides = json.dumps({"lstm": {"variant": "fp16"}})
    series = np.load(root / "lstm" / "1" / SAMPLES_FILE)["inputs"][:8]
    body = {"inputs": [{"name": "series", "shape": list(series.shape), "datatype": "FP32",
                        "data": series.ravel().tolist()}]}  # fmt: skip
    with run_server(root, tmp_path, env={"ONNXSERVE_MODEL_OVERRIDES": overrides}) as server:
        meta = httpx.get(f"{server.url}/v2/models/lstm", timeout=10).json()
        answer = httpx.post(f"{server.url}/v2/models/lstm/infer", json=body, timeout=30)
    assert meta["parameters"]["model_file"] == "model.fp16.onnx"
    assert answer.status_code == 200, answer.text
    (out,) = answer.json()["outputs"]
    assert out["datatype"] == "FP32"
    session = ort.InferenceSession(str(root / "lstm" / "1" / "model.fp16.onnx"))
    (want,) = session.run(None, {"series": series})
    np.testing.assert_allclose(np.reshape(out["data"], want.shape), want, rtol=1e-6)


def test_task_fields_are_filled(quick_repo: tuple[Path, list[dict]]) -> None:
    root, _ = quick_repo
    cnn, lstm, ae = (load_config(root / n / CONFIG_FILE) for n in MODEL_NAMES)
    assert cnn.labels == [str(d) for d in range(10)] and cnn.batching.max_batch_size == 32
    assert lstm.normalization is not None and lstm.normalization.std > 0
    assert lstm.batching.max_batch_size == 64 and lstm.inputs[0].shape == [-1, -1, 1]
    assert {"rmse", "rmse_naive", "rmse_seasonal_naive"} <= set(lstm.metrics)
    assert ae.threshold == ae.metrics["threshold"] > 0
    assert {"auroc_salt_pepper", "auroc_occlusion", "fpr_clean"} <= set(ae.metrics)


def test_second_build_skips_and_force_adds_a_version(quick_repo: tuple[Path, list[dict]]) -> None:
    root, first = quick_repo
    again = build_repository(root, quick=True)
    assert [(r["name"], r["version"], r["skipped"]) for r in again] == [
        (n, 1, True) for n in MODEL_NAMES
    ]
    assert [r["metrics"] for r in again] == [r["metrics"] for r in first]
    (forced,) = build_repository(root, models=["autoencoder"], force=True, quick=True)
    assert forced["version"] == 2 and not forced["skipped"]
    config = load_config(root / "autoencoder" / CONFIG_FILE)
    assert [v.version for v in config.versions] == [1, 2] == version_dirs(root / "autoencoder")
    assert config.versions[0].fingerprint == config.versions[1].fingerprint


def test_changed_fingerprint_writes_a_new_version(
    quick_repo: tuple[Path, list[dict]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = quick_repo
    before = load_config(root / "autoencoder" / CONFIG_FILE).versions
    monkeypatch.setitem(SPECS["autoencoder"].module.QUICK, "epochs", 1)
    (result,) = build_repository(root, models=["autoencoder"], quick=True)
    assert not result["skipped"] and result["version"] == before[-1].version + 1
    after = load_config(root / "autoencoder" / CONFIG_FILE).versions
    assert after[:-1] == before and after[-1].fingerprint != before[-1].fingerprint
    assert (root / "autoencoder" / str(before[0].version) / MODEL_FILE).is_file()


def test_failed_build_leaves_no_half_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> dict:
        raise ParityError("forecast: max abs diff 1 > atol 0.0001")

    monkeypatch.setattr(build, "check_parity", broken)
    with pytest.raises(ParityError):
        build_repository(tmp_path, models=["autoencoder"], quick=True)
    assert not (tmp_path / "autoencoder").exists()  # no version, no staging, no config


def test_unknown_model_is_refused_before_building(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="resnet"):
        build_repository(tmp_path, models=["cnn", "resnet"])
    assert not any(tmp_path.iterdir())
