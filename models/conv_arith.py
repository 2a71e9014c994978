"""Convolution arithmetic: output sizes and parameter counts of conv and pooling layers."""

from __future__ import annotations


def conv_output_size(w: int, f: int, p: int = 0, s: int = 1) -> int:
    """Output width `(W - F + 2P) / S + 1`; ValueError unless it is a positive integer."""
    if f < 1 or s < 1 or p < 0:
        raise ValueError(f"need F >= 1, S >= 1 and P >= 0, got F={f}, S={s}, P={p}")
    span = w - f + 2 * p
    if span < 0 or span % s:
        raise ValueError(
            f"(W - F + 2P)/S + 1 = ({w} - {f} + 2*{p})/{s} + 1 is not a positive integer"
        )
    return span // s + 1


def pool_output_size(w: int, f: int = 2, s: int | None = None) -> int:
    """Output width of a pooling window `f` with stride `s` (default `f`), no padding."""
    return conv_output_size(w, f, 0, f if s is None else s)


def conv_params(filters: int, f: int, in_channels: int) -> int:
    """Learnable parameters of a conv layer: `filters * (f*f*in_channels + 1)` (weights + bias)."""
    return filters * (f * f * in_channels + 1)
