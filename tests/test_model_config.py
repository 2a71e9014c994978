"""`service.model_config`: what `export/` writes must validate, and broken files are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.model_config import (
    MODEL_FILE,
    ConfigError,
    load_config,
    save_config,
    version_dirs,
)

pytestmark = pytest.mark.unit


def _classifier() -> dict[str, Any]:
    return {
        "name": "cnn",
        "task": "classification",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
        "labels": [str(d) for d in range(10)],
    }


def _write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_valid_config_round_trips(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, _classifier()))
    assert config.batching.max_batch_size == 32 and config.output("label").datatype == "INT64"
    save_config(config, tmp_path / "copy.json")
    assert load_config(tmp_path / "copy.json") == config


def _broken(change: str) -> dict[str, Any]:
    config = _classifier()
    if change == "datatype":
        config["inputs"][0]["datatype"] = "FLOAT32"
    elif change == "labels":
        del config["labels"]
    elif change == "label_count":
        config["labels"] = ["0", "1"]
    elif change == "zero_dim":
        config["outputs"][0]["shape"] = [-1, 0]
    elif change == "unknown":
        config["colour"] = "blue"
    elif change == "anomaly":
        config.update(task="anomaly", labels=None)
    elif change == "forecast":
        config.update(task="forecast", labels=None)
    elif change == "duplicate":
        config["outputs"][1]["name"] = "probabilities"
    elif change == "name":
        config["name"] = "../etc"
    return config


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        ("datatype", "inputs.0.datatype", "FP32"),
        ("labels", "labels", "class labels"),
        ("label_count", "labels", "2 labels for an output of width 10"),
        ("zero_dim", "outputs.0.shape", "positive or -1"),
        ("unknown", "colour", "Extra inputs are not permitted"),
        ("anomaly", "threshold", "calibrated threshold"),
        ("forecast", "normalization", "normalisation constants"),
        ("duplicate", "outputs", "unique"),
        ("name", "name", "letters, digits"),
    ],
)
def test_broken_config_is_rejected_naming_the_field(
    tmp_path: Path, change: str, field: str, why: str
) -> None:
    path = _write(tmp_path, _broken(change))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and field in message and why in message


def test_unreadable_or_malformed_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid config"):
        load_config(tmp_path / "config.json")


def test_version_dirs_lists_only_folders_with_a_model(tmp_path: Path) -> None:
    for version in ("1", "3", "10"):
        (tmp_path / version).mkdir()
        (tmp_path / version / MODEL_FILE).write_bytes(b"onnx")
    (tmp_path / "2").mkdir()  # a half-written version: no model file
    (tmp_path / "notes").mkdir()
    assert version_dirs(tmp_path) == [1, 3, 10]
    assert version_dirs(tmp_path / "absent") == []
