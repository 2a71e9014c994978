"""Batch-scoring jobs inside the server: files under `jobs_root` scored through the batcher.

A job is the CLI's scoring loop (same reader, part files and manifest) with an `infer` that
submits work to the model's batcher as BACKGROUND, in pieces of at most `max_batch_size` rows with
two in flight, so an online request never waits behind a large job batch. Jobs run one at a time
(`jobs_concurrency`); their records live in `<jobs_root>/.onnxserve-jobs/<id>.json`, so a job that
was queued or running when the server stopped resumes from its manifest when it starts again.
"""

from __future__ import annotations

import asyncio
import logging
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
from service.scoring.writer import Manifest, write_atomic
from service.security import ANONYMOUS_CALLER, Caller

log = logging.getLogger(__name__)
STATE_DIR = ".onnxserve-jobs"
NAME_MAX, PATH_MAX = 255, 4096  # bytes per path component, characters per path (Linux)
IN_FLIGHT = 2  # batcher pieces per job at once
RETRIES = 100  # a busy queue refuses background work: wait and retry, this many times in a row


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
        busy = [j.id for j in self.jobs.values() if j.state in LIVE
                and self._inside(j.output, "output") == output]  # fmt: skip
        if busy:  # checked after the await, so two submits cannot both pass
            raise Conflict(f"job {busy[0]} is writing to {spec.output!r}; cancel it or wait")
        self._save(job)
        self._start(job)
        return job

    def get(self, job_id: str, caller: Caller = ANONYMOUS_CALLER) -> Job:
        """A job by id (404 if unknown, or if it is another caller's and `caller` is no admin)."""
        job = self.jobs.get(job_id)
        if job is None or not (caller.admin or job.owner == caller.name):
            raise NotFound(f"no job '{job_id}'")
        return job

    def all(self, caller: Caller = ANONYMOUS_CALLER) -> list[Job]:
        """The jobs `caller` may see (an admin sees every job), oldest first."""
        mine = [j for j in self.jobs.values() if caller.admin or j.owner == caller.name]
        return sorted(mine, key=lambda j: j.created)

    async def cancel(self, job_id: str, caller: Caller = ANONYMOUS_CALLER) -> Job:
        """Stop a queued or running job (committed chunks stay; resubmitting resumes)."""
        job = self.get(job_id, caller)
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])
        return job

    async def resume(self) -> None:
        """Load the records on disk and restart the jobs that were queued or running."""
        if self.root is None or not self.state_dir.is_dir():
            return
        for path in sorted(self.state_dir.glob("*.json")):
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
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # -- running ----------------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        self.jobs[job.id] = job
        task = asyncio.get_running_loop().create_task(self._run(job), name=f"job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))

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
