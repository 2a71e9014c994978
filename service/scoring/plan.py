"""What a scoring job will do, checked before any work: model, input shape, output, fingerprint.

Everything that can be known to fail fails here, with a ScoringError naming the fix: a missing or
unreadable input, an unknown model or version, rows that cannot take the model's input shape, an
output made with other arguments.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.codec import NP_TYPES
from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    ConfigError,
    ModelConfig,
    load_config,
    version_dirs,
)
from service.scoring import ScoringError
from service.scoring.readers import Reader, open_reader
from service.scoring.writer import Output

DEFAULT_BATCH_SIZE = 256
DEFAULT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class ModelInput:
    """How a row of `width` values becomes one sample of the model's only input."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # the non-batch shape; -1 marks a dynamic axis

    @classmethod
    def of(cls, config: ModelConfig) -> ModelInput:
        if len(config.inputs) != 1:
            names = ", ".join(i.name for i in config.inputs)
            raise ScoringError(
                f"model '{config.name}' takes {len(config.inputs)} inputs ({names}); "
                "batch scoring feeds one input per row"
            )
        spec = config.inputs[0]
        if spec.datatype not in NP_TYPES:
            raise ScoringError(f"model '{config.name}' takes {spec.datatype}, not numbers")
        return cls(spec.name, NP_TYPES[spec.datatype], tuple(spec.shape[1:]))

    def fit(self, width: int, model: str) -> ModelInput:
        """This input for rows of `width` values (a dynamic axis, if any, absorbs the width)."""
        fixed = int(np.prod([d for d in self.shape if d != -1], dtype=np.int64))
        dynamic = self.shape.count(-1)
        if dynamic > 1:
            raise ScoringError(f"model '{model}' input {list(self.shape)} has several dynamic axes")
        if (dynamic and width % fixed == 0 and width) or (not dynamic and width == fixed):
            shape = tuple(width // fixed if d == -1 else d for d in self.shape)
            return ModelInput(self.name, self.dtype, shape)
        wants = f"a multiple of {fixed}" if dynamic else str(fixed)
        raise ScoringError(
            f"input rows have {width} values; model '{model}' input '{self.name}' of shape "
            f"{[-1, *self.shape]} takes {wants} values per row"
        )

    def batch(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of flattened samples as the model's input (after `fit`)."""
        shaped = values.reshape((len(values), *self.shape))
        return {self.name: np.ascontiguousarray(shaped, self.dtype)}


def local_model(repository: Path, name: str, version: str | None) -> tuple[ModelConfig, int, Path]:
    """A model's config, version and file in a repository on disk (default: highest version)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ScoringError(f"no model repository at {repository}: run `onnxserve build`")
    config_path = repository / name / CONFIG_FILE
    if not config_path.is_file():
        known = sorted(p.parent.name for p in repository.glob(f"*/{CONFIG_FILE}"))
        raise ScoringError(
            f"unknown model '{name}' in {repository} (models: {', '.join(known) or 'none'})"
        )
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise ScoringError(str(exc)) from None
    versions = version_dirs(repository / name)
    if not versions:
        raise ScoringError(f"model '{name}' has no <version>/{MODEL_FILE} in {repository}")
    if version is None:
        chosen = versions[-1]
    elif not version.isdigit() or int(version) not in versions:
        raise ScoringError(f"model '{name}' has no version {version} (versions: {versions})")
    else:
        chosen = int(version)
    return config, chosen, repository / name / str(chosen) / MODEL_FILE


@dataclass
class Plan:
    """A checked job: the model, the input's reader, the output and the job's fingerprint."""

    config: ModelConfig
    version: int
    engine: str
    reader: Reader
    output: Output
    model_input: ModelInput  # fitted to the input's rows
    batch_size: int
    chunk_rows: int

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The arguments that fix the output; resuming is refused when they differ."""
        return {
            "model": self.config.name,
            "version": self.version,
            "engine": self.engine,
            "input": self.reader.identity(),
            "batch_size": self.batch_size,
            "chunk_rows": self.chunk_rows,
        }


def prepare(
    config: ModelConfig,
    version: int,
    input_path: Path,
    output_path: Path,
    *,
    engine: str,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    columns: list[str] | None = None,
) -> Plan:
    """Check a job end to end before any work (ScoringError with the fix otherwise)."""
    if batch_size < 1 or chunk_rows < 1:
        raise ScoringError("batch size and chunk rows must be positive")
    if importlib.util.find_spec("pyarrow") is None:
        raise ScoringError("batch scoring needs pyarrow: pip install 'onnxserve[score]'")
    model_input = ModelInput.of(config)
    dtype = model_input.dtype if model_input.dtype.kind == "f" else np.dtype(np.float64)
    reader = open_reader(Path(input_path), dtype, columns)
    if reader.rows == 0:
        raise ScoringError(f"{input_path}: holds no rows to score")
    fitted = model_input.fit(reader.width, config.name)
    output = Output(Path(output_path))
    plan = Plan(config, version, engine, reader, output, fitted, batch_size, chunk_rows)
    output.check(plan.fingerprint)
    return plan
