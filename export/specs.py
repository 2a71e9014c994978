"""What the repository declares for each model: tensors, task fields, tolerances, held-out data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from export.fp16 import WRAPPER_NODES
from export.variants import Tolerance
from models import autoencoder, cnn, lstm
from models.data import load_co2, load_digit_splits
from models.train import hyperparameters
from service.model_config import Batching, Task, TensorSpec

N_SAMPLES = 256
PARITY_WINDOWS = (8, 52, 200)
PARITY_BATCHES = (1, 7, 64)
COMMON_SOURCES = (
    "models/data.py",
    "models/train.py",
    "models/evaluate.py",
    "export/onnx_export.py",
    "export/variants.py",  # which variants a version holds, and how they are made
    "export/fp16.py",
)
IMAGE = TensorSpec(
    name="image",
    datatype="FP32",
    shape=[-1, 1, 28, 28],
    description="28x28 grey digit, pixels in [0, 1], white ink on black",
)


@dataclass(frozen=True)
class ModelSpec:
    """A model's entry in the repository and how to check it.

    `parity_batches` yields held-out input batches (the whole held-out set); `samples` returns up
    to 256 held-out inputs and their ground truth for `samples.npz`; `keep_fp32` is the regex of
    node names the FP16 variant keeps in FP32 (by default the serving wrapper's own
    pre/post-processing: softmax, the LSTM's ppm arithmetic, the autoencoder's score).
    """

    name: str
    module: ModuleType
    task: Task
    description: str
    preprocessing: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: Batching
    tolerance: Tolerance
    sources: tuple[str, ...]
    parity_batches: Callable[[], Iterator[np.ndarray]]
    samples: Callable[[], tuple[np.ndarray, np.ndarray]]
    labels: tuple[str, ...] | None = None
    argmax: tuple[str, ...] = ()
    keep_fp32: str | None = WRAPPER_NODES

    def __post_init__(self) -> None:
        declared = ([s.name for s in self.inputs], [s.name for s in self.outputs])
        if declared != ([self.module.INPUT], list(self.module.OUTPUTS)):
            raise ValueError(f"{self.name}: spec tensors {declared} differ from the module's")

    def hparams(self, quick: bool = False) -> dict[str, Any]:
        """The hyperparameters `train` uses."""
        return hyperparameters(self.module.HPARAMS, self.module.QUICK, quick)


def _chunks(x: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), size):
        yield x[i : i + size]


def _digit_batches() -> Iterator[np.ndarray]:
    yield from _chunks(load_digit_splits().test.x.numpy(), 64)


def _anomaly_inputs() -> np.ndarray:
    clean = load_digit_splits().test.x
    return np.concatenate(
        [clean.numpy(), *(x.numpy() for x in autoencoder.corruptions(clean).values())]
    )


def _digit_samples() -> tuple[np.ndarray, np.ndarray]:
    test = load_digit_splits().test
    return test.x[:N_SAMPLES].numpy(), test.y[:N_SAMPLES].numpy()


def _anomaly_samples() -> tuple[np.ndarray, np.ndarray]:
    """Half clean test digits, half corrupted (a quarter of each kind); targets 1 = anomalous."""
    clean = load_digit_splits().test.x[: N_SAMPLES // 2]
    bad = [x[: N_SAMPLES // 4].numpy() for x in autoencoder.corruptions(clean).values()]
    inputs = np.concatenate([clean.numpy(), *bad])
    return inputs, (np.arange(len(inputs)) >= len(clean)).astype(np.int64)


def _series_batches() -> Iterator[np.ndarray]:
    data = load_co2()
    for window in PARITY_WINDOWS:
        x, _ = data.test_windows(window)
        for size in PARITY_BATCHES:
            yield from _chunks(x, size)


def _series_samples() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_co2().test_windows(lstm.EVAL_WINDOW)
    return x[:N_SAMPLES], y[:N_SAMPLES]


SPECS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(
        name="cnn",
        module=cnn,
        task="classification",
        description="LeNet-style classifier of handwritten digits (scikit-learn digits, 28x28).",
        preprocessing=(
            "Input: scikit-learn digits (0..16) divided by 16 and resized 8x8 -> 28x28 "
            "(bilinear), so pixels are in [0, 1] with white ink on black. Softmax and argmax run "
            "inside the graph: `probabilities` [N,10] and `label` [N] (index into labels)."
        ),
        inputs=(IMAGE,),
        outputs=(
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
            TensorSpec(name="label", datatype="INT64", shape=[-1], description="argmax class"),
        ),
        labels=cnn.LABELS,
        argmax=("probabilities",),
        batching=Batching(max_batch_size=32, max_queue_delay_ms=2.0),
        tolerance=Tolerance("accuracy", 0.01),
        sources=("models/cnn.py", "models/conv_arith.py"),
        parity_batches=_digit_batches,
        samples=_digit_samples,
    ),
    "lstm": ModelSpec(
        name="lstm",
        module=lstm,
        task="forecast",
        description="2-layer LSTM forecasting next week's Mauna Loa CO2 level (statsmodels co2).",
        preprocessing=(
            "Input: raw weekly CO2 levels in ppm, oldest first, shape [N,T,1], any T >= 3. "
            "Inside the graph: first differences, standardised with `normalization` (mean/std "
            "of the training range's weekly changes), LSTM, then un-standardised and added to "
            "the last level: `forecast` [N,1] is next week's level in ppm."
        ),
        inputs=(
            TensorSpec(
                name="series",
                datatype="FP32",
                shape=[-1, -1, 1],
                description="raw CO2 levels (ppm), batch x time x 1",
            ),
        ),
        outputs=(
            TensorSpec(
                name="forecast", datatype="FP32", shape=[-1, 1], description="next level (ppm)"
            ),
        ),
        batching=Batching(max_batch_size=64, max_queue_delay_ms=2.0),
        tolerance=Tolerance("rmse", 0.05, higher_is_better=False, relative=True),
        sources=("models/lstm.py",),
        parity_batches=_series_batches,
        samples=_series_samples,
    ),
    "autoencoder": ModelSpec(
        name="autoencoder",
        module=autoencoder,
        task="anomaly",
        description="Dense autoencoder flagging digits it cannot reconstruct (sklearn digits).",
        preprocessing=(
            "Input as for `cnn`: 28x28 digits, pixels in [0, 1]. `score` [N] is the per-image "
            "mean squared reconstruction error, computed inside the graph; an image is an "
            "anomaly when score > threshold (99th percentile of validation digits' scores)."
        ),
        inputs=(IMAGE,),
        outputs=(
            TensorSpec(name="reconstruction", datatype="FP32", shape=[-1, 1, 28, 28]),
            TensorSpec(name="score", datatype="FP32", shape=[-1], description="mean squared error"),
        ),
        batching=Batching(max_batch_size=32, max_queue_delay_ms=2.0),
        tolerance=Tolerance("auroc", 0.01),
        sources=("models/autoencoder.py",),
        parity_batches=lambda: _chunks(_anomaly_inputs(), 64),
        samples=_anomaly_samples,
    ),
}
