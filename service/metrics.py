"""Prometheus metrics, modelled on Triton's `nv_inference_*` family under an `onnxserve_` prefix.

Mean batch size = `onnxserve_inference_count_total / onnxserve_inference_exec_count_total`.

`onnxserve_saturation{model,version}` is the signal to autoscale on (docs/deploy.md): the recent
queue time of a model version's requests over the target queue time, so 1.0 = at target. "Recent
queue time" is an exponentially weighted mean: each request's wait in the batcher's queue weighs
exp(-age / window), and the sum is divided by the total weight, or by 1 when less than one
request's weight is left, so the gauge falls toward 0 once requests stop. It is computed when
scraped; recording a request (`ModelMetrics.queued`) is a few float operations.

With `--workers N` (service/workers.py) each worker writes its series to prometheus_client's
multiprocess folder, which the supervisor names in PROMETHEUS_MULTIPROC_DIR before any worker
imports prometheus_client, and `/metrics` in any worker reports every worker's together:
counters and histograms are summed (a dead worker's counts stay), and the gauges aggregate
over live workers: pending requests are summed (`livesum`), saturation is the most saturated
worker's (`livemax`, the pod is as saturated as its busiest queue), and the provider gauge is
the maximum (`livemax`). Gauges computed on demand in a single process (pending, saturation)
are written by `Metrics.publish`, which each worker calls every `PUBLISH_S`, and an unloaded
version's gauges read 0 instead of vanishing (prometheus_client cannot remove a series across
processes). Supervisor restarts are counted in `onnxserve_worker_restarts_total`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from service.workerstate import METRICS_ENV

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Default target queue time: saturation 1.0 means requests waited this long on average.
SATURATION_TARGET_S = 0.05
#: Time constant of the saturation gauge's weighting: a request's weight is exp(-age / window).
SATURATION_WINDOW_S = 10.0
SATURATION_HELP = (
    "Recent queue time over the target queue time (1.0 = at target): the exponentially weighted "
    "mean (time constant {window:g} s) of the time requests waited in the batcher's queue, "
    "divided by {target:g} s; falls toward 0 when requests stop. Autoscale on this."
)
#: Multiprocess mode: how often a worker writes its on-demand gauges (pending, saturation).
PUBLISH_S = 0.25


def multiprocess_dir() -> str | None:
    """prometheus_client's multiprocess folder (set by the --workers supervisor), or None."""
    return os.environ.get(METRICS_ENV) or None


def worker_restarts() -> Counter:
    """The --workers supervisor's restart counter, in the multiprocess folder like the
    workers' series (so any worker's /metrics reports it)."""
    return Counter(
        "onnxserve_worker_restarts",
        "Worker processes that died and were restarted by the --workers supervisor.",
        registry=None,
    )


class Metrics:
    """The service's metric families, on a registry of its own (one per app)."""

    def __init__(
        self,
        saturation_target_s: float = SATURATION_TARGET_S,
        saturation_window_s: float = SATURATION_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if saturation_target_s <= 0 or saturation_window_s <= 0:
            raise ValueError("saturation target and window must be positive (seconds)")
        self.saturation_target_s = saturation_target_s
        self.saturation_window_s = saturation_window_s
        self.clock = clock
        self.multiprocess_dir = multiprocess_dir()
        self._saturation_owner: dict[tuple[str, str], ModelMetrics] = {}
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
            "onnxserve_pending_request_count", "Requests waiting in the queue.", labels,
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.provider = Gauge(
            "onnxserve_model_provider",
            "1 for the execution provider that runs each loaded model version; `reason` says why "
            "a GPU provider that was asked for is not the one (empty when it is).",
            (*labels, "provider", "reason"),
            registry=r,
            multiprocess_mode="livemax",
        )
        self.saturation = Gauge(
            "onnxserve_saturation",
            SATURATION_HELP.format(window=saturation_window_s, target=saturation_target_s),
            labels,
            registry=r,
            multiprocess_mode="livemax",
        )

    def for_model(self, model: str, version: str) -> ModelMetrics:
        """Label-bound children for one model version (cheap to use on the hot path)."""
        lv = (model, version)
        bound = ModelMetrics(
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
            saturation_target_s=self.saturation_target_s,
            saturation_window_s=self.saturation_window_s,
            clock=self.clock,
        )
        # The newest children for a label set own its saturation series (a reload builds the new
        # version before the old one is removed).
        self._saturation_owner[lv] = bound
        if not self.multiprocess_dir:
            self.saturation.labels(*lv).set_function(bound.saturation)
        return bound

    def publish(self) -> None:
        """Multiprocess mode: write the on-demand gauges (queue depth, saturation) of every
        version that owns them to this worker's files; nothing to do in a single process."""
        for bound in list(self._saturation_owner.values()):
            bound.publish()

    def render(self) -> bytes:
        """The Prometheus text exposition (every worker's series in multiprocess mode)."""
        if self.multiprocess_dir:
            self.publish()  # this process's gauges as of now
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
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
    provider_reason: str = ""
    saturation_target_s: float = SATURATION_TARGET_S
    saturation_window_s: float = SATURATION_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    # (weighted sum of queue seconds, total weight, clock time of both): one tuple, replaced
    # whole, so that a scrape on another thread reads a consistent state.
    _recent: tuple[float, float, float] = field(default=(0.0, 0.0, -math.inf), repr=False)
    _depth: Callable[[], int] | None = field(default=None, repr=False)  # multiprocess mode

    def queued(self, seconds: float) -> None:
        """Record one request's wait in the batcher's queue (histogram and saturation)."""
        self.queue_duration.observe(seconds)
        now = self.clock()
        total, weight, then = self._recent
        decay = math.exp(min(0.0, then - now) / self.saturation_window_s)
        self._recent = (total * decay + seconds, weight * decay + 1.0, now)

    def saturation(self) -> float:
        """Recent queue time over the target (1.0 = at target); see the module docstring."""
        total, weight, then = self._recent
        decay = math.exp(min(0.0, then - self.clock()) / self.saturation_window_s)
        return total * decay / max(weight * decay, 1.0) / self.saturation_target_s

    def batch(self, rows: int, compute_s: float) -> None:
        """Record one executed batch."""
        self.executions.inc()
        self.inferences.inc(rows)
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_s)

    def track_pending(self, depth: Callable[[], int]) -> None:
        """The queue gauge reads `depth()` (when scraped; in multiprocess mode when published)."""
        if self.metrics.multiprocess_dir:
            self._depth = depth
        else:
            self.pending.set_function(depth)

    def publish(self) -> None:
        """Multiprocess mode: write the queue depth and saturation now (`Metrics.publish`)."""
        if self._depth is not None:
            self.pending.set(self._depth())
        self.metrics.saturation.labels(*self.labels).set(self.saturation())

    def set_provider(self, provider: str, reason: str = "") -> None:
        """Mark the provider that runs this model version (and why not the GPU, if so)."""
        self.provider_name, self.provider_reason = provider, reason
        self.metrics.provider.labels(*self.labels, provider, reason).set(1)

    def remove(self) -> None:
        """Zero the queue gauge and drop the provider and saturation series of an unloaded
        version (the saturation series only if no newer load of the same version owns it).
        In multiprocess mode the series cannot be removed: they are set to 0."""
        owner = self.metrics._saturation_owner.get(self.labels) is self
        if owner:
            del self.metrics._saturation_owner[self.labels]
        if self.metrics.multiprocess_dir:
            self._depth = None
            self.pending.set(0)
            if self.provider_name:
                self.metrics.provider.labels(*self.labels, *self._provider()).set(0)
            if owner:
                self.metrics.saturation.labels(*self.labels).set(0)
            return
        self.pending.set_function(lambda: 0)
        if self.provider_name:
            self.metrics.provider.remove(*self.labels, *self._provider())
        if owner:
            self.metrics.saturation.remove(*self.labels)

    def _provider(self) -> tuple[str, str]:
        return self.provider_name, self.provider_reason
