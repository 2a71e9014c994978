"""Convolution arithmetic, checked by hand and against PyTorch's own layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.cnn import LeNet, flat_features
from models.conv_arith import conv_output_size, conv_params, pool_output_size

pytestmark = pytest.mark.unit


def test_conv_output_size_of_lenet_first_layer() -> None:
    assert conv_output_size(28, 5, p=0, s=1) == 24


@pytest.mark.parametrize(
    ("w", "f", "p", "s"), [(28, 5, 0, 1), (28, 3, 1, 1), (29, 3, 1, 2), (7, 3, 0, 2)]
)
def test_conv_output_size_matches_conv2d(w: int, f: int, p: int, s: int) -> None:
    out = nn.Conv2d(1, 1, f, stride=s, padding=p)(torch.zeros(1, 1, w, w))
    assert conv_output_size(w, f, p, s) == out.shape[-1]


@pytest.mark.parametrize(
    ("w", "f", "p", "s", "why"),
    [
        (28, 5, 0, 2, "not a positive integer"),
        (3, 5, 0, 1, "not a positive integer"),
        (28, 0, 0, 1, "F >= 1"),
    ],
)
def test_conv_output_size_rejects_impossible_layers(
    w: int, f: int, p: int, s: int, why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        conv_output_size(w, f, p, s)


def test_pool_output_size() -> None:
    assert pool_output_size(24) == 12
    assert pool_output_size(8, 2) == 4
    with pytest.raises(ValueError):
        pool_output_size(7, 2)


def test_conv_params_counts_weights_and_biases() -> None:
    assert conv_params(20, 5, 3) == 1520
    layer = nn.Conv2d(3, 20, 5)
    assert conv_params(20, 5, 3) == sum(p.numel() for p in layer.parameters())


def test_conv2d_is_cross_correlation_worked_example() -> None:
    x = torch.tensor(
        [[0, 1, 2, 1, 0], [4, 1, 0, 1, 0], [2, 0, 1, 1, 1], [1, 2, 3, 1, 0], [0, 4, 3, 2, 0]],
        dtype=torch.float32,
    )
    w = torch.tensor([[0, 1, 0], [1, 0, 1], [2, 1, 0]], dtype=torch.float32)
    out = F.conv2d(x[None, None], w[None, None])[0, 0]
    expected = torch.tensor([[9, 5, 4], [8, 8, 10], [8, 15, 12]], dtype=torch.float32)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("channels", [(6, 16), (16, 32)])
def test_cnn_fc_input_is_computed_by_the_helper(channels: tuple[int, int]) -> None:
    net = LeNet(channels, kernel=5)
    expected = (
        channels[-1]
        * pool_output_size(conv_output_size(pool_output_size(conv_output_size(28, 5)), 5)) ** 2
    )
    assert net.flat_features == flat_features(channels, 5) == expected
    assert net.classifier[0].in_features == expected
    assert net.features(torch.zeros(2, 1, 28, 28)).shape == (2, expected)
