"""Optional variants of an exported graph, each accepted only within a declared metric tolerance.

- `optimized`: ONNX Runtime's offline-optimised graph (extended level, CPU execution provider; the
  saved graph may hold CPU-only fused operators, so it is meant for the CPU provider).
- `int8`: dynamic INT8 quantisation of the weights (`onnxruntime.quantization.quantize_dynamic`).

A refused variant's file is deleted; its entry stays in the config with `accepted=false` and the
reason, so the history shows what was tried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

from export.verify import ort_predict, ort_session
from models.evaluate import Predict
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
    try:
        # ONNX shape inference + folding, as ORT recommends; symbolic inference chokes on Reshape
        quant_pre_process(source, prepared, skip_symbolic_shape=True)
        quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)


BUILDERS: dict[str, Callable[[Path, Path], None]] = {"optimized": _optimized, "int8": _int8}


def make_variants(
    model_path: Path,
    evaluate: Callable[[Predict], dict[str, float]],
    tolerance: Tolerance,
    kinds: Sequence[str] = ("optimized", "int8"),
    baseline: float | None = None,
) -> list[Variant]:
    """Build each variant beside `model_path` as `model.<kind>.onnx`, measure `tolerance.metric`
    with `evaluate`, and accept it only if the metric worsens by no more than the tolerance
    (relative to `baseline`, by default the FP32 graph's own value)."""
    if baseline is None:
        baseline = evaluate(ort_predict(ort_session(model_path)))[tolerance.metric]
    size = model_path.stat().st_size
    variants = []
    for kind in kinds:
        path = model_path.with_name(f"{model_path.stem}.{kind}.onnx")
        BUILDERS[kind](model_path, path)
        value = evaluate(ort_predict(ort_session(path)))[tolerance.metric]
        worse = tolerance.worsening(baseline, value)
        accepted = worse <= tolerance.max_worsening
        change = (
            f"{tolerance.metric} {baseline:.4g} -> {value:.4g}, "
            f"size {size} -> {path.stat().st_size} bytes"
        )
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
