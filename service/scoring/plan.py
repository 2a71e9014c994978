"""What a scoring job will do, checked before any work: model, input shape, output, fingerprint.

Everything that can be known to fail fails here, with a ScoringError naming the fix: a missing or
unreadable input, an unknown model or version, rows that cannot take the model's input shape, an
output made with other arguments.

Two ways rows reach a model:
- `ModelInput`: a row of `width` numbers (from .npy, .parquet or .csv) becomes one sample of the
  model's only input;
- `ModelInputs`: a row of an .npz (one array per input name, rows on the first axis) feeds every
  input at once, in its own datatype (strings included). Models with several inputs, or a BYTES
  input, take their rows this way.
A model without a batch axis (`max_batch_size` 0) takes one row per call, the row being its whole
input tensor; its outputs come back as one row each.
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
    read_config_doc,
    version_dirs,
)
from service.scoring import ScoringError
from service.scoring.readers import NPZ, NpzReader, Reader, open_reader
from service.scoring.writer import ROW, Output

DEFAULT_BATCH_SIZE = 256
DEFAULT_CHUNK_ROWS = 8192
Arrays = dict[str, np.ndarray]


def _rows_of(batched: bool, outputs: Arrays) -> Arrays:
    """A model without a batch axis answers one whole tensor per call: make it one row."""
    return outputs if batched else {name: value[None] for name, value in outputs.items()}


@dataclass(frozen=True)
class ModelInput:
    """How a row of `width` values becomes one sample of the model's only input."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # a sample's shape (without the batch axis); -1 marks a dynamic axis
    batched: bool = True  # False: no batch axis, the row is the whole input tensor

    @classmethod
    def of(cls, config: ModelConfig) -> ModelInput:
        if len(config.inputs) != 1:
            names = ", ".join(i.name for i in config.inputs)
            raise ScoringError(
                f"model '{config.name}' takes {len(config.inputs)} inputs ({names}); give an "
                ".npz input with one array per input name"
            )
        spec = config.inputs[0]
        if spec.datatype not in NP_TYPES or NP_TYPES[spec.datatype].kind not in "biuf":
            raise ScoringError(
                f"model '{config.name}' takes {spec.datatype}, not numbers; give an .npz input "
                f"with an array named '{spec.name}'"
            )
        batched = config.batchable
        shape = tuple(spec.shape[1:] if batched else spec.shape)
        return cls(spec.name, NP_TYPES[spec.datatype], shape, batched)

    def fit(self, width: int, model: str) -> ModelInput:
        """This input for rows of `width` values (a dynamic axis, if any, absorbs the width)."""
        fixed = int(np.prod([d for d in self.shape if d != -1], dtype=np.int64))
        dynamic = self.shape.count(-1)
        if dynamic > 1:
            raise ScoringError(f"model '{model}' input {list(self.shape)} has several dynamic axes")
        if (dynamic and width % fixed == 0 and width) or (not dynamic and width == fixed):
            shape = tuple(width // fixed if d == -1 else d for d in self.shape)
            return ModelInput(self.name, self.dtype, shape, self.batched)
        wants = f"a multiple of {fixed}" if dynamic else str(fixed)
        whole = [-1, *self.shape] if self.batched else list(self.shape)
        raise ScoringError(
            f"input rows have {width} values; model '{model}' input '{self.name}' of shape "
            f"{whole} takes {wants} values per row"
        )

    def batch(self, values: np.ndarray) -> Arrays:
        """Rows of flattened samples as the model's input (after `fit`)."""
        shaped = values.reshape((len(values), *self.shape) if self.batched else self.shape)
        return {self.name: np.ascontiguousarray(shaped, self.dtype)}

    def rows_of(self, outputs: Arrays) -> Arrays:
        """The model's outputs for `batch(values)`, one row per input row."""
        return _rows_of(self.batched, outputs)


@dataclass(frozen=True)
class ModelInputs:
    """Rows of a structured array (one field per input, see `readers.NpzReader`) as the model's
    inputs, each in its own datatype."""

    specs: tuple[ModelInput, ...]
    batched: bool = True

    @classmethod
    def of(cls, config: ModelConfig) -> ModelInputs:
        batched = config.batchable
        return cls(
            tuple(
                ModelInput(
                    s.name,
                    NP_TYPES[s.datatype],
                    tuple(s.shape[1:] if batched else s.shape),
                    batched,
                )  # fmt: skip
                for s in config.inputs
            ),
            batched,
        )

    def sources(self, arrays: list[str], model: str) -> dict[str, str]:
        """Which array feeds each input: the one named after it (`inputs` also serves a model
        with one input, as in samples.npz)."""
        found = {}
        for spec in self.specs:
            if spec.name in arrays:
                found[spec.name] = spec.name
            elif len(self.specs) == 1 and "inputs" in arrays:
                found[spec.name] = "inputs"
            else:
                raise ScoringError(
                    f"the input has no array '{spec.name}' for model '{model}' (it has "
                    f"{', '.join(arrays) or 'none'}); give one array per input name"
                )
        return found

    def fit(self, fields: dict[str, tuple[np.dtype, tuple[int, ...]]], model: str) -> ModelInputs:
        """Check that each input's field (by input name) has a shape the model takes (same
        rank, fixed axes equal); the fields' exact shapes are then the inputs' shapes."""
        fitted = []
        for spec in self.specs:
            dtype, shape = fields[spec.name]
            fits = len(shape) == len(spec.shape) and all(
                w in (-1, g) for w, g in zip(spec.shape, shape, strict=True)
            )
            whole = [-1, *spec.shape] if self.batched else list(spec.shape)
            if not fits:
                per = "a row" if self.batched else "a row (the whole tensor)"
                raise ScoringError(
                    f"array '{spec.name}' has {per} of shape {list(shape)}; model '{model}' "
                    f"input '{spec.name}' is {whole}"
                )
            if (spec.dtype.kind == "O") != (dtype.kind in "OUS"):
                raise ScoringError(
                    f"array '{spec.name}' holds {dtype}; model '{model}' input '{spec.name}' "
                    f"takes {'strings' if spec.dtype.kind == 'O' else spec.dtype}"
                )
            fitted.append(ModelInput(spec.name, spec.dtype, tuple(shape), self.batched))
        return ModelInputs(tuple(fitted), self.batched)

    def batch(self, values: np.ndarray) -> Arrays:
        """Rows of the structured array as the model's inputs."""
        out = {}
        for spec in self.specs:
            column = values[spec.name]
            if not self.batched:
                column = column.reshape(spec.shape)
            if spec.dtype.kind == "O":
                out[spec.name] = column.astype(str).astype(object)
            else:
                out[spec.name] = np.ascontiguousarray(column, spec.dtype)
        return out

    def rows_of(self, outputs: Arrays) -> Arrays:
        """The model's outputs for `batch(values)`, one row per input row."""
        return _rows_of(self.batched, outputs)


def _graph_config(name: str, doc: dict[str, Any] | None, model_file: Path) -> ModelConfig:
    """`config.json` (maybe partial or absent) completed from the graph, as the server does."""
    from service.autocomplete import complete_config, graph_tensors
    from service.config import get_settings
    from service.runtime import ModelRuntime, RuntimeOptions

    try:
        runtime = ModelRuntime(model_file, RuntimeOptions(intra_op_threads=1))
    except Exception as exc:  # ONNX Runtime refusing the file
        raise ScoringError(f"model '{name}': {model_file} cannot be loaded ({exc})") from None
    return complete_config(
        name,
        doc,
        graph_tensors("input", runtime.inputs.values()),
        graph_tensors("output", runtime.outputs.values()),
        get_settings().default_max_batch_size,
    )


def local_model(repository: Path, name: str, version: str | None) -> tuple[ModelConfig, int, Path]:
    """A model's config, version and file in a repository on disk (default: highest version).

    The config is `config.json` completed from the graph (or inferred whole when there is none),
    as the server does it.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise ScoringError(f"no model repository at {repository}: run `onnxserve build`")
    folder = repository / name
    versions = version_dirs(folder)
    if not versions:
        if not (folder / CONFIG_FILE).is_file():
            known = sorted(p.name for p in repository.iterdir() if version_dirs(p))
            raise ScoringError(
                f"unknown model '{name}' in {repository} (models: {', '.join(known) or 'none'})"
            )
        raise ScoringError(f"model '{name}' has no <version>/{MODEL_FILE} in {repository}")
    if version is None:
        chosen = versions[-1]
    elif not version.isdigit() or int(version) not in versions:
        raise ScoringError(f"model '{name}' has no version {version} (versions: {versions})")
    else:
        chosen = int(version)
    model_file = folder / str(chosen) / MODEL_FILE
    try:
        config = _graph_config(name, read_config_doc(folder / CONFIG_FILE), model_file)
    except ConfigError as exc:
        raise ScoringError(f"model '{name}': {exc}") from None
    return config, chosen, model_file


@dataclass
class Plan:
    """A checked job: the model, the input's reader, the output and the job's fingerprint."""

    config: ModelConfig
    version: int
    engine: str
    reader: Reader
    output: Output
    model_input: ModelInput | ModelInputs  # fitted to the input's rows
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
    root: Path | None = None,
) -> Plan:
    """Check a job end to end before any work (ScoringError with the fix otherwise). Under
    `root` (a server's jobs root) the output is written without following symlinks.

    A model without a batch axis is scored one row per call (`batch_size` is then 1).
    """
    if batch_size < 1 or chunk_rows < 1:
        raise ScoringError("batch size and chunk rows must be positive")
    if importlib.util.find_spec("pyarrow") is None:
        raise ScoringError("batch scoring needs pyarrow: pip install 'onnxserve[score]'")
    if config.task is None and ROW in {o.name for o in config.outputs}:
        raise ScoringError(f"model '{config.name}' has an output named '{ROW}', the row column")
    if not config.batchable:
        batch_size = 1
    feed: ModelInput | ModelInputs
    if Path(input_path).suffix.lower() == NPZ:
        inputs = ModelInputs.of(config)
        reader = open_reader(Path(input_path), np.dtype(np.float64), columns)
        if reader.rows == 0:
            raise ScoringError(f"{input_path}: holds no rows to score")
        assert isinstance(reader, NpzReader)
        sources = inputs.sources(list(reader.fields), config.name)
        reader.pick(sources)
        feed = inputs.fit({i: reader.fields[a] for i, a in sources.items()}, config.name)
    else:
        model_input = ModelInput.of(config)
        dtype = model_input.dtype if model_input.dtype.kind == "f" else np.dtype(np.float64)
        reader = open_reader(Path(input_path), dtype, columns)
        if reader.rows == 0:
            raise ScoringError(f"{input_path}: holds no rows to score")
        feed = model_input.fit(reader.width, config.name)
    output = Output(Path(output_path), root)
    plan = Plan(config, version, engine, reader, output, feed, batch_size, chunk_rows)
    output.check(plan.fingerprint)
    return plan
