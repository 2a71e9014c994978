"""Declared inputs of a user's module and the data its parity runs on (`onnxserve export`).

An input is `NAME:DTYPE:SHAPE[:LOW..HIGH]` (`InputSpec`): a dimension is a size, or a name (or -1)
for a dynamic axis; axes with the same name have the same length in every input, and a first axis
that is dynamic on every input is the batch axis (-1 there is called `batch`, elsewhere
`<input>_dim<i>`). `parity_plan` makes the batches parity runs on: the user's arrays (an `.npz`,
first rows in batches of 1, 3 and 17, then 64 at a time) or random inputs of the declared shapes
at each batch size and length of the other dynamic axes, within each input's range.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.verify import rows
from service.codec import BYTES, OIP_TYPES
from service.model_config import DATATYPES, TensorSpec

BATCH = "batch"
BATCH_SIZES = (1, 3, 17)
LENGTHS = (3, 8, 21)
TRACE_ROWS = 2  # traced on 2 rows: a batch of 1 invites the tracer to treat the axis as fixed
SAMPLE_ROWS = 256  # rows of the user's inputs kept in samples.npz
CHUNK = 64  # rows per parity batch beyond the first few, for user-given inputs
_AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Arrays = dict[str, np.ndarray]


class SpecError(ValueError):
    """A bad export request: an input spec, inputs that do not fit it, a name, a task field..."""


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, OIP datatype, dims (int: fixed; str: a named dynamic axis) and the
    range random parity values are drawn from (default: N(0, 1) for floats, 0..9 for integers)."""

    name: str
    datatype: str
    dims: tuple[int | str, ...]
    low: float | None = None
    high: float | None = None

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """`NAME:DTYPE:SHAPE[:LOW..HIGH]`, e.g. `x:FP32:-1,3,32,32`, `seq:FP32:batch,time,4`,
        `lengths:INT64:batch:1..8`; SpecError says what is wrong."""
        usage = "expected NAME:DTYPE:SHAPE[:LOW..HIGH], e.g. x:FP32:-1,3,32,32"
        parts = text.split(":")
        if len(parts) not in (3, 4) or not parts[0]:
            raise SpecError(f"--input {text!r}: {usage}")
        name, datatype, shape = parts[0], parts[1].upper(), parts[2]
        dims: list[int | str] = []
        for i, raw in enumerate(d.strip() for d in shape.split(",") if shape.strip()):
            if raw == "-1":
                dims.append(BATCH if i == 0 else f"{name}_dim{i}")
            elif raw.isdigit() and int(raw) > 0:
                dims.append(int(raw))
            elif _AXIS.match(raw):
                dims.append(raw)
            else:
                raise SpecError(
                    f"--input {text!r}: dimension {i} is {raw!r}; use a positive size, -1 or an "
                    f"axis name (letters, digits, _) for a dynamic axis"
                )
        low = high = None
        if len(parts) == 4:
            bounds = parts[3].split("..")
            try:
                low, high = (float(b) for b in bounds)
            except ValueError:
                raise SpecError(f"--input {text!r}: range {parts[3]!r} is not LOW..HIGH") from None
            if low > high:
                raise SpecError(f"--input {text!r}: range {parts[3]!r} has LOW > HIGH")
        try:
            return cls(name, datatype, tuple(dims), low, high).checked()
        except SpecError as exc:
            raise SpecError(f"--input {text!r}: {exc}") from None

    def checked(self) -> InputSpec:
        """This spec, or SpecError if its datatype is not one a PyTorch module can take."""
        usable = [d for d in DATATYPES if d != "BYTES"]
        if self.datatype not in usable:
            raise SpecError(f"input {self.name!r}: datatype {self.datatype!r} not in {usable}")
        return self

    @property
    def shape(self) -> list[int]:
        """The config's shape: -1 for each dynamic axis."""
        return [-1 if isinstance(d, str) else d for d in self.dims]

    @property
    def dtype(self) -> np.dtype:
        """The NumPy dtype of the datatype."""
        return np.dtype(DATATYPES[self.datatype])

    def tensor_spec(self) -> TensorSpec:
        """The config's entry (named dynamic axes are kept in its description)."""
        named = any(isinstance(d, str) for d in self.dims)
        axes = f"axes {','.join(str(d) for d in self.dims)}" if named else ""
        return TensorSpec(
            name=self.name,
            datatype=self.datatype,  # type: ignore[arg-type]
            shape=self.shape,
            description=axes,
        )

    def __str__(self) -> str:
        text = f"{self.name}:{self.datatype}:{','.join(str(d) for d in self.dims)}"
        return text + (f":{self.low:g}..{self.high:g}" if self.low is not None else "")


def as_arrays(value: Any) -> list[np.ndarray] | dict[str, np.ndarray] | None:
    """Example inputs as arrays: a tensor or array, a tuple/list of them, or a dict of them."""

    def array(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): array(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [array(v) for v in value]
    return [array(value)]


def _datatype(dtype: np.dtype) -> str:
    datatype = OIP_TYPES.get(np.dtype(dtype))
    if datatype is None or datatype == BYTES:
        raise SpecError(f"inputs of dtype {dtype} have no Open Inference Protocol datatype")
    return datatype


def input_specs(
    module: nn.Module,
    inputs: Sequence[str | InputSpec] | None,
    examples: list[np.ndarray] | dict[str, np.ndarray] | None,
) -> list[InputSpec]:
    """The declared inputs, or ones derived from the examples (batch axis first)."""
    if inputs:
        specs = [s.checked() if isinstance(s, InputSpec) else InputSpec.parse(s) for s in inputs]
    elif examples is None:
        raise SpecError("declare the inputs (--input NAME:DTYPE:SHAPE) or give example inputs")
    else:
        if isinstance(examples, dict):
            names = list(examples)
        else:
            names = _argument_names(module, len(examples))
        arrays = list(examples.values()) if isinstance(examples, dict) else examples
        specs = [
            InputSpec(n, _datatype(a.dtype), (BATCH, *a.shape[1:]) if a.ndim else ())
            for n, a in zip(names, arrays, strict=True)
        ]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"input names must be unique, got {names}")
    return specs


def _argument_names(module: nn.Module, count: int) -> list[str]:
    """`forward`'s positional parameter names (input_0, ... where it has none to give)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
        named = [
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]
    except (TypeError, ValueError):  # a TorchScript module may not say
        named = []
    return named[:count] if len(named) >= count else [f"input_{i}" for i in range(count)]


def batch_axis(specs: Sequence[InputSpec]) -> str | None:
    """The axis name every input starts with, if any: the batch axis."""
    firsts = {s.dims[0] if s.dims else None for s in specs}
    (first,) = firsts if len(firsts) == 1 else (None,)
    return first if isinstance(first, str) else None


def load_arrays(value: Mapping[str, np.ndarray] | np.ndarray | Path | str) -> Any:
    if isinstance(value, Path | str):
        try:
            with np.load(value, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise SpecError(f"parity inputs {str(value)!r}: cannot read ({exc})") from None
    return as_arrays(value)


def fit(
    what: str, arrays: list[np.ndarray] | dict[str, np.ndarray], specs: Sequence[InputSpec]
) -> dict[str, np.ndarray]:
    """`arrays` as `{input name: array}` in declaration order, cast within their kind, checked
    against the specs (rank, fixed dims, equal lengths on axes that share a name); other keys
    of a dict (a `samples.npz`'s outputs, say) are ignored."""
    if isinstance(arrays, dict):
        if len(specs) == 1 and specs[0].name not in arrays and "inputs" in arrays:
            arrays = {specs[0].name: arrays["inputs"]}
        missing = [s.name for s in specs if s.name not in arrays]
        if missing:
            raise SpecError(f"{what}: no array for input(s) {missing} (has {sorted(arrays)})")
        ordered = [arrays[s.name] for s in specs]
    elif len(arrays) != len(specs):
        raise SpecError(f"{what}: {len(arrays)} arrays for inputs {[s.name for s in specs]}")
    else:
        ordered = list(arrays)
    fitted: Arrays = {}
    lengths: dict[str, int] = {}
    for spec, array in zip(specs, ordered, strict=True):
        if array.dtype != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, "same_kind"):
                raise SpecError(f"{what}: {spec.name!r} is {array.dtype}, the input is {spec}")
            array = array.astype(spec.dtype)
        if array.ndim != len(spec.dims):
            raise SpecError(f"{what}: {spec.name!r} has shape {list(array.shape)}, not {spec}")
        for axis, (dim, size) in enumerate(zip(spec.dims, array.shape, strict=True)):
            if isinstance(dim, int) and dim != size:
                raise SpecError(
                    f"{what}: {spec.name!r} has shape {list(array.shape)}, not {spec} "
                    f"(dimension {axis})"
                )
            if isinstance(dim, str) and lengths.setdefault(dim, size) != size:
                raise SpecError(f"{what}: axis {dim!r} is {lengths[dim]} long in one input and "
                                f"{size} in {spec.name!r}")  # fmt: skip
        fitted[spec.name] = np.ascontiguousarray(array)
    return fitted


def split(
    given: dict[str, np.ndarray], batch_axis: str | None, batch_sizes: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Given inputs cut into parity batches: the first rows in batches of `batch_sizes`, then
    batches of CHUNK rows (whole when there is no batch axis)."""
    if not batch_axis:
        return [given]
    n, start, batches = rows(given), 0, []
    sizes = [*batch_sizes]
    while start < n:
        size = sizes.pop(0) if sizes else CHUNK
        batches.append({k: v[start : start + size] for k, v in given.items()})
        start += size
    return batches


def axis_values(
    specs: Sequence[InputSpec],
    batch_axis: str | None,
    batch_sizes: Sequence[int],
    lengths: Sequence[int],
) -> list[dict[str, int]]:
    """Lengths of the dynamic axes for each random parity batch: every batch size with every
    length; the k-th other named axis gets length + k, so that distinct axes differ."""
    named = [d for s in specs for d in s.dims if isinstance(d, str) and d != batch_axis]
    others = list(dict.fromkeys(named))
    combos = []
    for b in batch_sizes if batch_axis else [0]:
        for length in lengths if others else [0]:
            values = {axis: length + k for k, axis in enumerate(others)}
            combos.append(values | ({batch_axis: b} if batch_axis else {}))
    return combos


def random_inputs(
    specs: Sequence[InputSpec], values: Mapping[str, int], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes (dynamic axes from `values`) and ranges."""
    batch = {}
    for spec in specs:
        shape = tuple(values[d] if isinstance(d, str) else d for d in spec.dims)
        dtype = spec.dtype
        array: np.ndarray
        if dtype == np.bool_:
            array = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            low = int(spec.low) if spec.low is not None else 0
            high = int(spec.high) if spec.high is not None else 9
            array = rng.integers(low, high, size=shape, endpoint=True)
        elif spec.low is not None and spec.high is not None:
            array = rng.uniform(spec.low, spec.high, size=shape)
        else:
            array = rng.standard_normal(shape)
        batch[spec.name] = np.ascontiguousarray(array.astype(dtype))
    return batch


@dataclass(frozen=True)
class ParityPlan:
    """What an export runs on: parity `batches`, the `trace` inputs, the `samples` saved beside
    the model, and `source` (how the batches were made, for the parity record)."""

    batches: list[Arrays]
    trace: Arrays
    samples: Arrays
    source: dict[str, Any]


def parity_plan(
    specs: Sequence[InputSpec],
    *,
    given: Any = None,
    examples: Any = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    lengths: Sequence[int] = LENGTHS,
    seed: int = 0,
) -> ParityPlan:
    """The batches for `specs`: from `given` (a dict by input name, an array for one input, or
    an `.npz` path) or random; `examples` (traced when given) join the batches."""
    if not batch_sizes or not lengths or min(*batch_sizes, *lengths) < 1:
        raise SpecError(f"batch sizes {batch_sizes} and lengths {lengths} must be positive")
    axis = batch_axis(specs)
    rng = np.random.default_rng(seed)
    if given is not None:
        arrays = fit("parity inputs", load_arrays(given), specs)
        batches = split(arrays, axis, batch_sizes)
        samples = {k: v[:SAMPLE_ROWS] for k, v in arrays.items()} if axis else arrays
        trace = {k: v[:TRACE_ROWS] for k, v in arrays.items()} if axis else arrays
        source: dict[str, Any] = {
            "inputs": str(given) if isinstance(given, Path | str) else "given"
        }
    else:
        batches = [
            random_inputs(specs, v, rng) for v in axis_values(specs, axis, batch_sizes, lengths)
        ]
        largest = [b for b in batches if rows(b) == max(map(rows, batches))]
        samples = largest[len(largest) // 2]  # the largest batch size at the middle length
        middle = [lengths[len(lengths) // 2]]
        trace = random_inputs(specs, axis_values(specs, axis, [TRACE_ROWS], middle)[0], rng)
        source = {"inputs": "random"}
        if axis:
            source["batch_sizes"] = list(batch_sizes)
        if any(isinstance(d, str) and d != axis for s in specs for d in s.dims):
            source["lengths"] = list(lengths)
    if examples is not None:
        trace = fit("example_inputs", examples, specs)
        batches.append(trace)
    return ParityPlan(batches, trace, samples, source)
