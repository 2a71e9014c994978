"""Batch-scoring jobs inside the server: files under `jobs_root` scored through the batcher.

A job is the CLI's scoring loop (same reader, part files and manifest) with an `infer` that
submits work to the model's batcher as BACKGROUND, in pieces of at most `max_batch_size` rows with
two in flight, so an online request never waits behind a large job batch. Jobs run one at a time
(`jobs_concurrency`); their records live in `<jobs_root>/.onnxserve-jobs/<id>.json`, so a job that
was queued or running when the server stopped resumes from its manifest when it starts again.

With `--workers N` (a worker state folder is set) the workers share the records and run each
job once: a worker runs a job only while it holds the job's flock (`<id>.lock`) and one of
`jobs_concurrency` slot flocks (`slot-<k>.lock`), so the limit is the server's, not each
worker's. The worker that receives a job claims it at once if a slot is free; every worker
scans the live records every `SCAN_S` and claims those whose lock is free, oldest first: a
queued job waiting for a slot, or a running job whose worker died (the kernel released its
lock), which then resumes from its manifest. The owner saves the record after every chunk, and
`/v1/jobs` reads the records from disk, so every worker answers the same. A cancel that reaches
another worker leaves a marker (`<id>.cancel`) that the owner acts on within `SCAN_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from service.batcher import BACKGROUND
from service.config import Settings
from service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    QueueFull,
    QueueTimeout,
    ServeError,
    Unavailable,
)
from service.repository import LoadedModel, Repository
from service.runtime import ModelRunError
from service.scoring.engine import Arrays, BadInput, Infer, run
from service.scoring.plan import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_ROWS, Plan, prepare
from service.scoring.writer import TMP_PREFIX, Manifest, write_atomic
from service.security import ANONYMOUS_CALLER, Caller
from service.workerstate import flock, try_lock

log = logging.getLogger(__name__)
STATE_DIR = ".onnxserve-jobs"
NAME_MAX, PATH_MAX = 255, 4096  # bytes per path component, characters per path (Linux)
IN_FLIGHT = 2  # batcher pieces per job at once
RETRIES = 100  # a busy queue refuses background work: wait and retry, this many times in a row
SCAN_S = 0.5  # --workers: how often a worker looks for jobs to claim and cancel markers
CANCEL_WAIT_S = 10.0  # --workers: how long a cancel waits for another worker's job to stop


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


LIVE = (JobState.QUEUED, JobState.RUNNING)


class JobSpec(BaseModel):
    """A job to run: paths are on the server, relative to `jobs_root` or absolute inside it."""

    model: str
    input: str
    output: str
    version: str | None = None
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    chunk_rows: int = Field(default=DEFAULT_CHUNK_ROWS, ge=1)
    column: list[str] | None = None
    max_error_ratio: float | None = Field(default=None, ge=0, le=1)


class Job(JobSpec):
    """A job's record and progress."""

    id: str
    state: JobState = JobState.QUEUED
    resolved_version: int = 0
    piece_rows: int = 0
    created: float = Field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    total_rows: int = 0
    owner: str | None = None  # the submitting key's name (None: anonymous)
    rows_done: int = 0
    scored: int = 0
    errors: int = 0
    rows_per_s: float = 0.0
    error: str | None = None


class JobManager:
    """Jobs of one server: submit, list, cancel, resume after a restart."""

    def __init__(self, settings: Settings, repository: Repository) -> None:
        self.root = settings.jobs_root.resolve() if settings.jobs_root else None
        self.repository = repository
        self.jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots = asyncio.Semaphore(settings.jobs_concurrency)
        self._stopping = False
        # --workers: records shared on disk, jobs claimed through locks (module docstring)
        self.shared = settings.worker_state_dir is not None
        self._concurrency = settings.jobs_concurrency
        self._held: dict[str, tuple[int, int]] = {}  # job id -> (job lock, slot lock) fds
        self._scanner: asyncio.Task | None = None
        self._finished: set[str] = set()  # ids of records seen in a final state

    # -- paths and records -------------------------------------------------------------------
    def _inside(self, given: str, what: str) -> Path:
        if self.root is None:
            raise Forbidden(
                "batch jobs are disabled on this server: start it with --jobs-root DIR (or "
                "ONNXSERVE_JOBS_ROOT=DIR), the folder that jobs may read and write"
            )
        path = Path(given)
        too_long = [p for p in path.parts if len(p.encode(errors="replace")) > NAME_MAX]
        if too_long or len(given) > PATH_MAX:
            raise BadRequest(f"{what}: a path component or the path is too long")
        try:
            resolved = (path if path.is_absolute() else self.root / path).resolve()
        except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
            raise BadRequest(
                f"{what} {given!r} is not a usable path: {type(exc).__name__}"
            ) from None
        if not resolved.is_relative_to(self.root) or resolved.is_relative_to(self.state_dir):
            raise Forbidden(f"{what} {given!r} is outside the jobs root")
        return resolved

    def _relative(self, message: str) -> str:
        """`message` with the jobs root's absolute path taken out."""
        return message.replace(f"{self.root}/", "").replace(str(self.root), "<jobs root>")

    @property
    def state_dir(self) -> Path:
        assert self.root is not None
        return self.root / STATE_DIR

    def _save(self, job: Job) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_dir / f"{job.id}.json", job.model_dump_json(indent=2).encode())

    def _record(self, job_id: str) -> Job | None:
        """A job's record on disk (None: absent or unreadable)."""
        try:
            return Job.model_validate_json((self.state_dir / f"{job_id}.json").read_bytes())
        except (OSError, ValueError):
            return None

    def _records(self) -> list[Job]:
        """Every readable record on disk (--workers: the jobs of all workers)."""
        if self.root is None or not self.state_dir.is_dir():
            return []
        found = []
        for path in self.state_dir.glob("*.json"):
            if not path.name.startswith(TMP_PREFIX):
                job = self._record(path.stem)
                if job is not None:
                    found.append(job)
        return found

    def _plan(self, job: Job) -> Plan:
        model = self.repository.get(job.model, str(job.resolved_version))
        return prepare(
            model.config, model.version, self._inside(job.input, "input"),
            self._inside(job.output, "output"), engine="server", batch_size=job.piece_rows,
            chunk_rows=job.chunk_rows, columns=job.column, root=self.root,
        )  # fmt: skip

    # -- the API's verbs ----------------------------------------------------------------------
    async def submit(self, spec: JobSpec, caller: Caller = ANONYMOUS_CALLER) -> Job:
        """Check a job (paths, model, input, output) and queue it; 403/404/400 otherwise."""
        output = self._inside(spec.output, "output")
        self._inside(spec.input, "input")
        model = self.repository.get(spec.model, spec.version)
        job = Job(
            **spec.model_dump(),
            id=uuid.uuid4().hex[:12],
            owner=caller.name,
            resolved_version=model.version,
            piece_rows=min(spec.batch_size, model.batching.max_batch_size or spec.batch_size),
        )
        try:
            plan = await asyncio.to_thread(self._plan, job)
        except ServeError as exc:  # errors name paths relative to the jobs root only
            exc.message = self._relative(exc.message)
            raise
        job.total_rows = plan.reader.rows
        if self.shared:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with flock(self.state_dir / "submit.lock"):  # two workers cannot both pass
                self._queue(job, output, self._records())
            self._claim(job.id)
            return job
        self._queue(job, output, list(self.jobs.values()))
        self._start(job)
        return job

    def _queue(self, job: Job, output: Path, known: list[Job]) -> None:
        busy = [j.id for j in known if j.state in LIVE
                and self._inside(j.output, "output") == output]  # fmt: skip
        if busy:  # checked after the await, so two submits cannot both pass
            raise Conflict(f"job {busy[0]} is writing to {job.output!r}; cancel it or wait")
        self._save(job)

    def get(self, job_id: str, caller: Caller = ANONYMOUS_CALLER) -> Job:
        """A job by id (404 if unknown, or if it is another caller's and `caller` is no admin)."""
        job = self._record(job_id) if self.shared and self.root else self.jobs.get(job_id)
        if job is None or not (caller.admin or job.owner == caller.name):
            raise NotFound(f"no job '{job_id}'")
        return job

    def all(self, caller: Caller = ANONYMOUS_CALLER) -> list[Job]:
        """The jobs `caller` may see (an admin sees every job), oldest first."""
        known = self._records() if self.shared else list(self.jobs.values())
        mine = [j for j in known if caller.admin or j.owner == caller.name]
        return sorted(mine, key=lambda j: j.created)

    async def cancel(self, job_id: str, caller: Caller = ANONYMOUS_CALLER) -> Job:
        """Stop a queued or running job (committed chunks stay; resubmitting resumes)."""
        job = self.get(job_id, caller)
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
            return self.jobs[job_id]
        if self.shared and job.state in LIVE:
            return await self._cancel_elsewhere(job)
        return job

    async def _cancel_elsewhere(self, job: Job) -> Job:
        """--workers: cancel a job that this worker does not run (marker, or its lock)."""
        (self.state_dir / f"{job.id}.cancel").touch()
        deadline = time.monotonic() + CANCEL_WAIT_S
        while time.monotonic() < deadline:
            fd = try_lock(self.state_dir / f"{job.id}.lock")
            if fd is not None:  # nobody runs it: cancel it here
                try:
                    current = self._record(job.id) or job
                    if current.state in LIVE:
                        current.state, current.finished = JobState.CANCELLED, time.time()
                        self._save(current)
                    (self.state_dir / f"{job.id}.cancel").unlink(missing_ok=True)
                    return current
                finally:
                    os.close(fd)
            current = self._record(job.id) or job
            if current.state not in LIVE:
                return current
            await asyncio.sleep(0.05)
        return self._record(job.id) or job

    async def resume(self) -> None:
        """Load the records on disk and restart the jobs that were queued or running
        (--workers: scan for jobs to claim from now on)."""
        if self.shared and self.root is not None:
            self._scanner = asyncio.create_task(self._scan_forever(), name="jobs-scan")
            return
        if self.root is None or not self.state_dir.is_dir():
            return
        for path in sorted(self.state_dir.glob("[!_]*.json")):  # not the writer's _tmp- files
            try:
                job = Job.model_validate_json(path.read_bytes())
            except ValueError as exc:
                log.error("job record %s is unreadable: %s", path, exc)
                continue
            self.jobs[job.id] = job
            if job.state in LIVE:
                log.info("resuming job %s (%s on %s)", job.id, job.model, job.input)
                self._start(job)

    async def stop(self) -> None:
        """At shutdown: stop every job, leaving the live ones to resume at the next start."""
        self._stopping = True
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- claiming (--workers) ----------------------------------------------------------------
    async def _scan_forever(self) -> None:
        while True:
            try:
                self._scan()
            except Exception:  # a scan must never stop scanning
                log.exception("scanning the job records failed")
            await asyncio.sleep(SCAN_S)

    def _scan(self) -> None:
        """Cancel own jobs that have a marker; claim live jobs whose lock is free, oldest first."""
        for job_id, task in list(self._tasks.items()):
            if (self.state_dir / f"{job_id}.cancel").exists():
                task.cancel()
        live = sorted(self._live_records(), key=lambda j: j.created)
        for job in live:
            if job.id not in self._tasks and not self._stopping:
                self._claim(job.id)

    def _live_records(self) -> list[Job]:
        """The queued and running records (a finished record never changes: read once)."""
        live = []
        for path in self.state_dir.glob("*.json"):
            if path.stem in self._finished or path.name.startswith(TMP_PREFIX):
                continue
            job = self._record(path.stem)
            if job is not None and job.state in LIVE:
                live.append(job)
            elif job is not None:
                self._finished.add(job.id)
        return live

    def _claim(self, job_id: str) -> bool:
        """Run a live job here if its lock and a slot are free; whether it now runs here."""
        if job_id in self._tasks or self._stopping:
            return job_id in self._tasks
        lock = try_lock(self.state_dir / f"{job_id}.lock")
        if lock is None:
            return False
        job = self._record(job_id)  # read under the lock: the last owner's final word
        slot = None
        if job is not None and job.state in LIVE:
            locks = (try_lock(self.state_dir / f"slot-{k}.lock") for k in range(self._concurrency))
            slot = next((fd for fd in locks if fd is not None), None)
        marker = self.state_dir / f"{job_id}.cancel"
        if job is not None and slot is not None and marker.exists():  # cancelled while unowned
            job.state, job.finished = JobState.CANCELLED, time.time()
            self._save(job)
            marker.unlink(missing_ok=True)
        if job is None or slot is None or job.state not in LIVE:
            for fd in (lock, slot):
                if fd is not None:
                    os.close(fd)
            return False
        self._held[job_id] = (lock, slot)
        log.info("job %s runs in worker pid %d (%s on %s)", job_id, os.getpid(), job.model,
                 job.input)  # fmt: skip
        self._start(job)
        return True

    def _release(self, job_id: str) -> None:
        """After a job's task ends here: drop its cancel marker and let go of its locks."""
        held = self._held.pop(job_id, None)
        if held is not None:
            if not self._stopping:
                (self.state_dir / f"{job_id}.cancel").unlink(missing_ok=True)
            for fd in held:
                os.close(fd)

    # -- running ----------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
        self._tasks[job.id] = task

        def done(_: asyncio.Task) -> None:
            self._tasks.pop(job.id, None)
            self._release(job.id)

        task.add_done_callback(done)

    async def _run(self, job: Job) -> None:
        try:
            async with self._slots:
                job.state, job.started, job.error = JobState.RUNNING, time.time(), None
                self._save(job)
                await self._score(job)
        except asyncio.CancelledError:
            if not self._stopping:
                job.state = JobState.CANCELLED
                job.finished = time.time()
            self._save(job)
            return
        except ServeError as exc:
            job.state, job.error = JobState.FAILED, self._relative(exc.message)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            job.state, job.error = JobState.FAILED, self._relative(f"internal error: {exc}")
        job.finished = time.time()
        self._save(job)

    async def _score(self, job: Job) -> None:
        plan = await asyncio.to_thread(self._plan, job)
        began, resumed = time.perf_counter(), None

        def progress(m: Manifest) -> None:
            nonlocal resumed
            resumed = m.rows_done if resumed is None else resumed
            job.total_rows, job.rows_done, job.scored, job.errors = (
                m.total_rows,
                m.rows_done,
                m.scored,
                m.errors,
            )
            job.rows_per_s = round((m.rows_done - resumed) / (time.perf_counter() - began), 1)
            if self.shared:  # other workers answer from the record
                self._save(job)

        summary = await run(plan, self._infer(job), concurrency=IN_FLIGHT, progress=progress)
        job.rows_done, job.scored, job.errors = summary.rows, summary.scored, summary.errors
        job.rows_per_s = summary.rows_per_s
        if job.max_error_ratio is not None and summary.error_ratio > job.max_error_ratio:
            job.state = JobState.FAILED
            job.error = (
                f"error ratio {summary.error_ratio:.4f} exceeds max_error_ratio "
                f"{job.max_error_ratio} (bad rows in {summary.errors_file})"
            )
        else:
            job.state = JobState.SUCCEEDED

    def _infer(self, job: Job) -> Infer:
        """`infer` through the model's batcher, as background work in max_batch_size pieces."""

        async def infer(inputs: Arrays) -> Arrays:
            if not self.repository.get(job.model, str(job.resolved_version)).config.batchable:
                return await self._submit(job, inputs)  # a whole tensor: no rows to split
            rows = next(iter(inputs.values())).shape[0]
            outputs = []
            for lo in range(0, rows, job.piece_rows):
                piece = {name: array[lo : lo + job.piece_rows] for name, array in inputs.items()}
                outputs.append(await self._submit(job, piece))
            if len(outputs) == 1:
                return outputs[0]
            return {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}

        return infer

    async def _submit(self, job: Job, piece: Arrays) -> Arrays:
        for attempt in range(RETRIES):
            try:
                model: LoadedModel = self.repository.get(job.model, str(job.resolved_version))
                return (await model.batcher.submit(piece, BACKGROUND)).outputs
            except (QueueFull, QueueTimeout, Unavailable):
                await asyncio.sleep(min(1.0, 0.01 * 2**attempt))  # busy or reloading: wait
            except ModelRunError as exc:  # the rows' fault: they go to the errors file
                raise BadInput(exc.message) from exc
        raise Unavailable(f"model '{job.model}' refused background work {RETRIES} times in a row")
