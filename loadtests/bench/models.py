"""The models of the repository as the benchmark uses them: file, input name, real samples."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    SAMPLES_FILE,
    latest_version_dir,
    load_config,
)


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
    config = load_config(repository / name / CONFIG_FILE)
    try:
        folder = latest_version_dir(repository / name)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    with np.load(folder / SAMPLES_FILE) as data:
        samples = data["inputs"].astype(np.float32)
    return ModelInfo(
        name,
        int(folder.name),
        folder / MODEL_FILE,
        folder / SAMPLES_FILE,
        config.inputs[0].name,
        samples,
    )
