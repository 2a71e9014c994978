"""Prometheus metrics, modelled on Triton's `nv_inference_*` family under an `onnxserve_` prefix.

Mean batch size = `onnxserve_inference_count_total / onnxserve_inference_exec_count_total`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's metric families, on a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        r = self.registry
        self.success = Counter(
            "onnxserve_request_success", "Requests answered successfully.", labels, registry=r
        )
        self.failure = Counter(
            "onnxserve_request_failure",
            "Requests refused or failed, by reason.",
            (*labels, "reason"),
            registry=r,
        )
        self.inferences = Counter(
            "onnxserve_inference_count", "Rows inferred (batch rows summed).", labels, registry=r
        )
        self.executions = Counter(
            "onnxserve_inference_exec_count", "Session runs (batches executed).", labels, registry=r
        )
        self.request_duration = Histogram(
            "onnxserve_request_duration_seconds",
            "End-to-end server time per request.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "onnxserve_queue_duration_seconds",
            "Time a request waited in the batcher's queue.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "onnxserve_compute_infer_duration_seconds",
            "Session run time per batch.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "onnxserve_batch_size", "Rows per executed batch.", labels, buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.pending = Gauge(
            "onnxserve_pending_request_count", "Requests waiting in the queue.", labels, registry=r
        )
        self.provider = Gauge(
            "onnxserve_model_provider",
            "1 for the execution provider that runs each loaded model version.",
            (*labels, "provider"),
            registry=r,
        )

    def for_model(self, model: str, version: str) -> ModelMetrics:
        """Label-bound children for one model version (cheap to use on the hot path)."""
        lv = (model, version)
        return ModelMetrics(
            metrics=self,
            labels=lv,
            success=self.success.labels(*lv),
            inferences=self.inferences.labels(*lv),
            executions=self.executions.labels(*lv),
            request_duration=self.request_duration.labels(*lv),
            queue_duration=self.queue_duration.labels(*lv),
            compute_duration=self.compute_duration.labels(*lv),
            batch_size=self.batch_size.labels(*lv),
            pending=self.pending.labels(*lv),
        )

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


@dataclass
class ModelMetrics:
    """One model version's metric children."""

    metrics: Metrics
    labels: tuple[str, str]
    success: Counter
    inferences: Counter
    executions: Counter
    request_duration: Histogram
    queue_duration: Histogram
    compute_duration: Histogram
    batch_size: Histogram
    pending: Gauge
    provider_name: str = ""

    def batch(self, rows: int, compute_s: float) -> None:
        """Record one executed batch."""
        self.executions.inc()
        self.inferences.inc(rows)
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_s)

    def set_provider(self, provider: str) -> None:
        """Mark the provider that runs this model version."""
        self.provider_name = provider
        self.metrics.provider.labels(*self.labels, provider).set(1)

    def remove(self) -> None:
        """Zero the queue gauge and drop the provider series of an unloaded version."""
        self.pending.set_function(lambda: 0)
        if self.provider_name:
            self.metrics.provider.remove(*self.labels, self.provider_name)
