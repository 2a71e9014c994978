"""Parity of ONNX Runtime (CPU) against PyTorch on held-out or generated inputs.

A batch of inputs is either one array (a single-input model, batch first) or a mapping of input
name -> array (any number of inputs, in the module's argument order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from models.evaluate import torch_predict, torch_threads

ATOL = 1e-4

Inputs = np.ndarray | Mapping[str, np.ndarray]
#: Inputs -> the model's named outputs (a `models.evaluate.Predict` that also takes mappings).
Run = Callable[[Inputs], dict[str, np.ndarray]]


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond tolerance on some output."""


def ort_session(path: Path) -> ort.InferenceSession:
    """A CPU session with default graph optimisations and quiet logging."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rows(x: Inputs) -> int:
    """How many samples a batch holds (the first axis of its first input)."""
    first = x if isinstance(x, np.ndarray) else next(iter(x.values()))
    return len(first) if first.ndim else 1


def _chunks(x: Inputs, size: int | None) -> Iterable[Inputs]:
    """`x` cut along the first axis into pieces of `size` rows (whole when `size` is None)."""
    n = rows(x)
    if size is None or n <= size:
        yield x
        return
    for i in range(0, n, size):
        if isinstance(x, np.ndarray):
            yield x[i : i + size]
        else:
            yield {k: v[i : i + size] for k, v in x.items()}


def ort_predict(session: ort.InferenceSession, batch_size: int | None = 256) -> Run:
    """A `Run` over `session` in chunks of `batch_size` rows (None: one call, for models whose
    first axis is not a batch axis). An array feeds the graph's only input."""
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]

    def feeds(x: Inputs) -> dict[str, np.ndarray]:
        if isinstance(x, np.ndarray):
            if len(names) != 1:
                raise ValueError(f"the graph has inputs {names}: pass a mapping of name -> array")
            return {names[0]: np.ascontiguousarray(x)}
        return {k: np.ascontiguousarray(v) for k, v in x.items()}

    def predict(x: Inputs) -> dict[str, np.ndarray]:
        chunks = [session.run(outputs, feeds(c)) for c in _chunks(x, batch_size)]
        return {n: np.concatenate([c[k] for c in chunks]) for k, n in enumerate(outputs)}

    return predict


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A forward's result as the flat list of tensors `torch.onnx.export` makes outputs of
    (tuples, lists and dict values, depth first)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for item in out for t in flatten_outputs(item)]
    raise TypeError(f"forward returned {type(out).__name__}; return tensors (or tuples of them)")


def torch_run(module: nn.Module, outputs: Sequence[str], batch_size: int | None = 256) -> Run:
    """A `Run` over `module` (eval mode, no grad, one intra-op thread). An array goes through
    `models.evaluate.torch_predict` as the build always did; a mapping's arrays are passed as
    positional arguments in the mapping's order."""
    single = torch_predict(module, outputs, batch_size=batch_size or 1 << 62)

    def predict(x: Inputs) -> dict[str, np.ndarray]:
        if isinstance(x, np.ndarray):
            return single(x)
        module.eval()
        chunks: list[list[torch.Tensor]] = []
        with torch_threads(1), torch.inference_mode():
            for c in _chunks(x, batch_size):
                arrays = cast(Mapping[str, np.ndarray], c).values()
                chunks.append(flatten_outputs(module(*map(torch.from_numpy, arrays))))
        if len(chunks[0]) != len(outputs):
            raise ValueError(f"forward returned {len(chunks[0])} tensors for outputs {outputs}")
        return {
            name: np.concatenate([c[k].numpy() for c in chunks]) for k, name in enumerate(outputs)
        }

    return predict


def check_parity(
    module: nn.Module,
    session: ort.InferenceSession,
    batches: Iterable[Inputs],
    outputs: Sequence[str],
    *,
    atol: float = ATOL,
    rtol: float = 0.0,
    argmax: Sequence[str] = (),
    batch_size: int | None = 256,
) -> dict[str, Any]:
    """Run every batch through both; raise ParityError if any float output differs by more than
    `atol + rtol * |PyTorch|`, any integer output differs at all, or the argmax of an `argmax`
    output changes. The message names each failing output and by how much.

    Returns the worst absolute difference per output and how many samples were compared
    (`rtol` is recorded when it is not 0).
    """
    reference, onnx_run = torch_run(module, outputs, batch_size), ort_predict(session, batch_size)
    worst = dict.fromkeys(outputs, 0.0)
    excess = dict.fromkeys(outputs, 0)  # float values beyond atol + rtol * |reference|
    values = dict.fromkeys(outputs, 0)
    mismatched = dict.fromkeys(outputs, 0)  # integer values that differ
    flips = dict.fromkeys(argmax, 0)  # samples whose argmax differs
    exact: set[str] = set()  # integer outputs must match exactly
    samples = count = 0
    for x in batches:
        want, got = reference(x), onnx_run(x)
        samples, count = samples + rows(x), count + 1
        for name in outputs:
            if got[name].shape != want[name].shape or got[name].dtype != want[name].dtype:
                raise ParityError(
                    f"{name}: ONNX gives {got[name].dtype}{list(got[name].shape)}, PyTorch "
                    f"{want[name].dtype}{list(want[name].shape)} for input shapes {_shapes(x)}"
                )
            expected = want[name].astype(np.float64)
            diff = difference(got[name].astype(np.float64), expected)
            worst[name] = max(worst[name], float(diff.max(initial=0.0)))
            values[name] += diff.size
            if not np.issubdtype(want[name].dtype, np.floating):
                exact.add(name)
                mismatched[name] += int((diff > 0).sum())
            else:
                scale = np.nan_to_num(np.abs(expected), nan=0.0, posinf=0.0)
                excess[name] += int((diff > atol + rtol * scale).sum())
        for name in argmax:
            flips[name] += int((got[name].argmax(-1) != want[name].argmax(-1)).sum())
    if not count:
        raise ValueError("check_parity needs at least one batch")
    problems = [
        f"{n}: max abs diff {worst[n]:.3g} > atol {atol:g}"
        + (f" + rtol {rtol:g} x |PyTorch| ({excess[n]} of {values[n]} values)" if rtol else "")
        for n in outputs
        if n not in exact and excess[n]
    ]
    problems += [
        f"{n}: {k} integer values differ" for n, k in mismatched.items() if n in exact and k
    ]
    problems += [f"{n}: argmax differs for {k} samples" for n, k in flips.items() if k]
    if problems:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch over {samples} samples: " + "; ".join(problems)
        )
    report: dict[str, Any] = {"max_abs_diff": worst, "atol": atol}
    if rtol:
        report["rtol"] = rtol
    return report | {"samples": samples, "batches": count}


def difference(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want|, 0 where both agree (NaN with NaN, inf with inf), inf where one is NaN."""
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - want)
    return np.where(same, 0.0, np.nan_to_num(diff, nan=np.inf))


def _shapes(x: Inputs) -> list[int] | dict[str, list[int]]:
    if isinstance(x, np.ndarray):
        return list(x.shape)
    return {k: list(v.shape) for k, v in x.items()}
