"""Datasets that ship with scikit-learn and statsmodels (no downloads).

- Digits: scikit-learn's 8x8 handwritten digits (values 0..16), resized to 28x28 in [0, 1],
  split 70/15/15, stratified by class, with a fixed seed.
- CO2: statsmodels' weekly Mauna Loa CO2 levels (ppm), gaps filled by linear interpolation,
  split in time: the first 70% trains, the next 15% validates, the last 15% is the held-out tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 28
SEASON = 52  # weeks in the CO2 seasonal cycle


@dataclass(frozen=True)
class Split:
    """Inputs and targets of one split."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class DigitSplits:
    """Digits as `[N, 1, 28, 28]` float32 in [0, 1] and int64 labels."""

    train: Split
    val: Split
    test: Split


@lru_cache(maxsize=4)
def load_digit_splits(seed: int = 0) -> DigitSplits:
    """Digits resized to 28x28 (bilinear) and split 70/15/15, stratified, seeded."""
    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0).contiguous()
    y = torch.tensor(digits.target, dtype=torch.int64)
    index = np.arange(len(y))
    train, rest = train_test_split(index, test_size=0.3, stratify=y, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return DigitSplits(*(Split(x[i], y[i]) for i in (train, val, test)))


def salt_and_pepper(x: torch.Tensor, fraction: float = 0.3, seed: int = 0) -> torch.Tensor:
    """Set a random `fraction` of each image's pixels to 0 or 1 (half each, on average)."""
    g = torch.Generator().manual_seed(seed)
    hit = torch.rand(x.shape, generator=g) < fraction
    value = (torch.rand(x.shape, generator=g) < 0.5).to(x.dtype)
    return torch.where(hit, value, x)


def occlude(x: torch.Tensor, size: int = 10, seed: int = 0) -> torch.Tensor:
    """Paste a bright `size` x `size` block (value 1) at a random place in each image."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    top = torch.randint(0, h - size + 1, (n,), generator=g)
    left = torch.randint(0, w - size + 1, (n,), generator=g)
    out = x.clone()
    for i in range(n):
        out[i, :, top[i] : top[i] + size, left[i] : left[i] + size] = 1.0
    return out


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 10.0,
    shift: float = 0.1,
    scale: float = 0.1,
) -> torch.Tensor:
    """Augment images with a random rotation (+-degrees), shift (+-fraction of the side) and
    zoom (1 +- scale), one draw per image, bilinear, zero padding."""
    n = len(x)
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle = u[:, 0] * degrees * torch.pi / 180
    zoom = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, u[:, 2] * 2 * shift], 1),
            torch.stack([sin, cos, u[:, 3] * 2 * shift], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Co2:
    """Weekly CO2 levels (ppm, float32); targets `t < train_end` train, `t < val_end` validate."""

    levels: np.ndarray
    train_end: int
    val_end: int

    @property
    def test_targets(self) -> range:
        """Indices of the held-out tail."""
        return range(self.val_end, len(self.levels))

    def windows(self, window: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows `levels[t-window:t]` as `[N, window, 1]` and targets `levels[t]` as `[N, 1]`,
        for every `t` in `[start, end)` that has a full window of history."""
        targets = np.arange(max(start, window), end)
        x = np.stack([self.levels[t - window : t] for t in targets])[..., None]
        return x.astype(np.float32), self.levels[targets, None].astype(np.float32)

    def test_windows(self, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows whose targets lie in the held-out tail (one-step-ahead, true history)."""
        return self.windows(window, self.val_end, len(self.levels))

    def train_diff_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the weekly changes inside the training range."""
        diffs = np.diff(self.levels[: self.train_end].astype(np.float64))
        return float(diffs.mean()), float(diffs.std())

    def baseline_rmse(self) -> dict[str, float]:
        """RMSE on the held-out tail of the naive (last value) and seasonal-naive forecasts."""
        t = np.asarray(self.test_targets)
        truth = self.levels[t].astype(np.float64)
        return {
            "rmse_naive": float(np.sqrt(np.mean((self.levels[t - 1] - truth) ** 2))),
            "rmse_seasonal_naive": float(np.sqrt(np.mean((self.levels[t - SEASON] - truth) ** 2))),
        }


@lru_cache(maxsize=1)
def load_co2(val_fraction: float = 0.15, test_fraction: float = 0.15) -> Co2:
    """The weekly CO2 series, gaps interpolated, split in time into train / val / test."""
    from statsmodels.datasets import co2

    series = co2.load_pandas().data["co2"].interpolate(method="linear").bfill()
    levels = series.to_numpy(dtype=np.float32)
    levels.flags.writeable = False  # shared by the cache
    n = len(levels)
    val_end = n - round(n * test_fraction)
    train_end = val_end - round(n * val_fraction)
    return Co2(levels, train_end, val_end)
