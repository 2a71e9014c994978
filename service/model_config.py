"""The model repository's `config.json`: one pydantic model, validated on load.

The layout follows Triton's: `<repository>/<name>/config.json` beside version folders
`<repository>/<name>/<version>/model.onnx`. `export/` writes these files; `service/` reads them.
"""

from __future__ import annotations

import json
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
    "BYTES": "object",  # strings: Python str/bytes in an object array (ONNX STRING)
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
    "BYTES",
]
Task = Literal["classification", "forecast", "anomaly"]

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
#: Real held-out inputs (`inputs`), their ground truth (`targets`) and the graph's outputs, saved
#: beside a version's model by the build; load tests and tests read them when present.
SAMPLES_FILE = "samples.npz"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    """One input or output: its name, datatype and shape (-1 marks a dynamic axis)."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int]
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

    max_batch_size: int = Field(default=32, ge=0, description="0: no batch axis (Triton's meaning)")
    max_queue_delay_ms: float = Field(default=2.0, ge=0)
    max_queue_size: int = Field(default=1024, ge=1)
    timeout_ms: float = Field(default=10_000, gt=0)


class VersionPolicy(_Strict):
    """Which versions serve, in Triton's form: `{"latest": {"num_versions": N}}`, `{"all": {}}`
    or `{"specific": {"versions": [1, 3]}}` (exactly one key)."""

    latest: dict[str, int] | None = None
    all: dict[str, Any] | None = None
    specific: dict[str, list[int]] | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of latest, all, specific (got {given})")
        if self.latest is not None and self.latest.get("num_versions", 1) < 1:
            raise ValueError("latest.num_versions must be at least 1")
        if self.specific is not None and not self.specific.get("versions"):
            raise ValueError("specific.versions must list at least one version")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions (ascending) of `available` that this policy serves."""
        if self.all is not None:
            return sorted(available)
        if self.specific is not None:
            wanted = set(self.specific["versions"])
            return [v for v in sorted(available) if v in wanted]
        assert self.latest is not None
        return sorted(available)[-self.latest.get("num_versions", 1) :]


class Limits(_Strict):
    """The most one request may ask of the model; unset fields take the server's defaults
    (`--max-rows`, `--max-elements`, `--max-dim`; a forecast model's window defaults to 1024)."""

    max_rows: int | None = Field(default=None, ge=1)
    max_elements: int | None = Field(default=None, ge=1)
    max_dim: int | None = Field(default=None, ge=1, description="Each dynamic non-batch axis.")


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
    task: Task | None = None  # None: a plain tensor model, served as is
    description: str = ""
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    labels: list[str] | None = None
    threshold: float | None = None
    normalization: Normalization | None = None
    preprocessing: str = ""
    batching: Batching = Field(default_factory=Batching)
    instance_count: int = Field(default=1, ge=1)
    version_policy: VersionPolicy | None = None  # None: the server's --version-policy
    limits: Limits = Field(default_factory=Limits)
    allow_non_finite: bool = False  # NaN / inf in float inputs are refused unless True
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
            if not self.labels or not self.outputs[0].shape:
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

    @property
    def batchable(self) -> bool:
        """True when the first axis of every tensor is the batch axis (max_batch_size > 0)."""
        return self.batching.max_batch_size > 0

    def output(self, name: str) -> TensorSpec:
        """The output spec called `name` (KeyError if there is none)."""
        for spec in self.outputs:
            if spec.name == name:
                return spec
        raise KeyError(name)


class ConfigError(ValueError):
    """A config.json that cannot be read or does not validate; the message names the field."""


def describe_errors(exc: ValidationError) -> str:
    """A validation error as `field: problem; field: problem`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
    )


def load_config(path: Path) -> ModelConfig:
    """Read and validate one complete `config.json`, raising ConfigError with the fields named."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        return ModelConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"{path}: invalid config: {describe_errors(exc)}") from exc


def read_config_doc(path: Path) -> dict[str, Any] | None:
    """A possibly partial `config.json` as a JSON object (None when the file does not exist);
    ConfigError if it is not a readable JSON object. Completion happens against the graph."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{CONFIG_FILE}: cannot read ({exc.strerror})") from exc
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{CONFIG_FILE}: must be a JSON object")
    return doc


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


def latest_version_dir(model_dir: Path) -> Path:
    """The highest version folder holding a model file (the one served by default).

    FileNotFoundError if the model has no version yet.
    """
    versions = version_dirs(model_dir)
    if not versions:
        raise FileNotFoundError(f"no <version>/{MODEL_FILE} under {model_dir}")
    return Path(model_dir) / str(versions[-1])
