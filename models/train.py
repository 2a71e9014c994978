"""The one training loop all models share: seeded, CPU, early stopping on validation loss.

`fit` shuffles with its own seeded generator, keeps the weights of the epoch with the lowest
validation loss, restores them when it stops, and writes `checkpoint.pt` plus `metrics.json`
beside it (training history, hyperparameters and whatever `evaluate` measured on the best weights).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from models.evaluate import Predict, torch_threads

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and stopping settings (Adam)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 5
    seed: int = 0
    # These models are tiny: a second intra-op thread gains ~20%, and when the CPU is shared
    # (tests, a server or load tests beside the build) PyTorch's spinning threads run 10x slower.
    threads: int = 1


@dataclass
class FitResult:
    """What `fit` learned: the best epoch, the loss history, the evaluation metrics."""

    best_epoch: int
    best_val_loss: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, float]:
        """The evaluation metrics plus the best epoch and the training time."""
        return {**self.metrics, "best_epoch": self.best_epoch, "train_seconds": self.seconds}


@dataclass
class Trained:
    """A trained model ready to export.

    `module` is the serving graph (eval mode) whose outputs are named `outputs`; `evaluate` measures
    the task metrics of any predictor (PyTorch or ONNX Runtime) on the held-out data; `metrics` are
    those of the PyTorch model plus the training summary; `extras` holds config values such as the
    anomaly threshold or the normalisation constants.
    """

    module: nn.Module
    outputs: tuple[str, ...]
    evaluate: Callable[[Predict], dict[str, float]]
    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


def hyperparameters(
    defaults: Mapping[str, Any],
    quick_overrides: Mapping[str, Any],
    quick: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """A model's hyperparameters: its defaults, then its quick-mode overrides if `quick`, then
    `overrides`; unknown override names raise KeyError."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise KeyError(f"unknown hyperparameters {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **(quick_overrides if quick else {}), **overrides}


def train_config(hparams: Mapping[str, Any]) -> TrainConfig:
    """The `TrainConfig` fields found in a model's hyperparameters."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in hparams.items() if k in names})


def seed_everything(seed: int) -> None:
    """Seed PyTorch's global generator (weight initialisation)."""
    torch.manual_seed(seed)


def _val_loss(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(loss_fn(model(x), y))


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    checkpoint: Path,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    hparams: dict[str, Any] | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    desc: str = "train",
) -> FitResult:
    """Train `model` in place with Adam; stop after `patience` epochs without a better validation
    loss; restore the best weights; write the checkpoint and `metrics.json` beside it.

    `augment(x, generator)`, if given, transforms each training batch's inputs (never targets).
    `evaluate(model)` runs on the restored best weights; its metrics go into `metrics.json`.
    """
    start = time.perf_counter()
    with torch_threads(config.threads):
        result = _train(model, loss_fn, train, val, config, augment, desc)
        result.seconds = time.perf_counter() - start
        if evaluate is not None:
            result.metrics = evaluate(model)
    _save(model, result, config, hparams or {}, Path(checkpoint))
    log.info(
        "%s: best epoch %d, val loss %.4g, %s",
        desc,
        result.best_epoch,
        result.best_val_loss,
        result.metrics,
    )
    return result


def _train(
    model: nn.Module,
    loss_fn: LossFn,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
    desc: str,
) -> FitResult:
    x, y = train
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_loss, best_epoch, best_state, waited = math.inf, 0, copy.deepcopy(model.state_dict()), 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, config.epochs + 1), desc=desc, unit="epoch", leave=False, disable=None)
    for epoch in bar:
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), config.batch_size):
            idx = order[i : i + config.batch_size]
            optimiser.zero_grad(set_to_none=True)
            xb = x[idx] if augment is None else augment(x[idx], generator)
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        train_loss, val_loss = total / len(x), _val_loss(model, loss_fn, *val)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
        if val_loss < best_loss:
            best_loss, best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if waited >= config.patience:
                log.info("%s: early stop at epoch %d (best %d)", desc, epoch, best_epoch)
                break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch, best_loss, 0.0, history)


def _save(
    model: nn.Module, result: FitResult, config: TrainConfig, hparams: dict, checkpoint: Path
) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": model.state_dict(), "hparams": hparams, "epoch": result.best_epoch},
        checkpoint,
    )
    summary = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "best_val_loss": result.best_val_loss,
        "train_seconds": round(result.seconds, 3),
        "metrics": result.metrics,
        "train_config": asdict(config),
        "hparams": hparams,
        "history": result.history,
    }
    (checkpoint.parent / METRICS_FILE).write_text(json.dumps(summary, indent=2) + "\n")
