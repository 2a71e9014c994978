"""Metrics measured through a `Predict` callable, so PyTorch and ONNX Runtime share one code path.

A `Predict` maps a float32 input array (batch first) to the model's named outputs as NumPy arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` PyTorch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_predict(
    module: nn.Module, outputs: Sequence[str], batch_size: int = 256, threads: int = 1
) -> Predict:
    """A `Predict` running `module` (eval mode, no grad) in chunks of `batch_size` on `threads`
    intra-op threads (one by default: these models are too small to gain from more)."""

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        module.eval()
        chunks: list[tuple[torch.Tensor, ...]] = []
        with torch_threads(threads), torch.inference_mode():
            for i in range(0, len(x), batch_size):
                out = module(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])))
                chunks.append(out if isinstance(out, tuple) else (out,))
        return {
            name: np.concatenate([c[k].numpy() for c in chunks]) for k, name in enumerate(outputs)
        }

    return predict


def rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error."""
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.sqrt(np.mean(diff**2)))


def auroc(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Area under the ROC curve of scores separating `anomalous` (positive) from `normal`."""
    scores = np.concatenate([normal, anomalous])
    truth = np.concatenate([np.zeros(len(normal)), np.ones(len(anomalous))])
    from sklearn.metrics import roc_auc_score  # imported here: it costs seconds at start-up

    return float(roc_auc_score(truth, scores))
