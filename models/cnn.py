"""`cnn`: a LeNet-style digit classifier; the serving graph returns probabilities and the label."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.conv_arith import conv_output_size, pool_output_size
from models.data import IMAGE_SIZE, Split, load_digit_splits, random_affine
from models.evaluate import Predict, torch_predict
from models.train import Trained, fit, hyperparameters, seed_everything, train_config

INPUT = "image"
OUTPUTS = ("probabilities", "label")
LABELS = tuple(str(d) for d in range(10))

HPARAMS: dict[str, Any] = {
    "channels": [16, 32],
    "kernel": 5,
    "hidden": [120, 84],
    "epochs": 40,
    "batch_size": 32,
    "lr": 2e-3,
    "weight_decay": 0.0,
    "patience": 6,
    "seed": 0,
    "augment": {"degrees": 10.0, "shift": 0.08, "scale": 0.1},
}
QUICK: dict[str, Any] = {"epochs": 2}


def flat_features(channels: Sequence[int], kernel: int, size: int = IMAGE_SIZE) -> int:
    """Width of the first FC layer: each block is a valid conv then a 2x2 max-pool."""
    for _ in channels:
        size = pool_output_size(conv_output_size(size, kernel))
    return channels[-1] * size * size


class LeNet(nn.Module):
    """Conv -> ReLU -> max-pool blocks, then FC layers; returns logits `[N, 10]`."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        kernel: int = 5,
        hidden: Sequence[int] = (120, 84),
        classes: int = 10,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for c_in, c_out in zip([1, *channels], channels, strict=False):
            blocks += [nn.Conv2d(c_in, c_out, kernel), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.flat_features = flat_features(channels, kernel)
        widths = [self.flat_features, *hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        self.classifier = nn.Sequential(*layers, nn.Linear(widths[-1], classes))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


class Classifier(nn.Module):
    """Serving graph: softmax probabilities `[N, 10]` and the argmax label (int64) `[N]`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image)
        return torch.softmax(logits, dim=1), torch.argmax(logits, dim=1)


def evaluate(predict: Predict, split: Split) -> dict[str, float]:
    """Accuracy (fraction) of the predicted labels on `split`."""
    labels = predict(split.x.numpy())["label"]
    return {"accuracy": float(np.mean(labels == split.y.numpy()))}


def train(out_dir: Path, *, quick: bool = False, **overrides: Any) -> Trained:
    """Train on the digits' train split; evaluate on the held-out test split."""
    hp = hyperparameters(HPARAMS, QUICK, quick, **overrides)
    seed_everything(hp["seed"])
    data = load_digit_splits()
    net = LeNet(hp["channels"], hp["kernel"], hp["hidden"])
    serving = Classifier(net)
    score = partial(evaluate, split=data.test)
    result = fit(
        net,
        nn.functional.cross_entropy,
        (data.train.x, data.train.y),
        (data.val.x, data.val.y),
        train_config(hp),
        out_dir / "checkpoint.pt",
        evaluate=lambda _: score(torch_predict(serving, OUTPUTS)),
        hparams=hp,
        augment=partial(random_affine, **hp["augment"]) if hp["augment"] else None,
        desc="cnn",
    )
    return Trained(serving.eval(), OUTPUTS, score, result.summary)
