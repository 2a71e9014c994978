"""Publishing a new version into a model repository: the one pipeline `onnxserve build` and
`onnxserve export` share.

`publish_version` numbers the version (one more than any in the config's history or on disk),
lets the caller fill a hidden staging folder `<model>/.building-<version>-*` (not a number, so
servers and `version_dirs` ignore it), computes and validates the new `config.json`, and only then
renames the folder to `<model>/<version>` and writes the config atomically. Any failure on the way
(parity, a converter, an invalid config) removes the staging folder (and the model's folder if
this call created it): nothing is published.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    SAMPLES_FILE,
    ModelConfig,
    Variant,
    Version,
    save_config,
)

log = logging.getLogger(__name__)

STAGING_PREFIX = ".building-"
T = TypeVar("T")


def next_version(model_dir: Path, history: Iterable[int] = ()) -> int:
    """One more than the highest version in `history` or among the numbered folders (with or
    without a model file: a half-copied folder's number is not reused)."""
    used = list(history)
    if model_dir.is_dir():
        used += [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(used, default=0) + 1


@dataclass(frozen=True)
class Published(Generic[T]):
    """A published version: its number, folder, config, and what the caller's `make` returned."""

    version: int
    path: Path
    config: ModelConfig
    made: T


def publish_version(
    model_dir: Path,
    history: Iterable[int],
    make: Callable[[Path, int], T],
    configure: Callable[[T], ModelConfig],
) -> Published[T]:
    """Publish version max+1 of the model in `model_dir`: `make(folder, version)` writes its files
    into the staging folder; `configure(made)` returns the model's new config (validated before
    anything becomes visible); then the folder is renamed into place and the config saved."""
    version = next_version(model_dir, history)
    new_model = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server run as another user
    target = model_dir / str(version)
    try:
        made = make(staging, version)
        config = configure(made)  # validated here, before anything becomes visible
        staging.rename(target)  # atomic; fails if someone published this number meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if new_model and not any(model_dir.iterdir()):
            model_dir.rmdir()  # a refused first version leaves no empty model folder behind
        raise
    save_config(config, model_dir / CONFIG_FILE)
    log.info("%s: version %d written to %s", model_dir.name, version, target)
    return Published(version, target, config, made)


def version_entry(
    model_path: Path,
    version: int,
    opset: int,
    *,
    parity: dict[str, Any],
    variants: list[Variant],
    metrics: Mapping[str, float] | None = None,
    fingerprint: str = "",
) -> Version:
    """The history entry of the version whose graph is `model_path` (sha256, size, opset...)."""
    return Version(
        version=version,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        file=MODEL_FILE,
        sha256=hashlib.sha256(model_path.read_bytes()).hexdigest(),
        size_bytes=model_path.stat().st_size,
        opset=opset,
        fingerprint=fingerprint,
        metrics=dict(metrics or {}),
        parity=parity,
        variants=variants,
    )


def merge_config(
    previous: Mapping[str, Any] | None, fields: Mapping[str, Any], entry: Version
) -> ModelConfig:
    """The model's new config: `fields` (what the new version defines) over the previous config's
    other keys (knobs a user tuned: batching, instances, version policy...), `entry` appended to
    the history, and the top-level `metrics` and `parity` those of `entry`.

    `previous` may be a partial `config.json` (a user's batching knobs only, say); pydantic's
    ValidationError names the field if the result is not a valid config.
    """
    doc = dict(previous or {})
    history = list(doc.get("versions") or [])
    doc |= dict(fields)
    doc |= {
        "metrics": entry.metrics,
        "parity": entry.parity,
        "versions": [*history, entry.model_dump()],
    }
    return ModelConfig.model_validate(doc)


def save_samples(
    folder: Path,
    inputs: np.ndarray | Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    targets: np.ndarray | None = None,
) -> Path:
    """Write `samples.npz`: a single input's rows as `inputs` (several inputs: each under its own
    name), the ground truth as `targets` when known, and the graph's outputs under their names."""
    arrays: dict[str, Any] = {"inputs": inputs} if isinstance(inputs, np.ndarray) else {**inputs}
    if targets is not None:
        arrays["targets"] = targets
    clash = sorted(set(arrays) & set(outputs))
    if clash:
        raise ValueError(f"{SAMPLES_FILE}: outputs {clash} clash with input keys {sorted(arrays)}")
    arrays |= outputs
    path = folder / SAMPLES_FILE
    np.savez_compressed(path, **arrays)
    return path
