"""The output: part files committed chunk by chunk under a manifest that is replaced atomically.

Layout of an output folder (a Parquet dataset: readers skip names starting with `_`):

    OUTPUT/part-00000.parquet ...  one per input chunk: `row` then the task's columns (a
                                   model without a task: one column per output)
    OUTPUT/_manifest.json          the job's fingerprint and how many chunks are committed
    OUTPUT/_errors.csv             `row,reason` for every row that could not be scored
    OUTPUT/_summary.json           rows, errors, seconds, rows/s (when the job is complete)

A chunk is committed by writing its part (temp file + rename), writing its errors at the offset
the manifest records, then replacing the manifest. Whatever a crash leaves past the last commit is
redone identically on resume. With an OUTPUT ending in `.npy` the folder is `OUTPUT.parts/` and,
once every chunk is in, the parts are assembled into one structured array at OUTPUT.

A column holds a row's tensor flattened: a scalar per row stays a scalar column, anything larger
becomes a fixed-size list (strings as strings). For a model without a task, each part's Parquet
schema metadata records the row shape of every output under `onnxserve.shapes` (JSON, e.g.
`{"y": [3, 4], "z": []}`), and the assembled .npy gives each field that shape.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from service import postprocess
from service.codec import NP_TYPES
from service.model_config import ModelConfig
from service.scoring import ScoringError
from service.scoring.safedir import SafeDir

MANIFEST, ERRORS, SUMMARY, LOCK = "_manifest.json", "_errors.csv", "_summary.json", "_lock"
ROW = "row"  # the input row index column
SHAPES = b"onnxserve.shapes"  # schema metadata: each output's row shape (models without a task)
ERRORS_HEADER = b"row,reason\n"
TMP_PREFIX = "_tmp-"


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _flat_column(values: np.ndarray) -> Any:
    """Values as a flat Arrow array; strings (BYTES) as UTF-8 strings, or binary if not text."""
    import pyarrow as pa

    if values.dtype.kind not in "OUS":
        return pa.array(values)
    items = values.tolist()
    if any(isinstance(v, bytes) for v in items):
        try:
            items = [v.decode() if isinstance(v, bytes) else v for v in items]
        except UnicodeDecodeError:
            return pa.array([v if isinstance(v, bytes) else str(v).encode() for v in items],
                            pa.binary())  # fmt: skip
    return pa.array([str(v) for v in items], pa.string())


def _column(values: np.ndarray) -> Any:
    """Per-row values as an Arrow column: a scalar per row stays a scalar, a row's tensor is
    flattened into a fixed-size list."""
    import pyarrow as pa

    if values.ndim <= 1:
        return _flat_column(values)
    width = int(np.prod(values.shape[1:], dtype=np.int64))
    flat = _flat_column(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def result_table(
    config: ModelConfig, rows: np.ndarray, outputs: dict[str, np.ndarray] | None
) -> Any:
    """`row` and the task's columns (`postprocess.predictions`) as an Arrow table.

    A row's tensor is flattened (probabilities: a fixed-size list); without a task, every output
    is a column and the schema metadata records their row shapes (`SHAPES`). `outputs` None
    means no row was scored.
    """
    import pyarrow as pa

    if outputs is None:
        outputs = {
            s.name: np.zeros(
                [0, *(1 if d == -1 else d for d in (s.shape[1:] if config.batchable else s.shape))],
                NP_TYPES[s.datatype],
            )
            for s in config.outputs
        }
    columns: dict[str, Any] = {ROW: pa.array(rows, pa.int64())}
    predictions = postprocess.predictions(config, outputs)
    for name, values in predictions.items():
        columns[name] = _column(values)
    table = pa.table(columns)
    if config.task is None:
        shapes = {name: list(values.shape[1:]) for name, values in predictions.items()}
        table = table.replace_schema_metadata({SHAPES: json.dumps(shapes)})
    return table


def row_shapes(schema: Any) -> dict[str, list[int]]:
    """The row shapes a part's schema metadata records (empty for a model with a task)."""
    raw = (schema.metadata or {}).get(SHAPES)
    return json.loads(raw) if raw else {}


@dataclass
class Manifest:
    """What is committed; written whole, atomically, after each chunk."""

    fingerprint: dict[str, Any]
    total_rows: int
    chunks_done: int = 0
    rows_done: int = 0
    scored: int = 0
    errors: int = 0
    errors_bytes: int = len(ERRORS_HEADER)
    elapsed_s: float = 0.0
    complete: bool = False


@dataclass
class Summary:
    """A finished (or resumed-and-finished) job, as printed and written to `_summary.json`."""

    model: str
    version: int
    engine: str
    input: str
    output: str
    rows: int
    scored: int
    errors: int
    seconds: float
    rows_per_s: float
    resumed_from_row: int = 0
    errors_file: str = ""

    @property
    def error_ratio(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    def line(self) -> str:
        return (
            f"{self.model} v{self.version}: {self.rows} rows, {self.scored} scored, "
            f"{self.errors} errors in {self.seconds:.1f} s ({self.rows_per_s:,.0f} rows/s) "
            f"-> {self.output}"
        )


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all (temp file, fsync, rename)."""
    tmp = path.with_name(TMP_PREFIX + path.name)
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


class Output:
    """One job's output folder (see the module docstring). While open, every file operation
    goes through the folder's descriptor (`SafeDir`), so swapping a path component for a
    symlink mid-job cannot redirect a write; under `root` (a server's jobs root) the folder is
    also opened without following symlinks."""

    def __init__(self, target: Path, root: Path | None = None) -> None:
        self.target = Path(target)
        self.root = root
        self.npy = self.target.suffix.lower() == ".npy"
        self.folder = (
            self.target.with_name(self.target.name + ".parts") if self.npy else self.target
        )
        self._lock: IO[Any] | None = None
        self._dir: SafeDir | None = None
        self._parent: SafeDir | None = None  # the .npy target's folder

    def manifest(self) -> Manifest | None:
        """The committed manifest, if any."""
        try:
            raw = (
                self._dir.read_bytes(MANIFEST)
                if self._dir
                else (self.folder / MANIFEST).read_bytes()
            )
            return Manifest(**json.loads(raw))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise ScoringError(f"{self.folder / MANIFEST} is unreadable ({exc})") from None

    def check(self, fingerprint: dict[str, Any]) -> None:
        """Refuse an output that another job made, or that is not ours to write into."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ScoringError(f"output {self.folder} exists and is not a folder")
        manifest = self.manifest()
        if manifest is None:
            if self.npy and self.target.exists():
                raise ScoringError(f"output {self.target} exists; choose a new one or remove it")
            names = self._dir.names() if self._dir else (
                [p.name for p in self.folder.iterdir()] if self.folder.is_dir() else []
            )  # fmt: skip
            if any(n != LOCK for n in names):
                raise ScoringError(
                    f"output {self.folder} exists and holds files but no {MANIFEST} (not a "
                    "resumable job's output); choose a new output or remove it"
                )
            return
        if not _same(manifest.fingerprint, fingerprint):
            ours, theirs = fingerprint, manifest.fingerprint
            changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise ScoringError(
                f"output {self.folder} was made with other arguments (differ: "
                f"{', '.join(changed)}); use a new output path or remove it to start over"
            )

    def open(self, fingerprint: dict[str, Any], total_rows: int) -> Manifest:
        """Open and lock the folder, check it, and drop whatever a crash left past the last
        commit."""
        self._dir = SafeDir.open(self.folder, self.root)
        if self.npy:
            self._parent = SafeDir.open(self.target.parent, self.root)
        lock = self._dir.file(LOCK, "ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            self.close()
            raise ScoringError(f"output {self.folder} is being written by another job") from None
        self._lock = lock
        try:
            return self._prepare(fingerprint, total_rows)
        except BaseException:
            self.close()  # a refused output must not stay locked
            raise

    @property
    def dir(self) -> SafeDir:
        if self._dir is None:
            raise RuntimeError("Output.open() was not called")
        return self._dir

    def _prepare(self, fingerprint: dict[str, Any], total_rows: int) -> Manifest:
        self.check(fingerprint)
        manifest = self.manifest() or Manifest(fingerprint, total_rows)
        d = self.dir
        for name in d.names():  # parts past the last commit, and temp files
            index = name.removeprefix("part-").removesuffix(".parquet")
            stale = name.startswith("part-") and index.isdigit()
            if (stale and int(index) >= manifest.chunks_done) or name.startswith(TMP_PREFIX):
                d.unlink(name)
        size = d.size(ERRORS)
        if manifest.errors_bytes == len(ERRORS_HEADER):
            d.write_atomic(ERRORS, ERRORS_HEADER, TMP_PREFIX)
        elif size is None or size < manifest.errors_bytes:
            raise ScoringError(
                f"{self.folder / ERRORS} lost committed rows; remove {self.folder} to start over"
            )
        else:
            with d.file(ERRORS, "r+b") as ef:
                ef.truncate(manifest.errors_bytes)
        d.write_atomic(MANIFEST, json.dumps(asdict(manifest)).encode(), TMP_PREFIX)
        return manifest

    def close(self) -> None:
        """Release the folder's lock and descriptors."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        for held in (self._dir, self._parent):
            if held is not None:
                held.close()
        self._dir = self._parent = None

    def commit(
        self, manifest: Manifest, table: Any, count: int, errors: list[tuple[int, str]], s: float
    ) -> None:
        """Commit the next chunk: its part, its errors, then the manifest."""
        import pyarrow.parquet as pq

        d = self.dir
        part = part_name(manifest.chunks_done)
        tmp = TMP_PREFIX + part
        strings = [f.name for f in table.schema if f.type == "string"]
        with d.file(tmp, "wb") as f:
            pq.write_table(table, f, use_dictionary=strings)  # floats: dictionaries cost, not pay
            f.flush()
            os.fsync(f.fileno())
        d.replace(tmp, part)
        if errors:
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows(errors)
            with d.file(ERRORS, "r+b") as ef:
                ef.seek(manifest.errors_bytes)
                ef.write(text.getvalue().encode())
                ef.truncate()
                ef.flush()
                os.fsync(ef.fileno())
                manifest.errors_bytes = ef.tell()
        manifest.chunks_done += 1
        manifest.rows_done += count
        manifest.scored += table.num_rows
        manifest.errors += len(errors)
        manifest.elapsed_s += s
        d.write_atomic(MANIFEST, json.dumps(asdict(manifest)).encode(), TMP_PREFIX)

    def finish(self, manifest: Manifest, summary: Summary) -> None:
        """Mark the job complete (assembling the .npy first, if that is the output)."""
        d = self.dir
        if self.npy:
            assert self._parent is not None
            parts = [part_name(i) for i in range(manifest.chunks_done)]
            assemble_npy([d.file(p, "rb") for p in parts], self.target, self._parent)
        d.write_atomic(SUMMARY, json.dumps(asdict(summary), indent=2).encode(), TMP_PREFIX)
        manifest.complete = True
        d.write_atomic(MANIFEST, json.dumps(asdict(manifest)).encode(), TMP_PREFIX)
        if self.npy:
            for name in d.names():
                if name.startswith("part-") and name.endswith(".parquet"):
                    d.unlink(name)

    def summary(self) -> Summary:
        """The summary a complete job wrote."""
        raw = self._dir.read_bytes(SUMMARY) if self._dir else (self.folder / SUMMARY).read_bytes()
        return Summary(**json.loads(raw))


def _structured_field(table: Any, name: str) -> tuple[str, Any, tuple[int, ...]]:
    """A column's field: its dtype (strings as wide as the longest) and a row's shape."""
    import pyarrow as pa
    import pyarrow.compute as pc

    type_, column, shape = table.schema.field(name).type, table.column(name), ()
    if pa.types.is_fixed_size_list(type_):
        shape = tuple(row_shapes(table.schema).get(name) or (type_.list_size,))
        type_, column = type_.value_type, pc.list_flatten(column)
    if pa.types.is_string(type_):
        return name, f"U{pc.max(pc.utf8_length(column)).as_py() or 1}", shape
    if pa.types.is_binary(type_):
        return name, f"S{pc.max(pc.binary_length(column)).as_py() or 1}", shape
    return name, type_.to_pandas_dtype(), shape


def assemble_npy(parts: list[Any], target: Path, folder: SafeDir | None = None) -> None:
    """Parts into one structured array at `target` (one field per column), written atomically.

    Strings become fixed-width unicode fields (as wide as the longest), fixed-size lists become
    sub-array fields (`probabilities` of shape (10,); an output of a model without a task gets
    its recorded row shape, e.g. (3, 4)). Memory stays at one part's worth.
    """
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(p) for p in parts]
    rows = sum(f.metadata.num_rows for f in files)
    widths: dict[str, str] = {}
    fields: list[tuple[str, Any, tuple[int, ...]]] = []
    for f in files:  # the widest string of each column decides its field's width
        table = f.read()
        fields = [_structured_field(table, n) for n in table.column_names]
        for name, kind, _ in fields:
            if isinstance(kind, str):
                widths[name] = max(widths.get(name, kind[0] + "1"), kind, key=lambda u: int(u[1:]))
    dtype = np.dtype([(n, widths.get(n, k), s) for n, k, s in fields])
    tmp = target.with_name(TMP_PREFIX + target.name)
    if folder is not None:  # create the temp file through the folder's descriptor
        os.close(folder.open_fd(tmp.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
        tmp = Path(f"/proc/self/fd/{folder.fd}") / tmp.name
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(rows,))
    offset = 0
    for f in files:
        table = f.read()
        n = table.num_rows
        for name, _, shape in fields:
            column = table.column(name).combine_chunks()
            if shape:
                flat = column.flatten().to_numpy(zero_copy_only=False)
                values = flat.reshape(n, *shape)
            else:
                values = column.to_numpy(zero_copy_only=False)
            out[name][offset : offset + n] = values
        offset += n
    out.flush()
    del out
    if folder is not None:
        folder.replace(tmp.name, target.name)
    else:
        os.replace(tmp, target)
