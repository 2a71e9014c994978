"""The saturation gauge: `onnxserve_saturation` = recent queue time over the target queue time.

Unit tests drive `ModelMetrics.queued` with a fake clock and read the gauge as a scrape does;
the integration test sends real requests through the app and reads `/metrics`.
"""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.metrics import SATURATION_TARGET_S, SATURATION_WINDOW_S, Metrics
from tests.test_app import client_for, cnn_body

TAU = SATURATION_WINDOW_S
unit = pytest.mark.unit


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the text exposition, as the real parser reads it."""
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def saturation(metrics: Metrics, model: str = "cnn", version: str = "1") -> float | None:
    return scrape(metrics).get(("onnxserve_saturation", (("model", model), ("version", version))))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def metrics(clock: Clock) -> Metrics:
    return Metrics(saturation_target_s=0.05, clock=clock)


@unit
def test_zero_before_any_request_and_the_help_text_defines_it(metrics):
    metrics.for_model("cnn", "1")
    assert saturation(metrics) == 0.0
    text = metrics.render().decode()
    help_line = next(x for x in text.splitlines() if x.startswith("# HELP onnxserve_saturation"))
    assert "over the target queue time (1.0 = at target)" in help_line
    assert "divided by 0.05 s" in help_line and f"time constant {TAU:g} s" in help_line


def by_definition(history: list[tuple[float, float]], now: float, target_s: float) -> float:
    """The gauge's definition, summed over every (time, queue seconds) afresh."""
    weights = [(math.exp(-(now - t) / TAU), q) for t, q in history]
    return sum(w * q for w, q in weights) / max(sum(w for w, _ in weights), 1.0) / target_s


@unit
def test_steady_queue_time_reads_as_its_ratio_to_the_target(metrics, clock):
    m = metrics.for_model("cnn", "1")
    history = []
    for _ in range(200):  # 100 requests/s, each waited 25 ms: half the 50 ms target
        m.queued(0.025)
        history.append((clock.now, 0.025))
        clock.now += 0.01
    assert saturation(metrics) == pytest.approx(0.5)
    for _ in range(1000):  # then at the target for one window: the 25 ms ones still count
        m.queued(0.05)
        history.append((clock.now, 0.05))
        clock.now += 0.01
    value = saturation(metrics)
    assert value == pytest.approx(by_definition(history, clock.now, 0.05))
    assert 0.9 < value < 1.0
    for _ in range(5000):  # five windows at the target: the 25 ms ones are forgotten
        m.queued(0.05)
        clock.now += 0.01
    assert saturation(metrics) == pytest.approx(1.0, abs=1e-3)


@unit
def test_each_request_weighs_exp_minus_age_over_the_window(metrics, clock):
    m = metrics.for_model("cnn", "1")
    for q in (0.02, 0.08):  # same instant: the plain mean, 50 ms = the target
        m.queued(q)
    assert saturation(metrics) == pytest.approx(1.0)
    for _ in range(5):
        m.queued(0.1)
    clock.now += TAU  # the 7 requests above now weigh e^-1 each
    for _ in range(5):
        m.queued(0.0)
    old = math.exp(-1)
    expected = (old * (0.02 + 0.08 + 5 * 0.1)) / (7 * old + 5) / 0.05
    assert saturation(metrics) == pytest.approx(expected)
    start = clock.now - TAU
    history = [(start, 0.02), (start, 0.08), *[(start, 0.1)] * 5, *[(clock.now, 0.0)] * 5]
    assert expected == pytest.approx(by_definition(history, clock.now, 0.05))


@unit
def test_the_gauge_falls_toward_zero_once_requests_stop(metrics, clock):
    m = metrics.for_model("cnn", "1")
    for _ in range(100):  # a burst that waited 100 ms each: twice the target
        m.queued(0.1)
    assert saturation(metrics) == pytest.approx(2.0)
    clock.now += TAU * math.log(100)  # total weight left: exactly one request's
    assert saturation(metrics) == pytest.approx(2.0)
    clock.now += TAU  # below one request's weight the missing weight counts as no wait
    assert saturation(metrics) == pytest.approx(2.0 * math.exp(-1))
    clock.now += 10 * TAU
    assert saturation(metrics) == pytest.approx(2.0 * math.exp(-11))
    clock.now += 1000 * TAU
    assert saturation(metrics) == 0.0


@unit
def test_queued_also_observes_the_queue_histogram(metrics):
    m = metrics.for_model("lstm", "3")
    m.queued(0.004)
    m.queued(0.002)
    samples_ = scrape(metrics)
    labels = (("model", "lstm"), ("version", "3"))
    assert samples_[("onnxserve_queue_duration_seconds_count", labels)] == 2
    assert samples_[("onnxserve_queue_duration_seconds_sum", labels)] == pytest.approx(0.006)
    bucket = (*labels, ("le", "0.0025"))
    assert samples_[("onnxserve_queue_duration_seconds_bucket", tuple(sorted(bucket)))] == 1


@unit
def test_versions_are_separate_series(metrics):
    one, two = metrics.for_model("cnn", "1"), metrics.for_model("cnn", "2")
    one.queued(0.05)
    two.queued(0.01)
    assert saturation(metrics, version="1") == pytest.approx(1.0)
    assert saturation(metrics, version="2") == pytest.approx(0.2)


@unit
def test_unload_drops_the_series_but_a_reload_of_the_same_version_keeps_it(metrics):
    old = metrics.for_model("cnn", "1")
    old.queued(0.05)
    new = metrics.for_model("cnn", "1")  # a reload builds the new one first ...
    new.queued(0.025)
    old.remove()  # ... then drains and removes the old one
    assert saturation(metrics) == pytest.approx(0.5)
    new.remove()
    assert saturation(metrics) is None


@unit
def test_target_and_window_must_be_positive():
    for bad in ({"saturation_target_s": 0}, {"saturation_window_s": -1}):
        with pytest.raises(ValueError, match="positive"):
            Metrics(**bad)
    assert Metrics().saturation_target_s == SATURATION_TARGET_S == 0.05


@pytest.mark.integration
async def test_the_server_exports_the_saturation_of_the_requests_it_answered(repository):
    """K requests: the queue histogram counts K, and the gauge lies between the smallest and the
    largest queue time the server reported for them (all within one window, so each weighs
    more than 1/e), over the app's target."""
    body = cnn_body(repository, rows=1)
    k = 20
    settings = Settings(repository=repository, models=["cnn"])
    async with client_for(settings) as client:
        queued_ms = []
        for _ in range(k):
            r = await client.post("/v2/models/cnn/infer", json=body)
            assert r.status_code == 200, r.text
            queued_ms.append(r.json()["parameters"]["queue_ms"])
        text = (await client.get("/metrics")).text
    target_s = settings.saturation_target_ms / 1000  # what create_app gives its Metrics
    found = {
        (s.name, s.labels.get("model")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert found[("onnxserve_queue_duration_seconds_count", "cnn")] == k
    value = found[("onnxserve_saturation", "cnn")]
    rounding_ms = 0.0005  # queue_ms is reported to the microsecond
    low = (min(queued_ms) - rounding_ms) / 1000 / target_s
    high = (max(queued_ms) + rounding_ms) / 1000 / target_s
    assert low <= value <= high, (value, queued_ms)
