"""The server's own view of a run: deltas of its Prometheus `/metrics` between two scrapes.

Mean batch size = rows inferred / batches executed (`onnxserve_inference_count_total /
onnxserve_inference_exec_count_total`), mean queue wait = `onnxserve_queue_duration_seconds`
sum / count, both over the run only (after - before), summed over the models asked for.
"""

from __future__ import annotations

import math
import re
from typing import Any

Key = tuple[str, tuple[tuple[str, str], ...]]
_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus text exposition as (name, labels, value), comments skipped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append((name, dict(_LABEL.findall(labels or "")), number))
    return samples


def parse_metrics(text: str) -> dict[Key, float]:
    """Prometheus text exposition -> {(name, sorted labels): value} (comments skipped)."""
    return {(name, tuple(sorted(labels.items()))): v for name, labels, v in parse_samples(text)}


def counter_total(text: str, name: str, model: str) -> float:
    """A counter summed over the versions of one model, from one scrape."""
    return sum(
        v for n, labels, v in parse_samples(text) if n == name and labels.get("model") == model
    )


def mean_batch_size(before: str, after: str, model: str) -> float | None:
    """Rows per executed batch of one model between two scrapes; None if nothing ran."""
    rows, runs = (
        counter_total(after, name, model) - counter_total(before, name, model)
        for name in ("onnxserve_inference_count_total", "onnxserve_inference_exec_count_total")
    )
    return rows / runs if runs > 0 else None


def metric_delta(before: dict[Key, float], after: dict[Key, float]) -> dict[Key, float]:
    """after - before for every series in `after` (a series new in `after` counts from 0)."""
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def _total(delta: dict[Key, float], name: str, models: set[str] | None, **match: str) -> float:
    total = 0.0
    for (metric, pairs), value in delta.items():
        labels = dict(pairs)
        if metric != name or (models is not None and labels.get("model") not in models):
            continue
        if all(labels.get(k) == v for k, v in match.items()):
            total += value
    return total


def _bucket_label(low: float, high: float) -> str:
    if math.isinf(high):
        return f">{low:g}"
    first = math.floor(low) + 1
    return f"{high:g}" if first >= high else f"{first:g}-{high:g}"


def batch_histogram(delta: dict[Key, float], models: set[str] | None = None) -> list[dict]:
    """Batches executed per batch-size bucket during the run, from the cumulative buckets.

    Each row: `bucket` (e.g. "3-4"), its upper bound `le` (a number, or "+Inf"), `batches`.
    """
    cumulative: dict[float, float] = {}
    for (metric, pairs), value in delta.items():
        labels = dict(pairs)
        if metric != "onnxserve_batch_size_bucket":
            continue
        if models is not None and labels.get("model") not in models:
            continue
        le = float(labels["le"])
        cumulative[le] = cumulative.get(le, 0.0) + value
    rows, previous, low = [], 0.0, 0.0
    for le in sorted(cumulative):
        count = cumulative[le] - previous
        bound = le if math.isfinite(le) else "+Inf"  # JSON has no infinity
        rows.append({"bucket": _bucket_label(low, le), "le": bound, "batches": round(count)})
        previous, low = cumulative[le], le
    return rows


def server_view(delta: dict[Key, float], models: set[str] | None = None) -> dict[str, Any]:
    """What the server counted during the run, for `models` (None = every model)."""
    rows = _total(delta, "onnxserve_inference_count_total", models)
    batches = _total(delta, "onnxserve_inference_exec_count_total", models)
    queue_s = _total(delta, "onnxserve_queue_duration_seconds_sum", models)
    queued = _total(delta, "onnxserve_queue_duration_seconds_count", models)
    compute_s = _total(delta, "onnxserve_compute_infer_duration_seconds_sum", models)
    computed = _total(delta, "onnxserve_compute_infer_duration_seconds_count", models)
    failures: dict[str, int] = {}
    for (metric, pairs), value in delta.items():
        labels = dict(pairs)
        if (
            metric == "onnxserve_request_failure_total"
            and value
            and (models is None or labels.get("model") in models)
        ):
            reason = labels.get("reason", "unknown")
            failures[reason] = failures.get(reason, 0) + round(value)
    return {
        "requests_succeeded": round(_total(delta, "onnxserve_request_success_total", models)),
        "requests_failed": failures,
        "rows_inferred": round(rows),
        "batches_executed": round(batches),
        "mean_batch_size": round(rows / batches, 3) if batches else None,
        "mean_queue_ms": round(1000 * queue_s / queued, 3) if queued else None,
        "mean_compute_ms_per_batch": round(1000 * compute_s / computed, 3) if computed else None,
        "batch_histogram": batch_histogram(delta, models),
    }
