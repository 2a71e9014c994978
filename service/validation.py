"""What a request may ask of a model, checked before work is done.

`Bounds` checks a tensor's declared name, datatype and shape against the model's config and
limits *before* its array is built (the codec calls it per input); `validate_inputs` checks the
built arrays (v1 instances, and that every input is there with the same rows); `check_finite`
refuses NaN and infinities in float inputs unless the model allows them. Online inference and
batch scoring share these rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.codec import datatype_of
from service.config import BatchingOverride, Settings
from service.errors import BadRequest, PayloadTooLarge
from service.model_config import ModelConfig, TensorSpec


@dataclass(frozen=True)
class Limits:
    """The work one request may ask for: rows, elements over all inputs, and the length of each
    dynamic non-batch axis."""

    max_rows: int
    max_elements: int
    max_dim: int


class Bounds:
    """Per-request checker of declared input shapes (state: elements counted so far)."""

    __slots__ = ("config", "limits", "elements", "rows")

    def __init__(self, config: ModelConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self.elements = 0
        self.rows: int | None = None

    def __call__(self, name: str, datatype: str, shape: tuple[int, ...]) -> None:
        """Refuse (400/413) an input that the model does not take or that asks too much."""
        config, limits = self.config, self.limits
        spec = next((s for s in config.inputs if s.name == name), None)
        if spec is None:
            takes = ", ".join(s.name for s in config.inputs)
            raise BadRequest(f"unknown input '{name}'; model '{config.name}' takes: {takes}")
        if datatype != spec.datatype:
            raise BadRequest(
                f"input '{name}' has datatype {datatype}; model '{config.name}' takes "
                f"{spec.datatype}"
            )
        check_shape(config, limits, spec, shape)
        if config.batchable and shape:
            if self.rows is not None and shape[0] != self.rows:
                raise BadRequest("all inputs must have the same batch dimension (first axis)")
            self.rows = shape[0]
        self.elements += math.prod(shape)
        if self.elements > limits.max_elements:
            raise PayloadTooLarge(
                f"request holds over {limits.max_elements} elements, the most model "
                f"'{config.name}' accepts in one request (limits.max_elements)"
            )


def check_shape(
    config: ModelConfig, limits: Limits, spec: TensorSpec, shape: tuple[int, ...]
) -> None:
    """Rank, fixed dimensions, batch rows and dynamic-axis lengths of one input."""
    name = spec.name
    if len(shape) != len(spec.shape):
        raise BadRequest(
            f"input '{name}' has rank {len(shape)} (shape {list(shape)[:8]}"
            f"{'...' if len(shape) > 8 else ''}); model '{config.name}' expects rank "
            f"{len(spec.shape)} (shape {spec.shape})"
        )
    batched = config.batchable
    for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if axis == 0 and batched:
            if got < 1:
                raise BadRequest(f"input '{name}' has an empty batch dimension")
            if got > limits.max_rows:
                raise PayloadTooLarge(
                    f"input '{name}' has {got} rows; model '{config.name}' accepts at most "
                    f"{limits.max_rows} per request (limits.max_rows)"
                )
        elif want != -1 and want != got:
            raise BadRequest(
                f"input '{name}' dimension {axis} is {got}; model '{config.name}' expects "
                f"{want} (shape {spec.shape}, -1 = any)"
            )
        elif want == -1 and got > limits.max_dim:
            raise BadRequest(
                f"input '{name}' dimension {axis} is {got}; model '{config.name}' accepts at "
                f"most {limits.max_dim} there (limits.max_dim)"
            )


#: NumPy releases the GIL for a loop over more than 500 elements; on the event loop, with the
#: ONNX Runtime thread waiting for the GIL, that hands it over and back (two futex waits and
#: switches) for a few microseconds of work. Small arrays are checked in pieces under that size.
GIL_KEPT_ELEMENTS = 500
GIL_KEPT_MAX = 4 * GIL_KEPT_ELEMENTS


def _all_finite(array: np.ndarray) -> bool:
    if array.size > GIL_KEPT_MAX:
        return bool(np.isfinite(array).all())
    flat = array.reshape(-1)
    for start in range(0, flat.size, GIL_KEPT_ELEMENTS):
        if not np.isfinite(flat[start : start + GIL_KEPT_ELEMENTS]).all():
            return False
    return True


def check_finite(config: ModelConfig, inputs: dict[str, np.ndarray]) -> None:
    """Refuse NaN or infinite values in float inputs (unless `allow_non_finite`), naming the
    input and the first bad index."""
    if config.allow_non_finite:
        return
    for name, array in inputs.items():
        if array.dtype.kind != "f" or _all_finite(array):
            continue
        first = np.unravel_index(int(np.argmin(np.isfinite(array))), array.shape)
        raise BadRequest(
            f"input '{name}' holds a non-finite value ({array[first]}) at index "
            f"{[int(i) for i in first]}; model '{config.name}' takes finite numbers only "
            "(allow_non_finite: true in its config allows them)"
        )


def validate_inputs(config: ModelConfig, limits: Limits, inputs: dict[str, np.ndarray]) -> int:
    """Check built arrays against the config and limits; returns the rows (1 for a model
    without a batch axis, whose inputs carry its whole shape)."""
    bounds = Bounds(config, limits)
    for name, array in inputs.items():
        bounds(name, datatype_of(array), array.shape)
    check_complete(config, inputs)
    check_finite(config, inputs)
    return bounds.rows if config.batchable and bounds.rows else 1


def check_decoded(config: ModelConfig, inputs: dict[str, np.ndarray]) -> None:
    """A decoded request (whose shapes `Bounds` already checked): complete and finite."""
    check_complete(config, inputs)
    check_finite(config, inputs)


def check_complete(config: ModelConfig, inputs: dict[str, np.ndarray]) -> None:
    """Every input the model takes is present."""
    missing = [s.name for s in config.inputs if s.name not in inputs]
    if missing:
        raise BadRequest(f"missing input '{missing[0]}' for model '{config.name}'")


#: A forecast model's window (its dynamic time axis) and elements per request, unless its config
#: or the server's per-model override say otherwise: a recurrent model's memory and time grow
#: with rows x window (4096 x 1024 steps of our LSTM: 14 s and 4.8 GB; 128 x 1024: 0.5 s).
FORECAST_MAX_DIM = 1024
FORECAST_MAX_ELEMENTS = 128 * 1024


def resolve_limits(config: ModelConfig, override: BatchingOverride, settings: Settings) -> Limits:
    """A model's limits: the server's per-model override, else its config, else the defaults."""
    own = config.limits
    forecast = config.task == "forecast"
    dim_default = FORECAST_MAX_DIM if forecast else settings.max_dim
    elements = (
        min(settings.max_elements, FORECAST_MAX_ELEMENTS) if forecast else settings.max_elements
    )
    return Limits(
        max_rows=override.max_rows or own.max_rows or settings.max_rows,
        max_elements=override.max_elements or own.max_elements or elements,
        max_dim=override.max_dim or own.max_dim or dim_default,
    )
