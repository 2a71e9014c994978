"""The model repository's `config.json`: one pydantic model, validated on load.

The layout follows Triton's: `<repository>/<name>/config.json` beside version folders
`<repository>/<name>/<version>/model.onnx`. `export/` writes these files; `service/` reads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

#: Open Inference Protocol datatypes the service accepts, mapped to NumPy dtype names.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
Task = Literal["classification", "forecast", "anomaly"]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One input or output: its name, datatype and shape (-1 marks a dynamic axis)."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int] = Field(min_length=1)
    description: str = ""

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        bad = [d for d in shape if d == 0 or d < -1]
        if bad:
            raise ValueError(f"dimensions must be positive or -1 (dynamic), got {bad}")
        return shape


class Batching(_Strict):
    """Dynamic batching knobs; the service may override them per model."""

    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    max_queue_size: int = Field(default=1024, ge=1)
    timeout_ms: float = Field(default=10_000, gt=0)


class Normalization(_Strict):
    """Standardisation constants: `z = (x - mean) / std` (applied inside the ONNX graph)."""

    mean: float
    std: float = Field(gt=0)
    applies_to: str = ""


class Variant(_Strict):
    """An optional optimised or quantised copy of a version's graph."""

    kind: Literal["optimized", "int8", "fp16"]
    file: str
    size_bytes: int = Field(ge=0)
    metric: str
    value: float
    delta: float
    accepted: bool
    reason: str = ""


class Version(_Strict):
    """One entry of the version history."""

    version: int = Field(ge=1)
    created: str
    file: str = MODEL_FILE
    sha256: str = ""
    size_bytes: int = Field(default=0, ge=0)
    opset: int = Field(ge=1)
    fingerprint: str = ""
    metrics: dict[str, float] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    variants: list[Variant] = Field(default_factory=list)


class ModelConfig(_Strict):
    """A model's `config.json`."""

    name: str
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    task: Task
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] | None = None
    threshold: float | None = None
    normalization: Normalization | None = None
    preprocessing: str = ""
    batching: Batching = Field(default_factory=Batching)
    instance_count: int = Field(default=1, ge=1)
    metrics: dict[str, float] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    versions: list[Version] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError("must be 1-64 characters of letters, digits, '_', '.', '-'")
        return name

    @model_validator(mode="after")
    def _task_fields(self) -> ModelConfig:
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: tensor names must be unique, got {names}")
        if self.task == "classification":
            if not self.labels:
                raise ValueError("labels: a classification model needs its class labels")
            width = self.outputs[0].shape[-1]
            if width != -1 and width != len(self.labels):
                raise ValueError(
                    f"labels: {len(self.labels)} labels for an output of width {width}"
                )
        if self.task == "anomaly" and self.threshold is None:
            raise ValueError("threshold: an anomaly model needs its calibrated threshold")
        if self.task == "forecast" and self.normalization is None:
            raise ValueError("normalization: a forecast model needs its normalisation constants")
        return self

    def output(self, name: str) -> TensorSpec:
        """The output spec called `name` (KeyError if there is none)."""
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


class ConfigError(ValueError):
    """A config.json that cannot be read or does not validate; the message names the field."""


def load_config(path: Path) -> ModelConfig:
    """Read and validate one `config.json`, raising ConfigError with the failing fields named."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return ModelConfig.model_validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid config: {problems}") from exc


def save_config(config: ModelConfig, path: Path) -> None:
    """Write `config.json` atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.model_dump_json(indent=2) + "\n")
    tmp.replace(path)


def version_dirs(model_dir: Path) -> list[int]:
    """Version numbers present under a model's folder (those holding a model file), ascending."""
    found = []
    for child in Path(model_dir).iterdir() if Path(model_dir).is_dir() else []:
        if child.is_dir() and child.name.isdigit() and (child / MODEL_FILE).is_file():
            found.append(int(child.name))
    return sorted(found)
