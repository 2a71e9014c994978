"""The models of the repository as the benchmark uses them: file, input name, real samples."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ModelInfo:
    """A model of the repository as the benchmark uses it."""

    name: str
    version: int
    path: Path
    samples_file: Path
    input: str
    samples: np.ndarray = field(repr=False)


def load_model_info(repository: Path, name: str) -> ModelInfo:
    """The latest version of a model, its input name and its real held-out samples."""
    config = json.loads((repository / name / "config.json").read_text())
    versions = [int(p.name) for p in (repository / name).iterdir() if p.name.isdigit()]
    if not versions:
        raise SystemExit(f"model '{name}' has no version folder under {repository / name}")
    folder = repository / name / str(max(versions))
    with np.load(folder / "samples.npz") as data:
        samples = data["inputs"].astype(np.float32)
    return ModelInfo(
        name,
        max(versions),
        folder / "model.onnx",
        folder / "samples.npz",
        config["inputs"][0]["name"],
        samples,
    )
