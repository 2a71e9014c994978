"""The scoring loop: a plan's chunks through an async `infer`, each chunk committed in turn.

`infer` is the only part that differs between the ways to run a job: ONNX Runtime in this
process (`local_infer`), a server over HTTP (`remote`), or the server's own batcher (`jobs`).
Reading and committing run in threads, so the loop never blocks a server's event loop, and they
overlap the scoring: chunk k+1 is read and chunk k-1 committed while chunk k is scored.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime import ModelRunError, ModelRuntime, RuntimeOptions
from service.scoring.plan import ModelInput, ModelInputs, Plan
from service.scoring.readers import Chunk
from service.scoring.writer import ERRORS, Manifest, Summary, result_table

Arrays = dict[str, np.ndarray]
Infer = Callable[[Arrays], Awaitable[Arrays]]
Progress = Callable[[Manifest], None]


class BadInput(Exception):
    """The model refused a batch for what its rows hold (not a transient failure).

    The batch's rows are then run one by one; those refused alone go to the errors file.
    """


async def _to_thread_to_the_end(pool: Executor | None, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn` in `pool`; if cancelled meanwhile, wait for it to finish, then re-raise."""
    task = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


Feed = ModelInput | ModelInputs


async def _run(feed: Feed, values: np.ndarray, infer: Infer) -> Arrays:
    """Rows in, one row of outputs per row out."""
    return feed.rows_of(await infer(feed.batch(values)))


async def _score_rows(
    model_input: Feed, rows: np.ndarray, values: np.ndarray, infer: Infer
) -> tuple[np.ndarray, Arrays | None, list[tuple[int, str]]]:
    """One batch; if the model refuses it, each row alone (refused rows become errors)."""
    try:
        return rows, await _run(model_input, values, infer), []
    except BadInput as exc:
        if len(rows) == 1:
            return rows[:0], None, [(int(rows[0]), f"model refused the row: {exc}")]
    kept, outputs, errors = [], [], []
    for i, row in enumerate(rows):
        try:
            outputs.append(await _run(model_input, values[i : i + 1], infer))
            kept.append(i)
        except BadInput as exc:
            errors.append((int(row), f"model refused the row: {exc}"))
    if not kept:
        return rows[:0], None, errors
    merged = {name: np.concatenate([o[name] for o in outputs]) for name in outputs[0]}
    return rows[kept], merged, errors


async def score_chunk(
    model_input: Feed, batch_size: int, chunk: Chunk, infer: Infer, concurrency: int = 1
) -> tuple[np.ndarray, Arrays | None, list[tuple[int, str]]]:
    """A chunk's good rows in batches, `concurrency` in flight: (rows, outputs, refused rows)."""
    slots = asyncio.Semaphore(concurrency)

    async def batch(lo: int) -> tuple[np.ndarray, Arrays | None, list[tuple[int, str]]]:
        hi = lo + batch_size
        async with slots:
            return await _score_rows(model_input, chunk.rows[lo:hi], chunk.values[lo:hi], infer)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(batch(lo)) for lo in range(0, len(chunk.rows), batch_size)]
    parts = [t.result() for t in tasks]
    errors = [e for _, _, errs in parts for e in errs]
    scored = [(rows, out) for rows, out, _ in parts if out is not None]
    if not scored:
        return chunk.rows[:0], None, errors
    rows = np.concatenate([r for r, _ in scored])
    outputs = {name: np.concatenate([o[name] for _, o in scored]) for name in scored[0][1]}
    return rows, outputs, errors


async def _score_all(
    plan: Plan, manifest: Manifest, infer: Infer, concurrency: int, progress: Progress | None
) -> None:
    """Chunk k+1 is read while chunk k is scored and chunk k-1 committed (commits in order)."""
    chunks = plan.reader.chunks(plan.chunk_rows, manifest.rows_done)
    loop = asyncio.get_running_loop()
    # one thread each for reading and committing: their buffers are reused, not spread over
    # the default pool's threads (which made peak memory wander from run to run)
    reader, writer = ThreadPoolExecutor(1, "score-read"), ThreadPoolExecutor(1, "score-write")
    reading = loop.run_in_executor(reader, next, chunks, None)
    committing: asyncio.Future | None = None
    try:
        while (chunk := await reading) is not None:
            reading = loop.run_in_executor(reader, next, chunks, None)
            began = time.perf_counter()
            rows, outputs, refused = await score_chunk(
                plan.model_input, plan.batch_size, chunk, infer, concurrency
            )
            table = result_table(plan.config, rows, outputs)
            if committing is not None:
                await committing
                if progress:
                    progress(manifest)
            errors, seconds = sorted(chunk.errors + refused), time.perf_counter() - began
            commit = (plan.output.commit, manifest, table, chunk.count, errors, seconds)
            committing = asyncio.ensure_future(_to_thread_to_the_end(writer, *commit))
        if committing is not None:
            await committing
            if progress:
                progress(manifest)
    finally:
        reading.cancel()
        if committing is not None and not committing.done():
            await asyncio.wait([committing])  # a commit is never left half-done
        reader.shutdown(wait=False, cancel_futures=True)
        writer.shutdown(wait=False)


async def run(
    plan: Plan, infer: Infer, *, concurrency: int = 1, progress: Progress | None = None
) -> Summary:
    """Score every chunk not yet committed, then finish the output; returns the summary.

    `progress` is called with the manifest after opening the output and after each commit.
    """
    output = plan.output
    started = time.perf_counter()
    manifest = await asyncio.to_thread(output.open, plan.fingerprint, plan.reader.rows)
    try:
        if manifest.complete:
            return output.summary()
        resumed = manifest.rows_done
        if progress:
            progress(manifest)
        await _score_all(plan, manifest, infer, concurrency, progress)
        seconds = time.perf_counter() - started
        summary = Summary(
            model=plan.config.name,
            version=plan.version,
            engine=plan.engine,
            input=str(plan.reader.path),
            output=str(output.target),
            rows=manifest.rows_done,
            scored=manifest.scored,
            errors=manifest.errors,
            seconds=round(seconds, 3),
            rows_per_s=round((manifest.rows_done - resumed) / seconds, 1) if seconds else 0.0,
            resumed_from_row=resumed,
            errors_file=str(output.folder / ERRORS),
        )
        await _to_thread_to_the_end(None, output.finish, manifest, summary)
        return summary
    finally:
        output.close()


def local_infer(runtime: ModelRuntime, pool: ThreadPoolExecutor) -> Infer:
    """`infer` over an ONNX Runtime session in this process, run in `pool`'s worker thread."""

    async def infer(inputs: Arrays) -> Arrays:
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, runtime.run, inputs)
        except ModelRunError as exc:
            raise BadInput(exc.message) from exc

    return infer


async def score_local(
    plan: Plan, model_path: Path, threads: int = 0, progress: Progress | None = None
) -> Summary:
    """Score a plan with ONNX Runtime in this process."""
    runtime = ModelRuntime(model_path, RuntimeOptions(intra_op_threads=threads))
    with ThreadPoolExecutor(1, "score-ort") as pool:
        return await run(plan, local_infer(runtime, pool), progress=progress)
