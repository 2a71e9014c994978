"""Per model version statistics in Triton's statistics-extension form (`GET .../stats`).

Kept by the dataplane (per request: success, fail, queue) and the batcher (per batch: the
compute_input / compute_infer / compute_output durations, overall and per batch size). A few
integer additions per request and per batch, on the event loop: no locks. With `--workers`,
`merge_triton` adds up the workers' entries of one model version.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    """A count and the nanoseconds spent, as Triton reports them."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns * count

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    """Compute durations of the batches of one size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """One loaded model version's counters since it was loaded."""

    last_inference_ms: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: BatchStats = field(default_factory=BatchStats)  # per request, as Triton counts
    by_batch_size: dict[int, BatchStats] = field(default_factory=dict)

    def succeeded(self, total_s: float, queue_s: float) -> None:
        """One request answered: its end-to-end and queue time."""
        self.success.add(int(total_s * 1e9))
        self.queue.add(int(queue_s * 1e9))

    def failed(self, total_s: float) -> None:
        """One request refused or failed after it reached this version."""
        self.fail.add(int(total_s * 1e9))

    def batch(self, requests: int, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One executed batch of `requests` requests holding `rows` rows."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += rows
        self.execution_count += 1
        c = self.compute
        c.compute_input.add(input_ns, requests)
        c.compute_infer.add(infer_ns, requests)
        c.compute_output.add(output_ns, requests)
        b = self.by_batch_size.get(rows)
        if b is None:
            b = self.by_batch_size[rows] = BatchStats()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def triton(self, name: str, version: str) -> dict[str, Any]:
        """This version's entry of Triton's `model_stats` list."""
        zero = {"count": 0, "ns": 0}
        c = self.compute
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": c.compute_input.as_dict(),
                "compute_infer": c.compute_infer.as_dict(),
                "compute_output": c.compute_output.as_dict(),
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.as_dict(),
                    "compute_infer": b.compute_infer.as_dict(),
                    "compute_output": b.compute_output.as_dict(),
                }
                for size, b in sorted(self.by_batch_size.items())
            ],
            "memory_usage": [],
        }


def triton_entries(models: Iterable[Any]) -> list[dict[str, Any]]:
    """Loaded model versions' entries of Triton's `model_stats` list."""
    return [m.stats.triton(m.name, str(m.version)) for m in models]


def _add_durations(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        into[key] = {
            "count": into[key]["count"] + value["count"],
            "ns": into[key]["ns"] + value["ns"],
        }


def merge_triton(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Several processes' entries (from `ModelStats.triton`) of one model version as one:
    counts and durations summed, batch statistics merged by batch size, the latest inference."""
    merged = {
        **entries[0],
        "inference_stats": dict(entries[0]["inference_stats"]),
        "batch_stats": [dict(b) for b in entries[0]["batch_stats"]],
    }
    by_size = {b["batch_size"]: b for b in merged["batch_stats"]}
    for entry in entries[1:]:
        merged["last_inference"] = max(merged["last_inference"], entry["last_inference"])
        merged["inference_count"] += entry["inference_count"]
        merged["execution_count"] += entry["execution_count"]
        _add_durations(merged["inference_stats"], entry["inference_stats"])
        for batch in entry["batch_stats"]:
            size = batch["batch_size"]
            if size in by_size:
                _add_durations(by_size[size], {k: v for k, v in batch.items() if k != "batch_size"})
            else:
                by_size[size] = dict(batch)
    merged["batch_stats"] = [by_size[size] for size in sorted(by_size)]
    return merged
