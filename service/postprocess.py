"""Task-level answers from raw model outputs: one implementation for v1 and batch scoring.

The ONNX graphs already hold the tensor maths (softmax, the LSTM's de-standardisation, the
autoencoder's score); what is left is what needs the config: labels and the anomaly threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.model_config import ModelConfig

Columns = dict[str, np.ndarray]
#: The output each task reads its answer from.
TASK_OUTPUTS = {"classification": "probabilities", "anomaly": "score", "forecast": "forecast"}


def _output(config: ModelConfig, outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return outputs[name]
    except KeyError:
        have = ", ".join(outputs)
        raise KeyError(f"model '{config.name}' has no output '{name}' (has {have})") from None


def predictions(config: ModelConfig, outputs: dict[str, np.ndarray]) -> Columns:
    """Columns of per-row answers for the model's task.

    classification: `label`, `class_index`, `probabilities`; anomaly: `score`, `is_anomaly`;
    forecast: `forecast` (in the series' original units); no task: every output as it is.
    """
    if config.task is None:
        return dict(outputs)
    if config.task == "classification":
        probs = _output(config, outputs, TASK_OUTPUTS["classification"])
        index = probs.argmax(axis=1)
        labels = np.asarray(config.labels, dtype=object)
        return {"label": labels[index], "class_index": index, "probabilities": probs}
    if config.task == "anomaly":
        score = _output(config, outputs, TASK_OUTPUTS["anomaly"]).reshape(-1)
        return {"score": score, "is_anomaly": score > config.threshold}
    forecast = _output(config, outputs, TASK_OUTPUTS["forecast"])
    return {"forecast": forecast.reshape(forecast.shape[0], -1)[:, 0]}


def as_instances(columns: Columns) -> list[dict[str, Any]]:
    """Rows of JSON-ready dicts, one per input row (the v1 `predictions` list)."""
    lists = {k: v.tolist() for k, v in columns.items()}
    rows = len(next(iter(lists.values()))) if lists else 0
    return [{k: v[i] for k, v in lists.items()} for i in range(rows)]
