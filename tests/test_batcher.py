"""The dynamic batcher with a fake model: merging, splitting, ordering, refusals."""

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.batcher import BACKGROUND, ONLINE, Batcher
from service.errors import QueueFull, QueueTimeout, Unavailable

pytestmark = pytest.mark.unit


class FakeModel:
    """Doubles its input; records every batch it ran; can be held to let a queue build up."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[int] = []
        self.seen: list[np.ndarray] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.where: list[str] = []  # each run's thread, in order

    @property
    def threads(self) -> set[str]:
        return set(self.where)

    def __call__(self, inputs):
        self.gate.wait(5)
        self.where.append(threading.current_thread().name)
        x = inputs["x"]
        self.calls.append(x.shape[0])
        self.seen.append(x.copy())
        if self.delay:
            time.sleep(self.delay)
        return {"y": x * 2, "n": x.sum(axis=tuple(range(1, x.ndim)))}


def make(model, **kw) -> Batcher:
    b = Batcher(run=model, executor=ThreadPoolExecutor(2), **kw)
    b.start()
    return b


def row(value: float, width: int = 3) -> dict:
    return {"x": np.full((1, width), value, np.float32)}


async def test_every_caller_gets_its_own_rows_and_batches_merge():
    model = FakeModel(delay=0.01)
    b = make(model, max_batch_size=16)
    results = await asyncio.gather(*(b.submit(row(i)) for i in range(64)))
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r.outputs["y"], np.full((1, 3), 2 * i, np.float32))
        assert r.outputs["n"].tolist() == [3 * i]
    assert sum(model.calls) == 64
    assert len(model.calls) < 64, "requests were never merged"
    assert max(model.calls) <= 16
    assert max(r.batch_size for r in results) > 1
    assert "MainThread" not in model.threads
    await b.close()


async def test_multi_row_requests_count_all_rows_and_split_exactly():
    model = FakeModel(delay=0.01)
    b = make(model, max_batch_size=8)
    sizes = [1, 3, 5, 2, 7, 4]
    reqs = [
        {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * k}
        for k, n in enumerate(sizes)
    ]
    results = await asyncio.gather(*(b.submit(r) for r in reqs))
    for req, res in zip(reqs, results, strict=True):
        np.testing.assert_array_equal(res.outputs["y"], req["x"] * 2)
    assert all(c <= 8 for c in model.calls)
    await b.close()


async def test_oversized_request_runs_alone_instead_of_failing():
    model = FakeModel()
    b = make(model, max_batch_size=4)
    big = {"x": np.ones((10, 2), np.float32)}
    res = await b.submit(big)
    assert res.outputs["y"].shape == (10, 2) and model.calls == [10]
    await b.close()


async def test_different_shapes_are_never_merged():
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch_size=64)
    first = asyncio.ensure_future(b.submit(row(0, width=5)))
    await asyncio.sleep(0.02)  # the first batch is now held inside the model
    tasks = [asyncio.ensure_future(b.submit(row(i, width=3 + i % 3))) for i in range(30)]
    await asyncio.sleep(0.02)
    model.gate.set()
    results = await asyncio.gather(first, *tasks)
    for batch in model.seen:
        assert len({batch.shape[1]}) == 1
    widths = sorted(b_.shape[1] for b_ in model.seen[1:])
    assert widths == [3, 4, 5], f"expected one merged batch per width, got {widths}"
    for i, r in enumerate(results[1:]):
        assert r.outputs["y"].shape == (1, 3 + i % 3)
    await b.close()


async def test_idle_batcher_does_not_wait_for_the_delay():
    model = FakeModel()
    b = make(model, max_batch_size=32, max_queue_delay_ms=500)
    t0 = time.perf_counter()
    await b.submit(row(1))
    assert time.perf_counter() - t0 < 0.25
    await b.close()


async def test_full_queue_refuses_at_once_with_retry_after():
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch_size=1, max_queue_size=2)
    running = asyncio.ensure_future(b.submit(row(0)))
    await asyncio.sleep(0.02)
    queued = [asyncio.ensure_future(b.submit(row(i))) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as info:
        await b.submit(row(3))
    assert info.value.status == 503 and info.value.headers["Retry-After"]
    model.gate.set()
    await asyncio.gather(running, *queued)
    assert model.calls == [1, 1, 1]
    await b.close()


async def test_queue_timeout_is_504_and_never_runs():
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch_size=1)
    running = asyncio.ensure_future(b.submit(row(0)))
    await asyncio.sleep(0.02)
    with pytest.raises(QueueTimeout) as info:
        await b.submit(row(42), timeout_ms=30)
    assert info.value.status == 504
    model.gate.set()
    await running
    await b.close()
    assert all(42 not in s for s in model.seen)


async def test_cancelled_request_is_dropped_before_compute():
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch_size=1)
    running = asyncio.ensure_future(b.submit(row(0)))
    await asyncio.sleep(0.02)
    doomed = asyncio.ensure_future(b.submit(row(7)))
    await asyncio.sleep(0.01)
    doomed.cancel()
    await asyncio.sleep(0.01)
    model.gate.set()
    await running
    after = await b.submit(row(8))
    assert after.outputs["y"][0, 0] == 16
    await b.close()
    assert all(7 not in s for s in model.seen)


async def test_online_requests_go_before_background_work():
    model = FakeModel()
    model.gate.clear()
    b = make(model, max_batch_size=1)
    first = asyncio.ensure_future(b.submit(row(0)))
    await asyncio.sleep(0.02)
    order = []

    async def go(value, priority):
        await b.submit(row(value), priority)
        order.append(priority)

    tasks = [asyncio.ensure_future(go(i, BACKGROUND)) for i in range(3)]
    await asyncio.sleep(0)
    tasks += [asyncio.ensure_future(go(i, ONLINE)) for i in range(3)]
    await asyncio.sleep(0.01)
    model.gate.set()
    await asyncio.gather(first, *tasks)
    assert order == [ONLINE] * 3 + [BACKGROUND] * 3
    await b.close()


async def test_wrong_row_count_fails_every_caller_with_the_contract():
    def broken(inputs):
        return {"y": inputs["x"][:1]}

    b = make(broken, max_batch_size=8)
    with pytest.raises(RuntimeError, match="one row per input row"):
        await b.submit({"x": np.ones((3, 2), np.float32)})
    await b.close()


async def test_close_finishes_accepted_work_then_refuses():
    model = FakeModel(delay=0.005)
    b = make(model, max_batch_size=2)
    tasks = [asyncio.ensure_future(b.submit(row(i))) for i in range(10)]
    await asyncio.sleep(0)
    await b.close()
    assert len(await asyncio.gather(*tasks)) == 10
    with pytest.raises(Unavailable):
        await b.submit(row(1))


async def test_delay_fills_batches_when_instances_are_busy():
    model = FakeModel(delay=0.02)
    b = make(model, max_batch_size=8, max_queue_delay_ms=15, instances=2)
    await asyncio.gather(*(b.submit(row(i)) for i in range(24)))
    assert len(model.calls) < 24
    await b.close()


async def test_a_tiny_timeout_on_an_idle_batcher_still_runs():
    model = FakeModel()
    b = make(model, max_batch_size=4)
    result = await b.submit(row(1.0), timeout_ms=0.001)
    assert result.batch_size == 1 and model.calls == [1]


async def test_room_goes_to_waiters_first_come_with_a_held_slot():
    model = FakeModel()
    model.gate.clear()  # the first batch runs until the gate opens: the queue builds up
    b = make(model, max_batch_size=1, max_queue_size=2)
    running = [asyncio.ensure_future(b.submit(row(i))) for i in range(3)]  # 1 runs, 2 wait
    await asyncio.sleep(0.05)
    with pytest.raises(QueueFull) as refused:
        b.admit()
    assert refused.value.room is b  # the refusal says where to wait for room
    offered: list = []

    def waiter(name: str, keep: bool):
        def offer(reservation) -> bool:
            offered.append((name, reservation))
            return keep

        return offer

    b.wait_for_room(waiter("polite", False))  # gives its slot back (nothing sent yet)
    b.wait_for_room(waiter("eager", True))
    b.wait_for_room(waiter("late", True))
    assert offered == []  # no room yet
    model.gate.set()
    await asyncio.sleep(0.05)  # one batch done: room for one, then more as the queue drains
    await asyncio.gather(*running)  # the queue is empty now, but two slots are held
    assert [name for name, _ in offered] == ["polite", "eager", "late"]
    eager, late = offered[1][1], offered[2][1]
    with pytest.raises(QueueFull):  # an anonymous request does not get a held slot...
        b.admit()
    b.admit(eager)  # ...the one it was held for does, once
    assert not eager.open
    late.release()  # given back unused: room for anyone
    b.admit()
    await b.close()
    b.wait_for_room(waiter("closing", True))  # a closed batcher wakes waiters with no slot
    assert offered[-1] == ("closing", None)


async def test_a_lone_small_run_goes_on_the_loop_once_measured_and_never_beside_others():
    model = FakeModel()
    b = make(model, max_batch_size=8, inline_ns=10**9, instances=2)
    await b.submit(row(1))  # shape not measured yet: the model's thread
    assert "MainThread" not in model.threads
    r = await b.submit(row(2))  # measured, idle, one row: on the loop
    assert "MainThread" in model.threads and r.outputs["y"].tolist() == [[4.0] * 3]
    model.where.clear()
    await b.submit(row(3, width=5))  # another shape: measured first
    await b.submit({"x": np.ones((2, 3), np.float32)})  # two rows: never on the loop
    assert model.threads and "MainThread" not in model.threads
    model.gate.clear()  # the model now waits at its gate: on the loop, a lone run would hang it
    running = asyncio.ensure_future(b.submit({"x": np.ones((2, 3), np.float32)}))
    await asyncio.sleep(0.01)
    beside = asyncio.ensure_future(b.submit(row(4)))  # measured, but a batch is in flight
    await asyncio.sleep(0.01)
    assert not beside.done() and not running.done()
    model.gate.set()
    await asyncio.gather(running, beside)
    assert "MainThread" not in model.threads


async def test_nothing_runs_on_the_loop_when_inlining_is_off_or_the_model_is_slow():
    for kw, model in (({"inline_ns": 0}, FakeModel()), ({"inline_ns": 1_000}, FakeModel(0.002))):
        b = make(model, max_batch_size=8, **kw)
        for i in range(3):
            await b.submit(row(i))
        assert "MainThread" not in model.threads, kw


async def test_requests_that_arrive_together_merge_instead_of_running_on_the_loop():
    model = FakeModel()
    b = make(model, max_batch_size=8, inline_ns=10**9)
    await b.submit(row(0))  # measured, and the last batch was a lone request
    await asyncio.gather(*(b.submit(row(i)) for i in range(1, 6)))  # five in one turn
    # the first may take the loop; the second goes to the thread; the other three merge
    assert model.calls[1:] == [1, 1, 3]
    assert model.where[1] == "MainThread" and "MainThread" not in model.where[2:]
    await b.submit(row(6))  # after a merged batch: the thread, and a lone batch again
    await b.submit(row(7))  # light load again: the loop
    assert model.calls[-2:] == [1, 1] and model.where[-2:][1] == "MainThread"
    assert model.where[-2] != "MainThread"


async def test_a_model_without_a_batch_axis_never_runs_on_the_loop():
    """Its requests' sizes are not in their shape key: a long one must not pass for a short one."""
    model = FakeModel()
    b = make(model, max_batch_size=0, inline_ns=10**9)
    for n in (1, 1, 1, 500):
        await b.submit({"x": np.ones((n, 3), np.float32)})
    assert "MainThread" not in model.threads


async def test_one_slow_run_does_not_send_the_next_lone_requests_to_the_thread():
    """The inline decision reads the median of a shape's last runs, not a running average that
    one outlier (a page fault, a busy neighbour) would push past the limit."""
    model = FakeModel()
    b = make(model, max_batch_size=8, inline_ns=20_000_000)  # 20 ms
    for i in range(4):
        await b.submit(row(i))
    model.delay = 0.2  # one run of 200 ms: ten times the limit
    await b.submit(row(4))
    model.delay = 0.0
    model.where.clear()
    await b.submit(row(5))
    assert model.where == ["MainThread"]
    model.delay = 0.05  # runs that stay slow do move the median past the limit
    for i in range(6):
        await b.submit(row(i))
    model.delay = 0.0
    model.where.clear()
    await b.submit(row(6))
    assert model.where != ["MainThread"]


async def test_on_one_cpu_batches_run_on_the_loop_at_any_load_and_still_merge():
    """One CPU (`one_cpu_ns`): a measured shape's batches run on the loop, each made of every
    request queued in the same turn, and the next only after the last one's answers are out."""
    model = FakeModel()
    b = make(model, max_batch_size=8, one_cpu_ns=10**9)
    await b.submit(row(0))  # a shape never run: the thread, to measure it
    assert model.where[0] != "MainThread"
    answered: list[int] = []
    runs_seen: list[int] = []

    async def call(i: int) -> None:
        await b.submit(row(i))
        answered.append(i)
        runs_seen.append(len(model.calls))

    await asyncio.gather(*(call(i) for i in range(1, 21)))  # twenty in one turn
    assert model.calls[1:] == [8, 8, 4]  # merged, at most max_batch_size rows each
    assert set(model.where[1:]) == {"MainThread"}
    # every caller of a batch heard back before the next batch ran
    assert runs_seen == [2] * 8 + [3] * 8 + [4] * 4


async def test_on_one_cpu_a_batch_expected_to_run_long_goes_to_the_thread():
    model = FakeModel(delay=0.02)  # 20 ms a run: 20 ms a row, measured on one row
    b = make(model, max_batch_size=8, one_cpu_ns=100_000_000)  # 100 ms
    await b.submit(row(0))
    await b.submit(row(1))  # 1 row x 20 ms: the loop
    await asyncio.gather(*(b.submit(row(i)) for i in range(8)))  # 8 rows x 20 ms: the thread
    assert model.where[1] == "MainThread" and model.where[2] != "MainThread"
    assert model.calls == [1, 1, 8]


async def test_on_one_cpu_requests_queued_during_a_batch_wait_until_its_answers_are_out():
    """What arrives while a batch runs on the loop (here: queued from inside the run) goes in the
    next batch, which starts only after the first batch's callers have had their answers and the
    turn after that (when transports write) has come."""
    loop = asyncio.get_running_loop()
    events: list[str] = []
    b: Batcher

    class Model(FakeModel):
        def __call__(self, inputs):
            events.append(f"run {inputs['x'].shape[0]}")
            if len(self.calls) == 1:  # the second run, on the loop: two more requests come in
                for i in (8, 9):
                    watch(b.enqueue(row(i)).future, i)
            return super().__call__(inputs)

    def watch(future: asyncio.Future, i: int) -> None:
        def answered(_: asyncio.Future) -> None:
            events.append(f"answer {i}")
            loop.call_soon(events.append, f"written {i}")  # as the transports write

        future.add_done_callback(answered)

    b = make(Model(), max_batch_size=8, one_cpu_ns=10**9)
    await b.submit(row(0))  # measured
    events.clear()
    items = [b.enqueue(row(i)) for i in (1, 2, 3)]
    for i, item in zip((1, 2, 3), items, strict=True):
        watch(item.future, i)
    await asyncio.sleep(0.05)
    assert events[0] == "run 3" and events[-1] == "written 9", events
    second = events.index("run 2")
    assert {"written 1", "written 2", "written 3"} <= set(events[:second]), events


async def test_on_one_cpu_requests_left_waiting_keep_their_queue_timeout():
    """Dispatch waits for the end of the turn; a request that then still waits (its batcher's
    instance is busy) gets its timer and times out like any other."""
    model = FakeModel()
    model.gate.clear()  # the first, unmeasured run holds the only instance
    b = make(model, max_batch_size=8, one_cpu_ns=10**9, timeout_ms=50)
    first = asyncio.ensure_future(b.submit(row(0)))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueTimeout):
        await b.submit(row(1))
    model.gate.set()
    await first


async def test_on_one_cpu_a_long_queue_drains_without_recursion():
    """Each batch on the loop is followed by the next through the loop, not by a nested call:
    thousands of queued one-row batches (a model without merging) all finish."""
    model = FakeModel()
    b = make(model, max_batch_size=1, one_cpu_ns=10**9, max_queue_size=5000)
    await b.submit(row(0))
    results = await asyncio.gather(*(b.submit(row(i)) for i in range(3000)))
    assert len(results) == 3000 and model.calls == [1] * 3001
    assert model.where.count("MainThread") == 3000
