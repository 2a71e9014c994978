"""Train, export, verify and publish models into a Triton-style model repository.

For each model a new `<repository>/<name>/<version>/` (max + 1; older versions stay) receives
`model.onnx`, accepted variants, `checkpoint.pt`, `metrics.json` and `samples.npz` (up to 256
held-out inputs as `inputs`, their ground truth as `targets`, and the ONNX graph's outputs under
their own names). It is built in a hidden `.building-<version>-*` folder, renamed into place once
parity holds; then `<repository>/<name>/config.json` is rewritten with the version appended to its
history. Top-level `metrics`, `parity`, `threshold` and `normalization` describe the newest version;
each history entry keeps its own metrics (the autoencoder's include its `threshold`).

A model whose newest version has the current fingerprint (its sources, hyperparameters, the quick
flag and the opset) and whose file exists is skipped unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from export.onnx_export import OPSET, export_onnx
from export.specs import COMMON_SOURCES, SPECS, ModelSpec
from export.variants import make_variants
from export.verify import check_parity, ort_predict, ort_session
from models.train import Trained
from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    ModelConfig,
    Normalization,
    Version,
    load_config,
    save_config,
)

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = tuple(SPECS)
SAMPLES_FILE = "samples.npz"
NORMALIZED = "weekly changes (first differences of the input series)"
_ROOT = Path(__file__).resolve().parent.parent


def fingerprint(spec: ModelSpec, quick: bool = False) -> str:
    """sha256 over the model's source files, its hyperparameters, the quick flag and the opset."""
    sources = {
        rel: hashlib.sha256((_ROOT / rel).read_bytes()).hexdigest()
        for rel in sorted({*spec.sources, *COMMON_SOURCES})
    }
    payload = {"sources": sources, "hparams": spec.hparams(quick), "quick": quick, "opset": OPSET}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _next_version(model_dir: Path, config: ModelConfig | None) -> int:
    used = [v.version for v in config.versions] if config else []
    if model_dir.is_dir():
        used += [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(used, default=0) + 1


def _up_to_date(model_dir: Path, config: ModelConfig | None, fp: str) -> Version | None:
    if not config or not config.versions:
        return None
    latest = max(config.versions, key=lambda v: v.version)
    exists = (model_dir / str(latest.version) / latest.file).is_file()
    return latest if exists and latest.fingerprint == fp else None


def build_model(
    repository: Path, spec: ModelSpec, force: bool = False, quick: bool = False
) -> dict:
    """Build one model into `repository` (or skip it if up to date); return a result dict."""
    start = time.perf_counter()
    model_dir = Path(repository) / spec.name
    config_path = model_dir / CONFIG_FILE
    config = load_config(config_path) if config_path.is_file() else None
    fp = fingerprint(spec, quick)
    current = None if force else _up_to_date(model_dir, config, fp)
    if current is not None:
        log.info("%s: version %d is up to date, skipped", spec.name, current.version)
        return _result(spec.name, current.version, True, start, current.metrics, model_dir)

    version = _next_version(model_dir, config)
    # Build in a staging folder that readers ignore (not a number), then rename it into place.
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".building-{version}-", dir=model_dir))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server run as another user
    try:
        trained, entry = _publish(spec, staging, version, fp, quick)
        staging.rename(model_dir / str(version))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    save_config(_config(spec, trained, entry, config), config_path)
    log.info("%s: version %d written to %s", spec.name, version, model_dir / str(version))
    return _result(spec.name, version, False, start, entry.metrics, model_dir)


def _publish(
    spec: ModelSpec, folder: Path, version: int, fp: str, quick: bool
) -> tuple[Trained, Version]:
    """Train, export, check parity, make variants and samples in `folder`; the history entry."""
    trained = spec.module.train(folder, quick=quick)
    model_path = folder / MODEL_FILE
    sample_x, sample_y = spec.samples()
    export_onnx(trained.module, model_path, sample_x[:2], spec.inputs, spec.outputs, OPSET)
    session = ort_session(model_path)
    parity = check_parity(
        trained.module, session, spec.parity_batches(), trained.outputs, argmax=spec.argmax
    )
    metric = spec.tolerance.metric
    onnx_value = trained.evaluate(ort_predict(session))[metric]
    parity |= {"metric": metric, "torch": trained.metrics[metric], "onnx": onnx_value}
    variants = make_variants(model_path, trained.evaluate, spec.tolerance, baseline=onnx_value)
    outputs = ort_predict(session)(sample_x)
    np.savez_compressed(folder / SAMPLES_FILE, inputs=sample_x, targets=sample_y, **outputs)
    entry = Version(
        version=version,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        file=MODEL_FILE,
        sha256=hashlib.sha256(model_path.read_bytes()).hexdigest(),
        size_bytes=model_path.stat().st_size,
        opset=OPSET,
        fingerprint=fp,
        metrics=trained.metrics,
        parity=parity,
        variants=variants,
    )
    return trained, entry


def _config(
    spec: ModelSpec, trained: Trained, entry: Version, previous: ModelConfig | None
) -> ModelConfig:
    """The model's config with `entry` appended to the previous history."""
    normalization = trained.extras.get("normalization")
    return ModelConfig(
        name=spec.name,
        task=spec.task,
        description=spec.description,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        labels=list(spec.labels) if spec.labels else None,
        threshold=trained.extras.get("threshold"),
        normalization=Normalization(**normalization, applies_to=NORMALIZED)
        if normalization
        else None,
        preprocessing=spec.preprocessing,
        # knobs a user may have tuned in config.json survive a rebuild
        batching=previous.batching if previous else spec.batching,
        instance_count=previous.instance_count if previous else 1,
        metrics=entry.metrics,
        parity=entry.parity,
        versions=[*(previous.versions if previous else []), entry],
    )


def _result(
    name: str, version: int, skipped: bool, start: float, metrics: dict, model_dir: Path
) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": dict(metrics),
        "path": str(model_dir / str(version)),
    }


def build_repository(
    repository: Path,
    models: Sequence[str] = MODEL_NAMES,
    force: bool = False,
    quick: bool = False,
) -> list[dict]:
    """Build each of `models` into `repository`; return one result dict per model with `name`,
    `version`, `skipped`, `seconds`, `metrics` and `path` (the version folder).

    `force` retrains even when up to date; `quick` trains a few epochs only (smoke tests: the
    metric targets do not hold). Unknown names raise KeyError before anything is built.
    """
    unknown = [m for m in models if m not in SPECS]
    if unknown:
        raise KeyError(f"unknown models {unknown}; choose from {list(MODEL_NAMES)}")
    repository = Path(repository)
    repository.mkdir(parents=True, exist_ok=True)
    return [
        build_model(repository, SPECS[name], force=force, quick=quick)
        for name in tqdm(models, desc="build", unit="model", disable=None)
    ]
