"""The shared training loop and the three models' quick training runs on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models import autoencoder, cnn, lstm
from models.data import load_co2, load_digit_splits
from models.evaluate import torch_predict
from models.train import METRICS_FILE, TrainConfig, Trained, fit, hyperparameters

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trained]:
    out = tmp_path_factory.mktemp("cnn")
    return out, cnn.train(out, quick=True, epochs=3)


def test_data_splits_are_real_and_stratified() -> None:
    digits = load_digit_splits()
    sizes = [len(s.y) for s in (digits.train, digits.val, digits.test)]
    assert sum(sizes) == 1797 and sizes == [1257, 270, 270]
    assert digits.train.x.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(digits.train.x.min()) and float(digits.train.x.max()) <= 1.0
    assert torch.bincount(digits.test.y).min() >= 26  # every class in the held-out split
    co2 = load_co2()
    assert not np.isnan(co2.levels).any()
    assert co2.train_end < co2.val_end < len(co2.levels)
    x, y = co2.test_windows(52)
    assert x.shape == (len(co2.test_targets), 52, 1) and y.shape == (len(x), 1)
    assert x[0, -1, 0] == co2.levels[co2.val_end - 1] and y[0, 0] == co2.levels[co2.val_end]


def test_cnn_loss_decreases_and_files_are_written(cnn_run: tuple[Path, Trained]) -> None:
    out, trained = cnn_run
    summary = json.loads((out / METRICS_FILE).read_text())
    history = summary["history"]
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert summary["metrics"]["accuracy"] == trained.metrics["accuracy"] > 0.5
    assert summary["hparams"]["epochs"] == 3


def test_checkpoint_restores_the_trained_model(cnn_run: tuple[Path, Trained]) -> None:
    out, trained = cnn_run
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    net = cnn.LeNet(
        saved["hparams"]["channels"], saved["hparams"]["kernel"], saved["hparams"]["hidden"]
    )
    net.load_state_dict(saved["state_dict"])
    x = load_digit_splits().test.x[:16].numpy()
    restored = torch_predict(cnn.Classifier(net), cnn.OUTPUTS)(x)
    original = torch_predict(trained.module, cnn.OUTPUTS)(x)
    np.testing.assert_array_equal(restored["probabilities"], original["probabilities"])


def test_seeded_runs_are_reproducible(tmp_path: Path) -> None:
    first = lstm.train(tmp_path / "a", quick=True)
    second = lstm.train(tmp_path / "b", quick=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.metrics["rmse"] == second.metrics["rmse"]
    other = lstm.train(tmp_path / "c", quick=True, seed=1)
    assert other.metrics["rmse"] != first.metrics["rmse"]


def test_early_stopping_restores_the_best_epoch(tmp_path: Path) -> None:
    # Train towards y = x while validating against y = -x: validation only gets worse after
    # the first epoch, so the loop must stop after `patience` more and restore epoch 1.
    torch.manual_seed(0)
    x = torch.rand(256, 1) + 0.5
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    val = (x[:64], -x[:64])
    config = TrainConfig(epochs=20, batch_size=32, lr=0.05, patience=2)
    result = fit(model, nn.functional.mse_loss, (x, x), val, config, tmp_path / "checkpoint.pt")
    losses = [h["val_loss"] for h in result.history]
    assert result.best_epoch == 1 and len(losses) == 3 and losses[0] < losses[1] < losses[2]
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model(val[0]), val[1])) == pytest.approx(losses[0])
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / METRICS_FILE).is_file()


def test_models_train_in_quick_mode(tmp_path: Path) -> None:
    trained = autoencoder.train(tmp_path, quick=True)
    assert trained.outputs == ("reconstruction", "score")
    assert 0 < trained.extras["threshold"] == trained.metrics["threshold"]
    assert {"auroc_salt_pepper", "auroc_occlusion", "fpr_clean"} <= set(trained.metrics)


def test_unknown_hyperparameter_is_rejected() -> None:
    with pytest.raises(KeyError, match="epoch"):
        hyperparameters(cnn.HPARAMS, cnn.QUICK, epoch=3)
