"""Train, export, verify and publish models into a Triton-style model repository.

For each model a new `<repository>/<name>/<version>/` (max + 1; older versions stay) receives
`model.onnx`, accepted variants, `checkpoint.pt`, `metrics.json` and `samples.npz` (up to 256
held-out inputs as `inputs`, their ground truth as `targets`, and the ONNX graph's outputs under
their own names). It is published by `export.publish` (a hidden staging folder renamed into place
once parity holds, then `<repository>/<name>/config.json` rewritten with the version appended to
its history), the pipeline `onnxserve export` shares. Top-level `metrics`, `parity`, `threshold`
and `normalization` describe the newest version; each history entry keeps its own metrics (the
autoencoder's include its `threshold`). Variants: `optimized`, `int8` and `fp16` (the FP16 graph
keeps each spec's `keep_fp32` nodes, its pre/post-processing, in FP32).

A model whose newest version has the current fingerprint (its sources, hyperparameters, the quick
flag and the opset) and whose file exists is skipped unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from export.onnx_export import OPSET, export_onnx
from export.publish import merge_config, publish_version, save_samples, version_entry
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
)

log = logging.getLogger(__name__)

MODEL_NAMES: tuple[str, ...] = tuple(SPECS)
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

    published = publish_version(
        model_dir,
        [v.version for v in config.versions] if config else [],
        lambda folder, version: _make(spec, folder, version, fp, quick),
        lambda made: _config(spec, *made, config),
    )
    metrics = published.made[1].metrics
    return _result(spec.name, published.version, False, start, metrics, model_dir)


def _make(
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
    variants = make_variants(
        model_path, trained.evaluate, spec.tolerance, baseline=onnx_value, keep_fp32=spec.keep_fp32
    )
    save_samples(folder, sample_x, ort_predict(session)(sample_x), targets=sample_y)
    entry = version_entry(
        model_path,
        version,
        OPSET,
        parity=parity,
        variants=variants,
        metrics=trained.metrics,
        fingerprint=fp,
    )
    return trained, entry


def _config(
    spec: ModelSpec, trained: Trained, entry: Version, previous: ModelConfig | None
) -> ModelConfig:
    """The model's config with `entry` appended to the previous history; knobs a user may have
    tuned in config.json (batching, instances, version policy) survive a rebuild."""
    normalization = trained.extras.get("normalization")
    fields = {
        "name": spec.name,
        "task": spec.task,
        "description": spec.description,
        "inputs": [s.model_dump() for s in spec.inputs],
        "outputs": [s.model_dump() for s in spec.outputs],
        "labels": list(spec.labels) if spec.labels else None,
        "threshold": trained.extras.get("threshold"),
        "normalization": Normalization(**normalization, applies_to=NORMALIZED).model_dump()
        if normalization
        else None,
        "preprocessing": spec.preprocessing,
    }
    if previous is None:
        fields["batching"] = spec.batching.model_dump()
    return merge_config(previous.model_dump() if previous else None, fields, entry)


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
