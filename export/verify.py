"""Parity of ONNX Runtime (CPU) against PyTorch on held-out inputs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from torch import nn

from models.evaluate import Predict, torch_predict

ATOL = 1e-4


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree beyond tolerance on some output."""


def ort_session(path: Path) -> ort.InferenceSession:
    """A CPU session with default graph optimisations and quiet logging."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_predict(session: ort.InferenceSession, batch_size: int = 256) -> Predict:
    """A `Predict` running `session` (single input) in chunks of `batch_size`."""
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [
            session.run(outputs, {name: np.ascontiguousarray(x[i : i + batch_size])})
            for i in range(0, len(x), batch_size)
        ]
        return {n: np.concatenate([c[k] for c in chunks]) for k, n in enumerate(outputs)}

    return predict


def check_parity(
    module: nn.Module,
    session: ort.InferenceSession,
    batches: Iterable[np.ndarray],
    outputs: Sequence[str],
    *,
    atol: float = ATOL,
    argmax: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every batch through both; raise ParityError if any float output differs by more than
    `atol`, any integer output differs at all, or the argmax of an `argmax` output changes.

    Returns the worst absolute difference per output and how many samples were compared.
    """
    reference, onnx_run = torch_predict(module, outputs), ort_predict(session)
    worst = dict.fromkeys(outputs, 0.0)
    mismatched = dict.fromkeys(outputs, 0)  # integer values that differ
    flips = dict.fromkeys(argmax, 0)  # samples whose argmax differs
    exact: set[str] = set()  # integer outputs must match exactly
    samples = count = 0
    for x in batches:
        want, got = reference(x), onnx_run(x)
        samples, count = samples + len(x), count + 1
        for name in outputs:
            if got[name].shape != want[name].shape or got[name].dtype != want[name].dtype:
                raise ParityError(
                    f"{name}: ONNX gives {got[name].dtype}{list(got[name].shape)}, PyTorch "
                    f"{want[name].dtype}{list(want[name].shape)} for input shape {list(x.shape)}"
                )
            diff = np.abs(got[name].astype(np.float64) - want[name].astype(np.float64))
            worst[name] = max(worst[name], float(diff.max(initial=0.0)))
            if not np.issubdtype(want[name].dtype, np.floating):
                exact.add(name)
                mismatched[name] += int((diff > 0).sum())
        for name in argmax:
            flips[name] += int((got[name].argmax(-1) != want[name].argmax(-1)).sum())
    if not count:
        raise ValueError("check_parity needs at least one batch")
    problems = [
        f"{n}: max abs diff {worst[n]:.3g} > atol {atol:g}"
        for n in outputs
        if n not in exact and worst[n] > atol
    ]
    problems += [
        f"{n}: {k} integer values differ" for n, k in mismatched.items() if n in exact and k
    ]
    problems += [f"{n}: argmax differs for {k} samples" for n, k in flips.items() if k]
    if problems:
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch over {samples} samples: " + "; ".join(problems)
        )
    return {"max_abs_diff": worst, "atol": atol, "samples": samples, "batches": count}
