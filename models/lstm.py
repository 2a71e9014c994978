"""`lstm`: next-week CO2 forecast from a window of raw levels (ppm), all maths inside the graph.

The graph takes `series [N, T, 1]` (T >= 3), differences it, standardises the weekly changes with
the training range's mean/std, runs a 2-layer LSTM, predicts the next standardised change, and
returns `forecast [N, 1] = last level + change` in ppm. Differencing keeps the model valid on a
tail that lies above the training range of levels.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.data import Co2, load_co2
from models.evaluate import Predict, rmse, torch_predict
from models.train import Trained, fit, hyperparameters, seed_everything, train_config

INPUT = "series"
OUTPUTS = ("forecast",)
EVAL_WINDOW = 52  # window length used for the reported metrics and the stored samples

HPARAMS: dict[str, Any] = {
    "hidden": 32,
    "layers": 2,
    "window": 52,
    "epochs": 40,
    "batch_size": 64,
    "lr": 3e-3,
    "weight_decay": 0.0,
    "patience": 8,
    "seed": 0,
}
QUICK: dict[str, Any] = {"epochs": 2}


class Forecaster(nn.Module):
    """Raw levels `[N, T, 1]` -> next level `[N, 1]`, via standardised first differences."""

    def __init__(self, mean: float, std: float, hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.lstm = nn.LSTM(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        change = (series[:, 1:] - series[:, :-1] - self.mean) / self.std
        out, _ = self.lstm(change)
        return series[:, -1] + self.head(out[:, -1]) * self.std + self.mean


def evaluate(predict: Predict, data: Co2, window: int = EVAL_WINDOW) -> dict[str, float]:
    """RMSE (ppm) on the held-out tail, beside the naive and seasonal-naive baselines."""
    x, y = data.test_windows(window)
    return {"rmse": rmse(predict(x)["forecast"], y), **data.baseline_rmse()}


def train(out_dir: Path, *, quick: bool = False, **overrides: Any) -> Trained:
    """Train on windows whose targets lie in the training range; validate on the next 15%."""
    hp = hyperparameters(HPARAMS, QUICK, quick, **overrides)
    seed_everything(hp["seed"])
    data = load_co2()
    mean, std = data.train_diff_stats()
    model = Forecaster(mean, std, hp["hidden"], hp["layers"])
    train_xy = data.windows(hp["window"], 0, data.train_end)
    val_xy = data.windows(hp["window"], data.train_end, data.val_end)
    score = partial(evaluate, data=data)
    result = fit(
        model,
        nn.functional.mse_loss,
        tuple(map(torch.from_numpy, train_xy)),
        tuple(map(torch.from_numpy, val_xy)),
        train_config(hp),
        out_dir / "checkpoint.pt",
        evaluate=lambda m: score(torch_predict(m, OUTPUTS)),
        hparams=hp,
        desc="lstm",
    )
    extras = {"normalization": {"mean": mean, "std": std}}
    return Trained(model, OUTPUTS, score, result.summary, extras)
