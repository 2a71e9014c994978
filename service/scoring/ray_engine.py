"""Scoring on Ray Data: `read_*` -> `map_batches` over an actor pool -> `write_parquet`.

Each actor holds one ONNX Runtime session and scores a batch with the same code as the local
engine (`readers` to validate rows, `engine.score_chunk`, `writer.result_table`), so the output
equals the in-process engine's once sorted by `row`. Row indices come from zipping the input with
`ray.data.range(rows)`, which is positional, so the run sets `preserve_order` (Ray deprecates
`zip` for 2.64; see docs/batch-scoring.md). Not resumable by manifest: Ray retries failed tasks.
Ray is an optional extra (`pip install 'onnxserve[ray]'`), imported only here.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from service.model_config import ModelConfig
from service.scoring import ScoringError
from service.scoring.arrow import arrow_matrix
from service.scoring.plan import ModelInput, Plan
from service.scoring.readers import CsvReader, make_chunk
from service.scoring.writer import ERRORS, ERRORS_HEADER, SUMMARY, Summary, write_atomic

ROW_ID = "id"  # the column `ray.data.range` adds


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ScoringError("the Ray engine needs Ray: pip install 'onnxserve[ray]'") from None
    return ray


class Scorer:
    """The actor: one ONNX Runtime session; a batch of input rows in, result rows out.

    Bad rows come out with only `row` and `error` set; good rows with `error` null.
    """

    def __init__(
        self, model_path: str, config_json: str, model_input: ModelInput, batch_size: int,
        source: dict[str, Any], threads: int,
    ) -> None:  # fmt: skip
        from concurrent.futures import ThreadPoolExecutor

        from service.runtime import ModelRuntime, RuntimeOptions
        from service.scoring.engine import local_infer

        self.config = ModelConfig.model_validate_json(config_json)
        self.model_input, self.batch_size, self.source = model_input, batch_size, source
        runtime = ModelRuntime(Path(model_path), RuntimeOptions(intra_op_threads=threads))
        self.infer = local_infer(runtime, ThreadPoolExecutor(1, "score-ort"))  # lives as the actor
        self.loop = asyncio.new_event_loop()

    def _matrix(self, batch: Any) -> tuple[np.ndarray, dict[int, str]]:
        dtype, width = self.model_input.dtype, self.source["width"]
        if self.source["format"] == "npy":
            values = batch.column("data").combine_chunks().to_numpy()
            return np.asarray(values, dtype).reshape(batch.num_rows, width), {}
        return arrow_matrix(batch, self.source["columns"], width, dtype)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from service.scoring.engine import score_chunk
        from service.scoring.writer import result_table

        ids = batch.column(ROW_ID).to_numpy()
        chunk = make_chunk(0, *self._matrix(batch))
        rows, outputs, refused = self.loop.run_until_complete(
            score_chunk(self.model_input, self.batch_size, chunk, self.infer)
        )
        good = result_table(self.config, ids[rows], outputs)
        good = good.append_column("error", pa.nulls(good.num_rows, pa.string()))
        errors = sorted(chunk.errors + refused)
        bad = pa.table({
            "row": pa.array([ids[i] for i, _ in errors], pa.int64()),
            "error": pa.array([reason for _, reason in errors], pa.string()),
        })  # fmt: skip
        return pa.concat_tables([good, bad], promote_options="default")


def _dataset(ray: Any, plan: Plan) -> tuple[Any, dict[str, Any]]:
    """The input as a Ray dataset, and how an actor turns its batches into rows."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    reader, path = plan.reader, str(plan.reader.path)
    source = {"format": reader.format, "width": reader.width, "columns": reader.columns}
    if reader.format == "npy":
        ds = ray.data.read_numpy(path)
    elif reader.format == "parquet":
        ds = ray.data.read_parquet(path, columns=reader.columns)
    else:
        assert isinstance(reader, CsvReader)
        names = reader.names
        ds = ray.data.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=None if reader.header else names),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, include_columns=reader.columns
            ),
        )
        source["columns"] = reader.columns or names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return ds.zip(ray.data.range(reader.rows)), source


def score(
    plan: Plan, model_path: Path, address: str | None = None, actors: int | None = None
) -> Summary:
    """Score a plan on Ray (a local Ray, or the cluster at `address`); Parquet output only."""
    ray = _ray()
    if plan.output.npy:
        raise ScoringError("the Ray engine writes Parquet: give a folder as OUTPUT, not a .npy")
    if not isinstance(plan.model_input, ModelInput):
        raise ScoringError("the Ray engine reads .npy, .parquet and .csv: score an .npz locally")
    if plan.output.folder.exists():
        raise ScoringError(f"output {plan.output.folder} exists; the Ray engine needs a new one")
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    options = ray.data.DataContext.get_current().execution_options
    ordered, options.preserve_order = options.preserve_order, True  # zip pairs rows by position
    try:
        scored = _score(ray, plan, model_path, actors or max(1, cpus - 1))
    finally:
        options.preserve_order = ordered
    return _write(ray, plan, scored, started)


def _score(ray: Any, plan: Plan, model_path: Path, actors: int) -> Any:
    ds, source = _dataset(ray, plan)
    return ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model_path": str(Path(model_path).resolve()),
            "config_json": plan.config.model_dump_json(),
            "model_input": plan.model_input,
            "batch_size": plan.batch_size,
            "source": source,
            "threads": 1,
        },
        batch_format="pyarrow",
        batch_size=plan.batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
    ).materialize()


def _write(ray: Any, plan: Plan, scored: Any, started: float) -> Summary:
    import pyarrow as pa
    import pyarrow.compute as pc

    scored.map_batches(
        lambda t: t.filter(pc.is_null(t["error"])).drop_columns(["error"]),
        batch_format="pyarrow",
    ).write_parquet(str(plan.output.folder))
    failed = scored.map_batches(
        lambda t: t.filter(pc.is_valid(t["error"])).select(["row", "error"]),
        batch_format="pyarrow",
    ).to_arrow_refs()
    errors = pa.concat_tables(ray.get(failed)).sort_by("row") if failed else None
    n_errors = errors.num_rows if errors is not None else 0
    text = io.StringIO()
    if errors is not None:
        csv.writer(text, lineterminator="\n").writerows(
            zip(errors["row"].to_pylist(), errors["error"].to_pylist(), strict=True)
        )
    write_atomic(plan.output.folder / ERRORS, ERRORS_HEADER + text.getvalue().encode())
    seconds = time.perf_counter() - started
    summary = Summary(
        model=plan.config.name,
        version=plan.version,
        engine="ray",
        input=str(plan.reader.path),
        output=str(plan.output.target),
        rows=plan.reader.rows,
        scored=plan.reader.rows - n_errors,
        errors=n_errors,
        seconds=round(seconds, 3),
        rows_per_s=round(plan.reader.rows / seconds, 1),
        errors_file=str(plan.output.folder / ERRORS),
    )
    write_atomic(plan.output.folder / SUMMARY, json.dumps(asdict(summary), indent=2).encode())
    return summary
