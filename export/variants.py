"""Optional variants of an exported graph, each accepted only within a declared metric tolerance.

- `optimized`: ONNX Runtime's offline-optimised graph (extended level, CPU execution provider; the
  saved graph may hold CPU-only fused operators, so it is meant for the CPU provider).
- `int8`: dynamic INT8 quantisation of the weights (`onnxruntime.quantization.quantize_dynamic`).
- `fp16`: FP16 weights and compute (`export.fp16`), FP32 inputs and outputs, the nodes matching
  `keep_fp32` (by default the serving wrapper's pre/post-processing) left in FP32; measured on the
  CPU provider here, meant for a GPU.

A refused variant's file is deleted; its entry stays in the config with `accepted=false` and the
reason (also when it could not be built or loaded), so the history shows what was tried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import onnxruntime as ort
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from export.fp16 import WRAPPER_NODES, to_fp16
from export.verify import Run, ort_predict, ort_session
from service.model_config import Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """How much `metric` may worsen: absolutely, or relative to the baseline if `relative`."""

    metric: str
    max_worsening: float
    higher_is_better: bool = True
    relative: bool = False

    def worsening(self, baseline: float, value: float) -> float:
        """How much worse `value` is than `baseline` (negative when better)."""
        worse = baseline - value if self.higher_is_better else value - baseline
        return worse / abs(baseline) if self.relative else worse

    def describe(self) -> str:
        """The rule in words, e.g. 'accuracy may drop by at most 0.01'."""
        way = "drop" if self.higher_is_better else "rise"
        amount = f"{self.max_worsening:.0%}" if self.relative else f"{self.max_worsening:g}"
        return f"{self.metric} may {way} by at most {amount}"


def _optimized(source: Path, target: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _int8(source: Path, target: Path) -> None:
    prepared = target.with_suffix(".pre.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per tensor on root
    try:
        # ONNX shape inference + folding, as ORT recommends; symbolic inference chokes on Reshape
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)


def _fp16(source: Path, target: Path, keep_fp32: str | None = WRAPPER_NODES) -> None:
    to_fp16(source, target, keep_fp32)


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "optimized": _optimized,
    "int8": _int8,
    "fp16": _fp16,
}
KINDS: tuple[str, ...] = tuple(BUILDERS)


def make_variants(
    model_path: Path,
    evaluate: Callable[[Run], Mapping[str, float]],
    tolerance: Tolerance,
    kinds: Sequence[str] = KINDS,
    baseline: float | None = None,
    *,
    keep_fp32: str | None = WRAPPER_NODES,
    batch_size: int | None = 256,
    details: Sequence[str] = (),
) -> list[Variant]:
    """Build each variant beside `model_path` as `model.<kind>.onnx`, measure `tolerance.metric`
    with `evaluate`, and accept it only if the metric worsens by no more than the tolerance
    (relative to `baseline`, by default the FP32 graph's own value).

    `keep_fp32` is the regex of node names the FP16 variant leaves in FP32 (None: none);
    `batch_size` the chunking of each variant's predictions (None: whole batches); `details`
    names further figures of `evaluate` to quote in each variant's reason.
    """
    if baseline is None:
        baseline = evaluate(ort_predict(ort_session(model_path), batch_size))[tolerance.metric]
    builders = BUILDERS | {"fp16": partial(_fp16, keep_fp32=keep_fp32)}
    size = model_path.stat().st_size
    variants = []
    for kind in kinds:
        path = model_path.with_name(f"{model_path.stem}.{kind}.onnx")
        try:
            builders[kind](model_path, path)
            figures = evaluate(ort_predict(ort_session(path), batch_size))
        except Exception as exc:  # a converter or ONNX Runtime refusing this graph
            reason = f"refused: could not build or run it ({type(exc).__name__}: {exc})"[:500]
            log.warning("%s variant of %s %s", kind, model_path, reason)
            path.unlink(missing_ok=True)
            variants.append(
                Variant(
                    kind=kind,  # type: ignore[arg-type]
                    file=path.name,
                    size_bytes=0,
                    metric=tolerance.metric,
                    value=baseline,  # not measured: the reason says why
                    delta=0.0,
                    accepted=False,
                    reason=reason,
                )
            )
            continue
        value = figures[tolerance.metric]
        worse = tolerance.worsening(baseline, value)
        accepted = worse <= tolerance.max_worsening
        change = (
            f"{tolerance.metric} {baseline:.4g} -> {value:.4g}, "
            f"size {size} -> {path.stat().st_size} bytes"
        )
        change += "".join(f", {name} {figures[name]:.4g}" for name in details)
        if accepted:
            reason = f"{change}; within tolerance ({tolerance.describe()})"
        else:
            reason = f"refused: {change}; breaks tolerance ({tolerance.describe()}); file removed"
            log.warning("%s variant of %s %s", kind, model_path, reason)
        variants.append(
            Variant(
                kind=kind,  # type: ignore[arg-type]
                file=path.name,
                size_bytes=path.stat().st_size,
                metric=tolerance.metric,
                value=value,
                delta=value - baseline,
                accepted=accepted,
                reason=reason,
            )
        )
        if not accepted:
            path.unlink()
    return variants
