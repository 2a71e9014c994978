"""Per-model dynamic batcher: merges requests along the batch axis and runs them off the loop.

Contract for `run`: given a dict of input arrays whose first axis holds N rows, return a dict of
output arrays whose first axis holds the same N rows in the same order. `run` executes in a
worker thread of `executor` (ONNX Runtime releases the GIL), with two exceptions. At light load,
a lone one-row request runs on the event loop itself when that input shape's one-row runs take
under `inline_ns` (the median of its last runs, so that one slow run, a page fault or a busy
neighbour, does not send the next ones to the thread; the two thread hops cost more than a run
that small: the loop is held no longer than one request's parsing holds it). Only when nothing
else is queued or in flight, the last batch was a lone request too, and no batch started earlier
in the same turn of the loop: under load, requests that arrive together (one turn's reads) go to
the thread and merge, and merged batches keep the next ones off the loop, so batching is never
traded away.

And on a process that may run on one CPU only (`one_cpu_ns`, set by the caller from the process's
CPU affinity), no thread can run beside the loop, so a worker thread buys no parallelism; its
hops cost context switches, GIL hand-overs and cold caches (~8 futex calls a batch). There every
batch expected to run under `one_cpu_ns` (its rows times the median time a row of that shape
took in its last runs) runs on the loop, at any load. Batches still form: a request queued there
is dispatched at the end of the loop's turn, with every other that turn's reads queued, and
after a batch the next is dispatched only once the finished batch's answers have gone out (two
turns: their callbacks, then the transports' end-of-turn writes), so the loop reads and answers
between batches.

Neither rule applies to a model without a batch axis (its requests' sizes are not known by their
shape key) or on a GPU (the caller leaves `inline_ns` and `one_cpu_ns` at 0: a CUDA session sets
up per thread).

Dispatch rule: a batch leaves as soon as an instance is free and either nothing else is in flight
(an idle batcher runs a lone request at once), `max_batch_size` rows are waiting, or the oldest
request has waited `max_queue_delay_ms`. Only requests whose inputs agree in name, dtype and
non-batch shape are merged; online requests go before background (batch-job) work. With
`max_batch_size` 0 (a model without a batch axis) every request runs alone and its outputs are
returned whole.

There is no dispatcher task: `submit` and each finished batch call `_pump`, which starts what can
start. At low load a request reaches its worker thread without a hop through another task.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

import numpy as np

from service.errors import Cancelled, QueueFull, QueueTimeout, Unavailable

Arrays = dict[str, np.ndarray]
ONLINE, BACKGROUND = 0, 1
#: A deadline passed by less than this is not "late": a request given a tiny timeout that is
#: dispatched in its own `submit` runs (it never waited).
LATE_S = 0.001
MAX_SHAPES = 64
RECENT_RUNS = 9  # runs of a shape its median is taken over


@dataclass(slots=True)
class BatchResult:
    """One request's rows of the outputs, and where its time went."""

    outputs: Arrays
    batch_size: int
    queue_s: float
    compute_s: float


@dataclass(slots=True, eq=False)
class Pending:
    """A request waiting for its batch."""

    inputs: Arrays
    rows: int
    key: tuple
    future: asyncio.Future
    enqueued: float
    deadline: float
    gone: Callable[[], bool] | None = None
    taken: bool = False
    timer: asyncio.TimerHandle | None = None  # its queue timeout, while it waits


def _timed_out(item: Pending) -> QueueTimeout:
    waited_ms = (item.deadline - item.enqueued) * 1000
    return QueueTimeout(f"request waited over {waited_ms:.0f} ms in the queue and was not run")


class Reservation:
    """A queue slot held for one waiter that `wait_for_room` woke: its next request is admitted
    even while the queue looks full to everyone else. Used by `admit`, or given back."""

    __slots__ = ("batcher", "open")

    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.open = True
        batcher._reserved += 1

    def take(self, batcher: Batcher) -> bool:
        """Use the slot for a request to `batcher` (False: it is for another batcher, or used)."""
        return batcher is self.batcher and self.close()

    def release(self) -> None:
        """Give the slot back unused: room for the next waiter."""
        if self.close():
            self.batcher._offer_room()

    def close(self) -> bool:
        """Free the slot (False: it was freed already)."""
        if not self.open:
            return False
        self.open = False
        self.batcher._reserved -= 1
        return True


#: Called when a queue has room: given a Reservation (None: the batcher closed), True if kept.
RoomWaiter = Callable[["Reservation | None"], bool]


def _untime(item: Pending) -> None:
    if item.timer is not None:
        item.timer.cancel()
        item.timer = None


def batch_key(inputs: Arrays) -> tuple:
    """Requests may share a batch only if their inputs agree in name, dtype and non-batch shape."""
    return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


@dataclass
class Batcher:
    """Dynamic batcher over one model version (see the module docstring for the rules)."""

    run: Callable[[Arrays], Arrays]
    executor: Executor
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024
    timeout_ms: float = 10_000.0
    instances: int = 1
    #: After each batch: (requests, rows, input ns, infer ns, output ns) - the time to join the
    #: inputs, to run, and to split the outputs.
    on_batch: Callable[[int, int, int, int, int], None] | None = None
    #: A lone one-row request on an idle batcher runs on the loop when its shape's one-row runs
    #: take under this many ns, by their median (0: never; see the module docstring).
    inline_ns: int = 0
    #: On a process confined to one CPU: a batch expected to run under this many ns runs on the
    #: loop at any load (0: never; see the module docstring).
    one_cpu_ns: int = 0

    def __post_init__(self) -> None:
        self._queues: tuple[deque[Pending], deque[Pending]] = (deque(), deque())  # online, jobs
        self._inflight = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fill_timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._reserved = 0  # slots held by Reservations
        self._room_waiters: deque[RoomWaiter] = deque()
        self._one_cpu = self.one_cpu_ns > 0 and self.max_batch_size > 0
        self._inlining = self._one_cpu or (self.inline_ns > 0 and self.max_batch_size > 0)
        # batch key -> its recent one-row run times (on one CPU: every run's time per row)
        self._runs: dict[tuple, deque[int]] = {}
        self._pump_due = False  # one-CPU: a pump is scheduled for the end of this turn
        self._fresh: list[Pending] = []  # one-CPU: queued since that pump was scheduled
        self._held = False  # one-CPU: a batch's answers are not out yet; no pump until they are
        self._last_batch = 0  # requests in the batch launched last
        self._launched_this_turn = False  # a batch started in this turn of the event loop

    @property
    def depth(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queues[0]) + len(self._queues[1])

    def start(self) -> None:
        """Bind to the running event loop."""
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Refuse new work, finish everything accepted, then return."""
        self._closed = True
        self._pump()
        await self._idle.wait()

    def admit(self, reservation: Reservation | None = None) -> None:
        """Raise what `submit` would refuse with now (closing, or a full queue): cheap, so a
        request can be refused before its body is read. A `reservation` for this batcher is
        used up instead (the slot was held for it)."""
        if self._closed:
            raise Unavailable("model is being unloaded; retry shortly")
        if reservation is not None and reservation.take(self):
            return
        if self.depth + self._reserved >= self.max_queue_size:
            raise QueueFull(
                f"queue is full ({self.max_queue_size} requests waiting); retry later", room=self
            )

    def wait_for_room(self, waiter: RoomWaiter) -> None:
        """Call `waiter` (oldest first) with a Reservation once the queue has room for it; it
        returns False to give the slot back at once (the HTTP protocol's refused connections
        wait here instead of re-sending into a full queue)."""
        self._room_waiters.append(waiter)
        self._offer_room()

    def _offer_room(self) -> None:
        waiters = self._room_waiters
        while waiters and (self._closed or self.depth + self._reserved < self.max_queue_size):
            waiter = waiters.popleft()
            if self._closed:
                waiter(None)
                continue
            reservation = Reservation(self)
            if not waiter(reservation):
                reservation.close()  # not kept: offer it to the next waiter

    async def submit(
        self,
        inputs: Arrays,
        priority: int = ONLINE,
        timeout_ms: float | None = None,
        gone: Callable[[], bool] | None = None,
    ) -> BatchResult:
        """Queue one request and wait for its rows; QueueFull, QueueTimeout or Unavailable.

        `gone()` is asked just before the request would join a batch: True (the client went
        away) drops it uncomputed with Cancelled.
        """
        item = self.enqueue(inputs, priority, timeout_ms, gone)
        try:
            return await item.future
        except asyncio.CancelledError:  # the caller gave up: never run it if still queued
            self.cancel(item)
            raise

    def enqueue(
        self,
        inputs: Arrays,
        priority: int = ONLINE,
        timeout_ms: float | None = None,
        gone: Callable[[], bool] | None = None,
    ) -> Pending:
        """`submit` without a coroutine: queue one request; its `future` gets the BatchResult
        (or the error). For callers that answer from a callback (the HTTP protocol's lane)."""
        self.admit()
        loop = self._loop
        assert loop is not None, "Batcher.start() was not called"
        rows = next(iter(inputs.values())).shape[0] if self.max_batch_size else 1
        now = time.perf_counter()
        timeout_s = (timeout_ms if timeout_ms is not None else self.timeout_ms) / 1000
        item = Pending(inputs, rows, batch_key(inputs), loop.create_future(), now, now + timeout_s,
                       gone)  # fmt: skip
        self._queues[priority].append(item)
        self._idle.clear()
        if self._one_cpu:  # dispatched with the rest of this turn's requests
            self._fresh.append(item)
            self._pump_soon()
            return item
        self._pump()
        if not item.taken:  # dispatched at once needs no timer
            item.timer = loop.call_later(timeout_s, self._expire, item)
        return item

    def _pump_soon(self) -> None:
        """One-CPU: pump at the end of this turn of the loop (once however many requests came)."""
        if not self._pump_due:
            self._pump_due = True
            assert self._loop is not None
            self._loop.call_soon(self._pump_due_now)

    def _pump_due_now(self) -> None:
        self._pump_due = False
        try:
            if not self._held:
                self._pump()
        finally:
            fresh, self._fresh = self._fresh, []
            loop, now = self._loop, time.perf_counter()
            assert loop is not None
            for item in fresh:  # still waiting: now it needs its queue-timeout timer
                if not item.taken and not item.future.done():
                    item.timer = loop.call_later(item.deadline - now, self._expire, item)

    def cancel(self, item: Pending) -> None:
        """Take back a request that is still queued: it is never run."""
        if not item.taken:
            self._drop(item)
            if not item.future.done():
                item.future.cancel()

    def _expire(self, item: Pending) -> None:
        """Timer: a request still queued at its deadline gets 504 and is never run."""
        item.timer = None
        if not item.taken and not item.future.done():
            self._drop(item)
            item.future.set_exception(_timed_out(item))

    def _drop(self, item: Pending) -> None:
        _untime(item)
        for queue in self._queues:
            try:
                queue.remove(item)
                break
            except ValueError:
                continue
        self._settle_idle()
        if self._room_waiters:
            self._offer_room()

    def _settle_idle(self) -> None:
        if not self._inflight and not self.depth:
            self._idle.set()

    def _waiting_rows(self) -> int:
        return sum(p.rows for q in self._queues for p in q)

    def _pump(self) -> None:
        """Start every batch that may start now (see the dispatch rule)."""
        while self._inflight < self.instances and self.depth:
            if self._inflight and self.max_queue_delay_ms > 0 and not self._closed:
                wait = self._fill_deadline() - time.perf_counter()
                if wait > 0 and self._waiting_rows() < self.max_batch_size:
                    self._fill_later(wait)
                    return
            batch = self._take()
            if batch and self._launch(batch) and self._one_cpu:
                break  # ran on the loop: the next once its answers are out (`_next_batch`)
        self._settle_idle()
        if self._room_waiters:
            self._offer_room()

    def _fill_deadline(self) -> float:
        """When the oldest waiting request will have waited max_queue_delay_ms."""
        return min(q[0].enqueued for q in self._queues if q) + self.max_queue_delay_ms / 1000

    def _fill_later(self, wait: float) -> None:
        """Pump again once the oldest waiting request has waited max_queue_delay_ms."""
        if self._fill_timer is not None:
            return

        def fire() -> None:
            self._fill_timer = None
            self._pump()

        assert self._loop is not None
        self._fill_timer = self._loop.call_later(wait, fire)

    def _take(self) -> list[Pending]:
        """Pop the oldest live request and every later one that fits beside it."""
        now = time.perf_counter()
        batch: list[Pending] = []
        rows, key = 0, None
        for queue in self._queues:
            kept: deque[Pending] = deque()
            while queue:
                item = queue.popleft()
                if item.future.done():  # cancelled or timed out while queued
                    _untime(item)
                    continue
                if now > item.deadline + LATE_S:  # its timer is late: same answer
                    _untime(item)
                    item.future.set_exception(_timed_out(item))
                    continue
                if item.gone is not None and item.gone():
                    _untime(item)
                    item.future.set_exception(Cancelled("client disconnected before compute"))
                    continue
                if key is None:  # the head always goes, even when larger than a batch
                    key, rows = item.key, item.rows
                    batch.append(item)
                elif item.key == key and rows + item.rows <= self.max_batch_size:
                    rows += item.rows
                    batch.append(item)
                else:
                    kept.append(item)
                if rows >= self.max_batch_size:
                    break
            kept.extend(queue)
            queue.clear()
            queue.extend(kept)
        for item in batch:
            item.taken = True
            _untime(item)
        return batch

    def _launch(self, batch: list[Pending]) -> bool:
        """Run one batch in a worker thread, `_finish` picking it up on the loop, or on the loop
        itself (True; see `_inline`)."""
        loop = self._loop
        assert loop is not None
        start = time.perf_counter()
        try:
            if len(batch) == 1:
                inputs = batch[0].inputs
            else:
                inputs = {n: np.concatenate([p.inputs[n] for p in batch]) for n in batch[0].inputs}
            input_ns = int((time.perf_counter() - start) * 1e9)
            inline = self._inlining and self._inline(batch)
            if self._inlining and not self._one_cpu:
                self._note_launch(len(batch))
            if inline:
                self._inflight += 1
                self._finish(batch, start, input_ns, self._run_here(inputs))
                return True
            work = self.executor.submit(self._timed_run, inputs)
        except Exception as exc:  # nothing was started: every caller of the batch learns why
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return False
        self._inflight += 1
        work.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._finish, batch, start, input_ns, done)
        )
        return False

    def _inline(self, batch: list[Pending]) -> bool:
        """Whether this batch runs on the loop (see the module docstring)."""
        runs = self._runs.get(batch[0].key)
        if runs is None:  # a shape never run: the thread, to measure it
            return False
        median = sorted(runs)[len(runs) // 2]
        if self._one_cpu:  # an estimate: a run's fixed cost makes it high for large batches
            return median * sum(p.rows for p in batch) < self.one_cpu_ns
        if self._inflight or self.depth or self._launched_this_turn or self._last_batch != 1:
            return False
        return len(batch) == 1 and batch[0].rows == 1 and median < self.inline_ns

    def _note_launch(self, requests: int) -> None:
        self._last_batch = requests
        if not self._launched_this_turn:
            self._launched_this_turn = True
            assert self._loop is not None
            self._loop.call_soon(self._new_turn)

    def _new_turn(self) -> None:
        self._launched_this_turn = False

    def _run_here(self, inputs: Arrays) -> Future:
        """`_timed_run` on this thread, its outcome in a finished Future (as a worker's)."""
        done: Future = Future()
        try:
            done.set_result(self._timed_run(inputs))
        except Exception as exc:
            done.set_exception(exc)
        return done

    def _timed_run(self, inputs: Arrays) -> tuple[Arrays, int]:
        start = time.perf_counter_ns()
        outputs = self.run(inputs)
        return outputs, time.perf_counter_ns() - start

    def _finish(self, batch: list[Pending], start: float, input_ns: int, done: Future) -> None:
        self._inflight -= 1
        compute = time.perf_counter() - start
        rows = sum(p.rows for p in batch)
        try:
            outputs, infer_ns = done.result()
            bad = {n: a.shape[:1] for n, a in outputs.items() if a.ndim == 0 or a.shape[0] != rows}
            if bad and self.max_batch_size:
                raise RuntimeError(
                    f"model returned {bad} rows for a batch of {rows}: outputs must keep the "
                    "batch axis first, one row per input row, in order"
                )
        except Exception as exc:  # every caller of this batch learns of the failure
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            self._next_batch()
            return
        if self._one_cpu:
            self._measure(batch[0].key, infer_ns // max(rows, 1))
        elif rows == 1 and self._inlining:
            self._measure(batch[0].key, infer_ns)
        split = time.perf_counter()
        offset = 0
        for item in batch:
            if self.max_batch_size:
                part = {n: a[offset : offset + item.rows] for n, a in outputs.items()}
            else:
                part = outputs
            offset += item.rows
            if not item.future.done():
                item.future.set_result(BatchResult(part, rows, start - item.enqueued, compute))
        if self.on_batch:
            output_ns = int((time.perf_counter() - split) * 1e9)
            self.on_batch(len(batch), rows, input_ns, infer_ns, output_ns)
        self._next_batch()

    def _next_batch(self) -> None:
        """After a batch: start what can start; on one CPU, two turns later, once the batch's
        answers are out (their callbacks run in the next turn, and the transports write at the
        end of that), whatever is queued meanwhile."""
        if self._one_cpu:
            self._held = True
            assert self._loop is not None
            self._loop.call_soon(self._loop.call_soon, self._release)
        else:
            self._pump()

    def _release(self) -> None:
        self._held = False
        self._pump()

    def _measure(self, key: tuple, ns: int) -> None:
        """Note a run's time (the last few per shape, for `_inline`'s median; a few dozen
        shapes kept)."""
        runs = self._runs.get(key)
        if runs is None:
            if len(self._runs) >= MAX_SHAPES:
                return
            runs = self._runs[key] = deque(maxlen=RECENT_RUNS)
        runs.append(ns)
