"""`autoencoder`: a dense autoencoder on the digits; the serving graph scores each image.

The score is the per-sample mean squared reconstruction error, computed inside the graph. The
threshold is the 99th percentile of the validation digits' scores, so about 1% of clean digits
are flagged. Anomalies for evaluation are the clean test digits corrupted two ways: 30%
salt-and-pepper noise, and a bright 10x10 occluding block.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.data import IMAGE_SIZE, DigitSplits, load_digit_splits, occlude, salt_and_pepper
from models.evaluate import Predict, auroc, torch_predict
from models.train import Trained, fit, hyperparameters, seed_everything, train_config

INPUT = "image"
OUTPUTS = ("reconstruction", "score")
QUANTILE = 0.99

HPARAMS: dict[str, Any] = {
    "hidden": [256, 64],
    "latent": 32,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "patience": 6,
    "seed": 0,
}
QUICK: dict[str, Any] = {"epochs": 2}


class AutoEncoder(nn.Module):
    """Dense encoder/decoder over flattened 28x28 images; sigmoid output in [0, 1]."""

    def __init__(self, hidden: Sequence[int] = (256, 64), latent: int = 32) -> None:
        super().__init__()
        widths = [IMAGE_SIZE * IMAGE_SIZE, *hidden, latent]
        layers: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        widths.reverse()
        for w_in, w_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers[-1] = nn.Sigmoid()
        layers.append(nn.Unflatten(1, (1, IMAGE_SIZE, IMAGE_SIZE)))
        self.net = nn.Sequential(*layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


class Scorer(nn.Module):
    """Serving graph: the reconstruction `[N, 1, 28, 28]` and its mean squared error `[N]`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon = self.net(image)
        return recon, ((recon - image) ** 2).mean(dim=(1, 2, 3))


def corruptions(x: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The anomalies evaluated: the same digits with salt-and-pepper noise / an occluding block."""
    return {"salt_pepper": salt_and_pepper(x, 0.3, seed), "occlusion": occlude(x, 10, seed)}


def evaluate(predict: Predict, data: DigitSplits, threshold: float) -> dict[str, float]:
    """AUROC of clean test digits vs each corruption (and their minimum), plus the threshold's
    false-positive rate on clean test digits and its detection rate on each corruption."""
    clean = predict(data.test.x.numpy())["score"]
    metrics = {"threshold": threshold, "fpr_clean": float(np.mean(clean > threshold))}
    for kind, x in corruptions(data.test.x).items():
        scores = predict(x.numpy())["score"]
        metrics[f"auroc_{kind}"] = auroc(clean, scores)
        metrics[f"tpr_{kind}"] = float(np.mean(scores > threshold))
    metrics["auroc"] = min(metrics["auroc_salt_pepper"], metrics["auroc_occlusion"])
    return metrics


def calibrate(predict: Predict, x: np.ndarray, quantile: float = QUANTILE) -> float:
    """The score threshold: the `quantile` of the scores of `x` (validation digits)."""
    return float(np.quantile(predict(x)["score"], quantile))


def train(out_dir: Path, *, quick: bool = False, **overrides: Any) -> Trained:
    """Train to reconstruct the train digits; calibrate on validation; evaluate on test."""
    hp = hyperparameters(HPARAMS, QUICK, quick, **overrides)
    seed_everything(hp["seed"])
    data = load_digit_splits()
    serving = Scorer(AutoEncoder(hp["hidden"], hp["latent"]))

    def measure(_: nn.Module) -> dict[str, float]:
        predict = torch_predict(serving, OUTPUTS)
        return evaluate(predict, data, calibrate(predict, data.val.x.numpy()))

    result = fit(
        serving.net,
        nn.functional.mse_loss,
        (data.train.x, data.train.x),
        (data.val.x, data.val.x),
        train_config(hp),
        out_dir / "checkpoint.pt",
        evaluate=measure,
        hparams=hp,
        desc="autoencoder",
    )
    threshold = result.metrics["threshold"]
    score = partial(evaluate, data=data, threshold=threshold)
    return Trained(serving.eval(), OUTPUTS, score, result.summary, {"threshold": threshold})
