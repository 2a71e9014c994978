"""Every graph of the repository (FP32 and each accepted variant) on the device against the CPU:
outputs, the task metric on the stored held-out samples, and where the nodes landed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    SAMPLES_FILE,
    ModelConfig,
    latest_version_dir,
    load_config,
)
from service.postprocess import predictions
from service.runtime import ModelRuntime, RuntimeOptions

CHUNK = 64  # rows per run when scoring the samples


@dataclass(frozen=True)
class Graph:
    """One servable graph of a model's latest version: `fp32` (model.onnx) or a variant."""

    model: str
    version: int
    kind: str
    path: Path


@dataclass(frozen=True)
class Model:
    """A model of the repository with its held-out samples."""

    name: str
    config: ModelConfig
    folder: Path
    inputs: np.ndarray
    targets: np.ndarray

    @property
    def input_name(self) -> str:
        return self.config.inputs[0].name

    @property
    def max_batch_size(self) -> int:
        return self.config.batching.max_batch_size


def load_model(repository: Path, name: str) -> Model:
    """A model's config, latest version folder and samples (`inputs`, `targets`) as FP32 rows."""
    config = load_config(repository / name / CONFIG_FILE)
    folder = latest_version_dir(repository / name)
    with np.load(folder / SAMPLES_FILE) as data:
        inputs, targets = data["inputs"].astype(np.float32), data["targets"]
    return Model(name, config, folder, inputs, targets)


def graphs(model: Model) -> list[Graph]:
    """FP32 and every accepted variant of the latest version, in that order."""
    version = int(model.folder.name)
    found = [Graph(model.name, version, "fp32", model.folder / MODEL_FILE)]
    entry = next((v for v in model.config.versions if v.version == version), None)
    for variant in entry.variants if entry else []:
        if variant.accepted and (model.folder / variant.file).is_file():
            found.append(Graph(model.name, version, variant.kind, model.folder / variant.file))
    return found


def run_all(runtime: ModelRuntime, name: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every output for all `inputs`, run in chunks of CHUNK rows."""
    parts = [runtime.run({name: inputs[i : i + CHUNK]}) for i in range(0, len(inputs), CHUNK)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive outscores a negative (ties count half)."""
    scores, positive = np.asarray(scores, float).ravel(), np.asarray(labels).ravel() == 1
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def task_metric(config: ModelConfig, outputs: dict[str, np.ndarray], targets: np.ndarray) -> tuple:
    """(metric name, value) of the model's task on the samples: the metric its build records."""
    if config.task is None:
        return None, None
    columns = predictions(config, outputs)
    if config.task == "classification":
        return "accuracy", float(np.mean(columns["class_index"] == targets.ravel()))
    if config.task == "forecast":
        error = columns["forecast"].astype(float) - targets.astype(float).ravel()
        return "rmse", float(np.sqrt(np.mean(error**2)))
    return "auroc", auroc(columns["score"], targets)


def differences(device: dict[str, np.ndarray], cpu: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Max absolute difference per float output, and the share of differing values per other
    output (labels, indices)."""
    floats, others = {}, {}
    for name, expected in cpu.items():
        got = device[name]
        if np.issubdtype(expected.dtype, np.floating):
            diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
            floats[name] = float(diff.max()) if diff.size else 0.0
        else:
            others[name] = float(np.mean(got != expected)) if expected.size else 0.0
    return floats, others


def session_facts(runtime: ModelRuntime) -> dict[str, Any]:
    """What the device session reports: provider, fallback, placement, options, CUDA graph."""
    first = runtime.sessions[0]
    return {
        "provider": runtime.provider,
        "fallback_reason": runtime.fallback_reason,
        "nodes": first.nodes,
        "cpu_compute_nodes": first.cpu_compute_nodes,
        "option_mismatches": {k: list(v) for k, v in first.option_mismatches.items()},
        "provider_options": first.provider_options,
    }


def check_graph(
    model: Model, graph: Graph, device: RuntimeOptions, cpu: RuntimeOptions, reference: dict
) -> dict[str, Any]:
    """One graph on the device and on the CPU: differences, labels, metric, placement.

    `reference` is the FP32 graph's CPU result ({"metric", "value"}) for the metric deltas."""
    on_cpu = ModelRuntime(graph.path, cpu)
    on_device = ModelRuntime(graph.path, device)
    expected = run_all(on_cpu, model.input_name, model.inputs)
    got = run_all(on_device, model.input_name, model.inputs)
    metric, value = task_metric(model.config, got, model.targets)
    floats, others = differences(got, expected)
    _, cpu_value = task_metric(model.config, expected, model.targets)
    row: dict[str, Any] = {
        "model": model.name,
        "version": graph.version,
        "kind": graph.kind,
        "file": graph.path.name,
        "samples": len(model.inputs),
        "max_abs_diff": floats,
        "mismatched": others,
        "metric": metric,
        "device_value": value,
        "cpu_value": cpu_value,
        "fp32_cpu_value": reference.get("value"),
        **session_facts(on_device),
    }
    if model.config.task == "classification":
        columns = predictions(model.config, got), predictions(model.config, expected)
        row["labels_identical"] = bool(
            np.array_equal(columns[0]["class_index"], columns[1]["class_index"])
        )
    return row


def check_model(model: Model, device: RuntimeOptions, cpu: RuntimeOptions) -> list[dict]:
    """Every graph of one model; the FP32 graph first (its CPU metric is the reference)."""
    rows: list[dict] = []
    reference: dict = {}
    for graph in graphs(model):
        row = check_graph(model, graph, device, cpu, reference)
        if graph.kind == "fp32":
            reference = {"metric": row["metric"], "value": row["cpu_value"]}
            row["fp32_cpu_value"] = row["cpu_value"]
        rows.append(row)
    return rows
