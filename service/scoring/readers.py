"""Input readers: a file's rows as float matrices, in chunks of a fixed number of rows.

A row is one sample; its values are flattened (the model's input shape is restored later). Rows
that cannot be scored (wrong width, a non-numeric cell, NaN/inf or a missing value) are set aside
with a reason, keyed by their row index (0-based, header excluded), and the rest go on.

- `.npy`: memory-mapped; row i is `array[i]`, flattened.
- `.parquet`: one list or fixed-size-list column of numbers, or one numeric column per feature
  (`columns` picks them; by default the only list column, else every numeric column).
- `.csv`: one line per row; a first line with no number in it is a header. Lines are parsed a
  chunk at a time by pyarrow; a chunk holding a bad line is parsed line by line instead.
"""

from __future__ import annotations

import io
import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.scoring import ScoringError

FORMATS = (".npy", ".parquet", ".csv")
MISSING = "missing or non-finite value (NaN, inf or empty)"


@dataclass
class Chunk:
    """Rows [start, start + count) of the input: the good ones as a matrix, the bad ones apart."""

    start: int
    count: int
    rows: np.ndarray  # int64 row indices of the good rows
    values: np.ndarray  # [len(rows), width]
    errors: list[tuple[int, str]] = field(default_factory=list)


def make_chunk(start: int, matrix: np.ndarray, bad: dict[int, str]) -> Chunk:
    """Split a chunk's matrix (NaN where a value is missing) into good rows and (row, reason)."""
    suspect = np.flatnonzero(~np.isfinite(matrix.sum(axis=1)))  # fast; may overflow: recheck
    for i in suspect[~np.isfinite(matrix[suspect]).all(axis=1)]:
        bad.setdefault(int(i), MISSING)
    rows = np.arange(start, start + len(matrix), dtype=np.int64)
    if not bad:
        return Chunk(start, len(matrix), rows, matrix)
    good = np.ones(len(matrix), bool)
    good[list(bad)] = False
    errors = [(start + i, bad[i]) for i in sorted(bad)]
    return Chunk(start, len(matrix), rows[good], matrix[good], errors)


class Reader(ABC):
    """A file of rows; `width` values per row, `rows` rows in all."""

    format: str
    rows: int
    width: int

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)

    def identity(self) -> dict[str, Any]:
        """What fixes the input's content: its path, size and modification time, and the view."""
        stat = self.path.stat()
        return {
            "path": str(self.path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "format": self.format,
            "columns": self.columns,
        }

    @property
    def columns(self) -> list[str] | None:
        return None

    @abstractmethod
    def matrices(self, start: int, chunk_rows: int) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
        """Matrices of `chunk_rows` rows (the last may be shorter) from row `start` on, each with
        the reasons of its structurally bad rows (local indices); missing values are NaN."""

    def chunks(self, chunk_rows: int, start: int = 0) -> Iterator[Chunk]:
        """The rows from `start` on, `chunk_rows` at a time."""
        for offset, (matrix, bad) in zip(
            itertools.count(start, chunk_rows), self.matrices(start, chunk_rows), strict=False
        ):
            yield make_chunk(offset, matrix, bad)


# -- .npy ------------------------------------------------------------------------------------
class NpyReader(Reader):
    format = "npy"

    def __init__(self, path: Path, dtype: np.dtype, columns: Sequence[str] | None = None) -> None:
        super().__init__(path, dtype)
        if columns:
            raise ScoringError("--column applies to .parquet and .csv inputs, not .npy")
        try:
            self.array = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise ScoringError(f"{path}: not a readable .npy file ({exc})") from None
        if not isinstance(self.array, np.ndarray) or self.array.dtype.kind not in "biuf":
            raise ScoringError(
                f"{path}: holds {getattr(self.array, 'dtype', 'objects')}, not a plain numeric "
                "array; save one row per sample along the first axis"
            )
        if self.array.ndim == 0:
            raise ScoringError(f"{path}: a scalar, not rows of samples")
        self.rows = int(self.array.shape[0])
        self.width = int(np.prod(self.array.shape[1:], dtype=np.int64))

    def matrices(self, start: int, chunk_rows: int) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
        for begin in range(start, self.rows, chunk_rows):
            block = self.array[begin : begin + chunk_rows]
            yield np.asarray(block, dtype=self.dtype).reshape(len(block), self.width), {}


# -- Arrow (Parquet here, and Ray's batches) ---------------------------------------------------
def _is_list(type_: Any) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_list(type_)
        or pa.types.is_large_list(type_)
        or (pa.types.is_fixed_size_list(type_))
    )


def _is_binary(type_: Any) -> bool:
    import pyarrow as pa

    return (
        pa.types.is_binary(type_)
        or pa.types.is_large_binary(type_)
        or (pa.types.is_fixed_size_binary(type_))
    )


def _is_number(type_: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(type_) or pa.types.is_floating(type_)


def _is_text(type_: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def _is_vector(type_: Any) -> bool:
    """A column that holds a whole row: a list of numbers, or the row's raw bytes."""
    return _is_binary(type_) or (_is_list(type_) and _is_number(type_.value_type))


def pick_columns(schema: Any, columns: Sequence[str] | None, where: str) -> list[str]:
    """The feature columns: those named, else the only vector column, else every numeric one."""
    names = list(schema.names)
    types = {n: schema.field(n).type for n in names}
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise ScoringError(f"{where}: no column {missing[0]!r} (columns: {', '.join(names)})")
        picked = list(columns)
    else:
        vectors = [n for n in names if _is_vector(types[n])]
        picked = vectors if len(vectors) == 1 else [n for n in names if _is_number(types[n])]
        if not picked:
            raise ScoringError(
                f"{where}: no numeric or list column to score (columns: {', '.join(names)}); "
                "name one with --column"
            )
    if len(picked) == 1 and _is_vector(types[picked[0]]):
        return picked
    for name in picked:
        if _is_vector(types[name]):
            raise ScoringError(f"{where}: a list column ({name!r}) must be the only column picked")
        if not (_is_number(types[name]) or _is_text(types[name])):
            raise ScoringError(f"{where}: column {name!r} holds {types[name]}, not numbers")
    return picked


def vector_width(type_: Any, first_rows: Iterator[Any], dtype: np.dtype, where: str) -> int:
    """Values per row of a vector column: from its type if fixed, else from its first row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_fixed_size_list(type_):
        return type_.list_size
    if pa.types.is_fixed_size_binary(type_):
        return type_.byte_width // dtype.itemsize
    for column in first_rows:
        length = pc.list_value_length if _is_list(type_) else pc.binary_length
        lengths = pc.drop_null(length(column))
        if len(lengths):
            size = int(lengths[0].as_py())
            return size if _is_list(type_) else size // dtype.itemsize
    raise ScoringError(f"{where}: holds no rows")


def _numbers(column: Any, name: str, dtype: np.dtype, bad: dict[int, str]) -> np.ndarray:
    """One feature column as numbers (null -> NaN); a string column is parsed cell by cell."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if _is_text(column.type):
        try:
            column = pc.cast(column, pa.float64())
        except pa.ArrowInvalid:
            values = np.full(len(column), np.nan)
            for i, cell in enumerate(column.to_pylist()):
                text = (cell or "").strip()
                try:
                    values[i] = float(text) if text else np.nan
                except ValueError:
                    bad.setdefault(i, f"non-numeric value {text!r} in column {name!r}")
            return values.astype(dtype)
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=dtype)


def _fill(
    lengths: np.ndarray,
    starts: np.ndarray,
    flat: np.ndarray,
    width: int,
    dtype: np.dtype,
    unit: str,
) -> tuple[np.ndarray, dict[int, str]]:
    """Rows of `width` values out of `flat`, each at its start with its length (-1: null)."""
    n, size = len(lengths), width * (dtype.itemsize if unit == "bytes" else 1)
    good = lengths == size
    matrix = np.full((n, width), np.nan, dtype=dtype)
    if good.any():
        rows = flat[starts[good, None] + np.arange(size)]
        matrix[good] = rows.view(dtype) if unit == "bytes" else rows
    bad = {
        int(i): "missing row (null)" if lengths[i] < 0 else
        f"row has {lengths[i]} {unit}, expected {size}"
        for i in np.flatnonzero(~good)
    }  # fmt: skip
    return matrix, bad


def _vector_matrix(array: Any, width: int, dtype: np.dtype) -> tuple[np.ndarray, dict[int, str]]:
    """A vector column as an [n, width] matrix; zero-copy where the layout allows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n, type_ = len(array), array.type
    if _is_list(type_):
        if pa.types.is_fixed_size_list(type_) and type_.list_size == width and not array.null_count:
            flat = array.flatten().to_numpy(zero_copy_only=False)
            return np.asarray(flat, dtype=dtype).reshape(n, width), {}
        lengths = pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False)
        flat = np.asarray(pc.list_flatten(array).to_numpy(zero_copy_only=False), dtype=dtype)
        starts = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))[:-1]])  # nulls skipped
        return _fill(lengths, starts.astype(np.int64), flat, width, dtype, "values")
    size = width * dtype.itemsize  # raw bytes of the values, in the model input's dtype
    if pa.types.is_fixed_size_binary(type_) and type_.byte_width == size and not array.null_count:
        data = np.frombuffer(array.buffers()[1], np.uint8)[array.offset * size :][: n * size]
        return data.view(dtype).reshape(n, width), {}
    array = array.cast(pa.large_binary())
    lengths = pc.binary_length(array).fill_null(-1).to_numpy(zero_copy_only=False)
    offsets = np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + n + 1]
    data = np.frombuffer(array.buffers()[2] or b"", np.uint8)
    return _fill(lengths, offsets[:-1], data, width, dtype, "bytes")


def arrow_matrix(
    table: Any, columns: Sequence[str], width: int, dtype: np.dtype
) -> tuple[np.ndarray, dict[int, str]]:
    """Rows of an Arrow table as an [n, width] matrix, with the reasons of structurally bad rows."""
    if len(columns) == 1 and _is_vector(table.schema.field(columns[0]).type):
        column = table.column(columns[0])
        array = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        return _vector_matrix(array, width, dtype)
    bad: dict[int, str] = {}
    cols = [_numbers(table.column(c), c, dtype, bad) for c in columns]
    return np.stack(cols, axis=1), bad


def rechunk(batches: Iterator[Any], size: int, skip: int = 0) -> Iterator[Any]:
    """Arrow tables of exactly `size` rows (the last may be shorter) from record batches."""
    import pyarrow as pa

    held: list[Any] = []
    rows = 0
    for batch in batches:
        if skip:
            cut = min(skip, batch.num_rows)
            batch, skip = batch.slice(cut), skip - cut
        held.append(batch)
        rows += batch.num_rows
        while rows >= size:
            table = pa.Table.from_batches(held)
            yield table.slice(0, size)
            rest = table.slice(size)
            held, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(held)


class ParquetReader(Reader):
    format = "parquet"

    def __init__(self, path: Path, dtype: np.dtype, columns: Sequence[str] | None = None) -> None:
        super().__init__(path, dtype)
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            # no pre-buffering: read page by page, so memory does not grow with row groups
            self.file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except (pa.ArrowException, OSError) as exc:
            raise ScoringError(f"{path}: not a readable Parquet file ({exc})") from None
        schema = self.file.schema_arrow
        self._columns = pick_columns(schema, columns, str(path))
        self.rows = self.file.metadata.num_rows
        self.width = self._width(schema)

    @property
    def columns(self) -> list[str]:
        return self._columns

    def _width(self, schema: Any) -> int:
        type_ = schema.field(self._columns[0]).type
        if len(self._columns) > 1 or not _is_vector(type_):
            return len(self._columns)
        batches = self.file.iter_batches(batch_size=1024, columns=self._columns)
        where = f"{self.path}: column {self._columns[0]!r}"
        return vector_width(type_, (b.column(0) for b in batches), self.dtype, where)

    def matrices(self, start: int, chunk_rows: int) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
        meta, group, first = self.file.metadata, 0, 0
        while group < meta.num_row_groups and first + meta.row_group(group).num_rows <= start:
            first += meta.row_group(group).num_rows
            group += 1
        batches = self.file.iter_batches(
            batch_size=min(chunk_rows, 65536),
            row_groups=range(group, meta.num_row_groups),
            columns=self._columns,
        )
        for table in rechunk(batches, chunk_rows, skip=start - first):
            yield arrow_matrix(table, self._columns, self.width, self.dtype)


# -- .csv ------------------------------------------------------------------------------------
def _is_float(cell: bytes) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def csv_header(path: Path) -> list[str] | None:
    """The header's names if the first line holds no number, else None."""
    with path.open("rb") as f:
        first = f.readline().rstrip(b"\r\n")
    cells = first.split(b",")
    if not first or any(_is_float(c) for c in cells):
        return None
    return [c.strip().strip(b'"').decode("utf-8", "replace") for c in cells]


class CsvReader(Reader):
    format = "csv"

    def __init__(self, path: Path, dtype: np.dtype, columns: Sequence[str] | None = None) -> None:
        super().__init__(path, dtype)
        try:
            with path.open("rb") as f:
                first = f.readline()
        except OSError as exc:
            raise ScoringError(f"{path}: cannot read ({exc.strerror})") from None
        if not first.strip():
            raise ScoringError(f"{path}: empty, or its first line is blank")
        self.header = csv_header(path)
        self.names = self.header or [f"f{i}" for i in range(len(first.split(b",")))]
        if columns and self.header is None:
            raise ScoringError(f"{path}: --column needs a header line naming the columns")
        if columns:
            missing = [c for c in columns if c not in self.names]
            if missing:
                raise ScoringError(
                    f"{path}: no column {missing[0]!r} (columns: {', '.join(self.names)})"
                )
        self._columns = list(columns) if columns else None
        self._picked = [self.names.index(c) for c in columns] if columns else None
        self.width = len(columns) if columns else len(self.names)
        self.rows = self._count_lines() - (1 if self.header else 0)

    @property
    def columns(self) -> list[str] | None:
        return self._columns

    def _count_lines(self) -> int:
        lines, last = 0, b"\n"
        with self.path.open("rb") as f:
            while block := f.read(1 << 22):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")

    def matrices(self, start: int, chunk_rows: int) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
        with self.path.open("rb") as f:
            lines = iter(f)
            for _ in itertools.islice(lines, start + (1 if self.header else 0)):
                pass
            while block := list(itertools.islice(lines, chunk_rows)):
                yield self._parse(block)

    def _parse(self, lines: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        try:
            table = pacsv.read_csv(
                io.BytesIO(b"".join(lines) + (b"" if lines[-1].endswith(b"\n") else b"\n")),
                read_options=pacsv.ReadOptions(column_names=self.names, use_threads=False),
                parse_options=pacsv.ParseOptions(ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.float64() for n in self.names},
                    include_columns=self._columns,
                    null_values=[""],
                    strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid:  # a bad line somewhere in the chunk: parse line by line
            return self._parse_lines(lines)
        matrix = np.stack([c.to_numpy() for c in table.columns], axis=1).astype(self.dtype)
        return matrix, {}

    def _parse_lines(self, lines: list[bytes]) -> tuple[np.ndarray, dict[int, str]]:
        matrix = np.full((len(lines), self.width), np.nan)
        bad: dict[int, str] = {}
        picked = self._picked or range(len(self.names))
        for i, line in enumerate(lines):
            cells = line.rstrip(b"\r\n").split(b",")
            if not line.strip():
                bad[i] = "empty line"
            elif len(cells) != len(self.names):
                bad[i] = f"row has {len(cells)} values, expected {len(self.names)}"
            else:
                for j, k in enumerate(picked):
                    cell = cells[k].strip()
                    if not cell:
                        continue  # missing: NaN
                    try:
                        matrix[i, j] = float(cell)
                    except ValueError:
                        text = cell.decode("utf-8", "replace")
                        bad[i] = f"non-numeric value {text!r} in column {self.names[k]!r}"
                        break
        return matrix.astype(self.dtype), bad


READERS: dict[str, type[Reader]] = {
    ".npy": NpyReader,
    ".parquet": ParquetReader,
    ".pq": ParquetReader,
    ".csv": CsvReader,
}


def open_reader(path: Path, dtype: np.dtype, columns: Sequence[str] | None = None) -> Reader:
    """The reader for a file, by its extension; ScoringError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ScoringError(f"input file {path} does not exist" if not path.exists() else
                           f"input {path} is not a file")  # fmt: skip
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ScoringError(
            f"{path}: unsupported input format {path.suffix or '(no extension)'!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    return kind(path, dtype, columns)
