"""What the workers of `--workers` share: files in the supervisor's state folder.

The folder (`Settings.worker_state_dir`, made by service/workers.py for one run) holds:

- `workers.json`, the roster that the supervisor writes: one pid per worker slot (null while a
  slot's worker is being restarted);
- `worker-<pid>.json`, each worker's own state, rewritten when it changes: whether it is ready
  (and why not) and how far it has applied the desired state;
- `desired.json`, explicit model control shared by all. A load or unload through the API is
  applied in the worker that received it, then recorded there as the model's wanted state with
  the next sequence number (under `desired.lock`, written whole); the call returns once every
  live worker has applied it (503 after `APPLY_WAIT_S`). Every worker follows the file (a stat
  every `FOLLOW_S`) and a restarted worker applies it at start-up, so whichever worker a
  request reaches serves the same models. Poll mode needs none of this: each worker polls the
  repository itself;
- `stats-<pid>.json`, each worker's Triton statistics (`GET .../stats`), rewritten every
  `FOLLOW_S` while they change: the worker answering a statistics request adds the others' to
  its own (theirs at most `FOLLOW_S` old);
- `metrics/`, prometheus_client's multiprocess folder (service/metrics.py).

The server is ready when every worker in the roster is (`Follower.problems`). Nothing here runs
in a single process (`follow` returns None).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import ServeError, Unavailable
from service.stats import triton_entries

if TYPE_CHECKING:
    from service.config import Settings
    from service.repository import LoadedModel, Repository

log = logging.getLogger(__name__)

ROSTER = "workers.json"
DESIRED = "desired.json"
DESIRED_LOCK = "desired.lock"
METRICS = "metrics"
#: prometheus_client's multiprocess switch: the supervisor sets it to `<folder>/metrics`.
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LOAD, UNLOAD = "load", "unload"
#: How often a worker looks at the desired state and republishes its own state and gauges.
FOLLOW_S = 0.25
#: How long a load or unload through the API waits for the other workers to apply it.
APPLY_WAIT_S = 120.0
_WAIT_POLL_S = 0.05


def worker_file(folder: Path, pid: int) -> Path:
    """A worker's own state file."""
    return folder / f"worker-{pid}.json"


def stats_file(folder: Path, pid: int) -> Path:
    """A worker's Triton statistics."""
    return folder / f"stats-{pid}.json"


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is absent or unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def write_json(path: Path, doc: Any) -> None:
    """Replace `path` with `doc` at once (readers see the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(json.dumps(doc).encode())
    os.replace(tmp, path)


def read_roster(folder: Path) -> list[int | None]:
    """The pid of each worker slot (None: being restarted); [] before the supervisor wrote it."""
    doc = read_json(folder / ROSTER)
    return list(doc["workers"]) if isinstance(doc, dict) else []


def write_roster(folder: Path, pids: list[int | None]) -> None:
    """The supervisor's roster (see the module docstring)."""
    write_json(folder / ROSTER, {"workers": pids})


@contextlib.contextmanager
def flock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if absent) for the block."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def try_lock(path: Path) -> int | None:
    """An exclusive flock on `path` if it is free now: its fd (closing it, or the process
    ending, releases the lock); None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


class Follower:
    """One worker's side: follows the desired state, publishes its readiness and gauges,
    applies the load/unload API for all workers, and answers for the others' readiness."""

    def __init__(self, folder: Path, repository: Repository) -> None:
        self.folder = folder
        self.repository = repository
        self.pid = os.getpid()
        self._applied: dict[str, int] = {}  # per model: the sequence number applied here
        self._seen = 0  # the desired state's sequence number fully applied here
        self._stamp: tuple[int, int] | None = None
        self._published: dict[str, Any] | None = None
        self._stats_published: tuple | None = None
        self._applying = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._stats_task: asyncio.Task | None = None

    # -- life -----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Apply the desired state (a restarted worker catches up), publish, then follow."""
        await self._sync(starting=True)
        self._publish()
        await self._publish_stats()  # replaces any file a past worker with this pid left
        self._task = asyncio.create_task(self._follow(), name="worker-state")
        self._stats_task = asyncio.create_task(self._report(), name="worker-stats")

    async def stop(self) -> None:
        for task in (self._task, self._stats_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                await self._sync()
                self._publish()
                self.repository.metrics.publish()
            except Exception:  # following must never stop
                log.exception("following the workers' shared state failed")

    # -- the desired state ----------------------------------------------------------------------
    async def _sync(self, starting: bool = False) -> None:
        """Apply what the desired state asks and this worker has not applied yet, in order.
        At start-up a load of a model already loaded (from disk, just now) is skipped."""
        path = self.folder / DESIRED
        stamp = _stamp(path)
        if stamp is None or stamp == self._stamp:
            return
        self._stamp = stamp
        doc = read_json(path)
        if not isinstance(doc, dict):
            return
        async with self._applying:
            entries = sorted(doc["models"].items(), key=lambda item: item[1]["seq"])
            for name, entry in entries:
                if entry["seq"] <= self._applied.get(name, 0):
                    continue
                self._applied[name] = entry["seq"]
                if starting and entry["action"] == LOAD and name in self.repository.loaded:
                    continue
                try:
                    await self._apply(name, entry["action"])
                except ServeError as exc:
                    log.error("shared %s of model %s failed here: %s", entry["action"], name, exc)
            self._seen = max(self._seen, doc["seq"])

    async def _apply(self, name: str, action: str) -> list[LoadedModel]:
        if action == LOAD:
            return await self.repository.load(name)
        await self.repository.unload(name)
        return []

    def _record(self, name: str, action: str) -> int:
        """Record `action` as `name`'s wanted state; its sequence number."""
        with flock(self.folder / DESIRED_LOCK):
            doc = read_json(self.folder / DESIRED) or {"seq": 0, "models": {}}
            doc["seq"] += 1
            doc["models"][name] = {"action": action, "seq": doc["seq"]}
            write_json(self.folder / DESIRED, doc)
        return int(doc["seq"])

    async def load(self, name: str) -> list[LoadedModel]:
        """The load API for every worker: load here, record, wait for the others."""
        return await self._everywhere(name, LOAD)

    async def unload(self, name: str) -> None:
        """The unload API for every worker: unload here, record, wait for the others."""
        await self._everywhere(name, UNLOAD)

    async def _everywhere(self, name: str, action: str) -> list[LoadedModel]:
        async with self._applying:
            loaded = await self._apply(name, action)  # an error here records nothing
            self._applied[name] = seq = self._record(name, action)
        await self._wait_for_workers(seq, f"{action} of model '{name}'")
        return loaded

    async def _wait_for_workers(self, seq: int, what: str) -> None:
        deadline = time.monotonic() + APPLY_WAIT_S
        while True:
            behind = [
                slot
                for slot, _, state in self._others(worker_file)
                if not isinstance(state, dict) or state.get("applied", 0) < seq
            ]
            if not behind:
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"the {what} is done in this worker, but worker(s) {behind} did not apply "
                    f"it within {APPLY_WAIT_S:g} s (see the server log)"
                )
            await asyncio.sleep(_WAIT_POLL_S)

    # -- readiness ------------------------------------------------------------------------------
    def _publish(self) -> None:
        ready = self.repository.all_ready()
        problems = [] if ready else (self.repository.problems() or ["models are loading"])
        doc = {"pid": self.pid, "ready": ready, "problems": problems, "applied": self._seen}
        if doc != self._published:
            write_json(worker_file(self.folder, self.pid), doc)
            self._published = doc

    async def _report(self) -> None:
        """Publish the statistics every FOLLOW_S, also while a model load holds `_follow`."""
        while True:
            await asyncio.sleep(FOLLOW_S)
            try:
                await self._publish_stats()
            except Exception:  # reporting must never stop
                log.exception("publishing this worker's statistics failed")

    async def _publish_stats(self) -> None:
        """Write this worker's Triton statistics if any counter moved since the last write
        (read on the loop, where they are counted; written from a thread)."""
        loaded = self.repository.models()
        moved = tuple(
            (m.name, m.version, m.stats.success.count, m.stats.fail.count, m.stats.execution_count)
            for m in loaded
        )
        if moved != self._stats_published:
            path = stats_file(self.folder, self.pid)
            doc = {"model_stats": triton_entries(loaded)}
            await asyncio.to_thread(write_json, path, doc)
            self._stats_published = moved

    def others_stats(self) -> list[dict[str, Any]]:
        """The other live workers' Triton statistics entries, as last published."""
        entries: list[dict[str, Any]] = []
        for _, _, doc in self._others(stats_file):
            if isinstance(doc, dict):
                entries += doc.get("model_stats", [])
        return entries

    def _others(
        self, file_of: Callable[[Path, int], Path], roster: list[int | None] | None = None
    ) -> Iterator[tuple[int, int | None, Any]]:
        """Each other worker's slot (from 1), pid (None: restarting) and `file_of` content."""
        for slot, pid in enumerate(read_roster(self.folder) if roster is None else roster, 1):
            if pid != self.pid:
                yield slot, pid, read_json(file_of(self.folder, pid)) if pid else None

    def problems(self) -> list[str]:
        """Why the other workers are not ready ([] when they all are)."""
        roster = read_roster(self.folder)
        if not roster:
            return ["workers are starting"]
        found = []
        for slot, pid, state in self._others(worker_file, roster):
            if pid is None:
                found.append(f"worker {slot}: restarting")
            elif not isinstance(state, dict):
                found.append(f"worker {slot}: starting")
            elif not state["ready"]:
                found += [f"worker {slot}: {p}" for p in state["problems"]]
        return found


async def follow(settings: Settings, repository: Repository) -> Follower | None:
    """A worker of `--workers`: start following the shared state; None in a single process."""
    if settings.worker_state_dir is None:
        return None
    follower = Follower(settings.worker_state_dir, repository)
    await follower.start()
    return follower


async def unfollow(follower: Follower | None) -> None:
    """Stop following (at shutdown)."""
    if follower is not None:
        await follower.stop()
