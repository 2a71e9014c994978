"""Input readers: a file's rows as float matrices, in chunks of a fixed number of rows.

A row is one sample; its values are flattened (the model's input shape is restored later). Rows
that cannot be scored (wrong width, a non-numeric cell, NaN/inf or a missing value) are set aside
with a reason, keyed by their row index (0-based, header excluded), and the rest go on.

- `.npy`: memory-mapped; row i is `array[i]`, flattened.
- `.parquet`: one vector column (a list of numbers, or the row's raw bytes) or one numeric column
  per feature (`columns` picks them; by default the only vector column, else every numeric
  one); read page by page, see `arrow`.
- `.csv`: one line per row; a first line with no number in it is a header. Lines are parsed a
  chunk at a time by pyarrow; a chunk holding a bad line is parsed line by line instead.
- `.npz`: one array per model input, named after it (`inputs` also serves a one-input model, as
  in samples.npz), rows on the first axis, any datatype (strings as NumPy `str` arrays). A chunk
  is a structured array with one field per input. Members of `np.savez` (stored) are
  memory-mapped; those of `np.savez_compressed` are read whole.
"""

from __future__ import annotations

import io
import itertools
import struct
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.scoring import ScoringError
from service.scoring.arrow import arrow_matrix, is_vector, pick_columns, rechunk, vector_width

FORMATS = (".npy", ".parquet", ".csv", ".npz")
NPZ = ".npz"
MISSING = "missing or non-finite value (NaN, inf or empty)"


@dataclass
class Chunk:
    """Rows [start, start + count) of the input: the good ones as a matrix, the bad ones apart."""

    start: int
    count: int
    rows: np.ndarray  # int64 row indices of the good rows
    values: np.ndarray  # [len(rows), width]
    errors: list[tuple[int, str]] = field(default_factory=list)


def _non_finite_rows(values: np.ndarray) -> np.ndarray:
    """Indices of rows holding NaN or inf: in the matrix, or in any float field of a structured
    array (rows of several inputs)."""
    if values.dtype.names is None:
        suspect = np.flatnonzero(~np.isfinite(values.sum(axis=1)))  # fast; may overflow: recheck
        return suspect[~np.isfinite(values[suspect]).all(axis=1)]
    bad = np.zeros(len(values), bool)
    for name in values.dtype.names:
        field_ = values[name]
        if field_.dtype.kind in "fc":
            bad |= ~np.isfinite(field_.reshape(len(values), -1)).all(axis=1)
    return np.flatnonzero(bad)


def make_chunk(start: int, matrix: np.ndarray, bad: dict[int, str]) -> Chunk:
    """Split a chunk's matrix (NaN where a value is missing) into good rows and (row, reason)."""
    for i in _non_finite_rows(matrix):
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
        if len(self._columns) > 1 or not is_vector(type_):
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


# -- .npz ------------------------------------------------------------------------------------
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length


def _stored_member(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """An uncompressed .npy member of a zip, memory-mapped in place."""
    with path.open("rb") as f:
        f.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise ValueError(f"member {info.filename} has no local header")
        f.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded")
    if 0 in shape:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, "F" if fortran else "C")


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz by name: stored members memory-mapped, compressed ones read."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith(".npy")]
        arrays = {}
        with np.load(path, allow_pickle=False) as data:
            for info in infos:
                name = info.filename.removesuffix(".npy")
                if info.compress_type == zipfile.ZIP_STORED:
                    arrays[name] = _stored_member(path, info)
                else:
                    arrays[name] = data[name]
    except (zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        hint = " (save strings as NumPy str arrays, not objects)" if "Object" in str(exc) else ""
        raise ScoringError(f"{path}: not a readable .npz file ({exc}){hint}") from None
    if not arrays:
        raise ScoringError(f"{path}: holds no arrays")
    return arrays


class NpzReader(Reader):
    """One array per model input; a chunk is a structured array with a field per input."""

    format = "npz"

    def __init__(self, path: Path, dtype: np.dtype, columns: Sequence[str] | None = None) -> None:
        super().__init__(path, dtype)
        if columns:
            raise ScoringError("--column applies to .parquet and .csv inputs, not .npz")
        self.arrays = npz_arrays(path)
        lengths = {name: len(a) if a.ndim else 0 for name, a in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ScoringError(f"{path}: arrays differ in rows {lengths}; give as many each")
        self.rows = next(iter(lengths.values()))
        self.width = 0  # rows are structured, not a width of numbers
        #: name -> (dtype, a row's shape) of every array
        self.fields = {n: (a.dtype, tuple(a.shape[1:])) for n, a in self.arrays.items()}
        self._picked: dict[str, str] = {}

    def pick(self, inputs: dict[str, str]) -> None:
        """Which array feeds each input (`{input: array name}`); the chunks hold these only."""
        self._picked = dict(inputs)

    @property
    def columns(self) -> list[str] | None:
        return sorted(self._picked.values()) or None

    def matrices(self, start: int, chunk_rows: int) -> Iterator[tuple[np.ndarray, dict[int, str]]]:
        picked = self._picked or {n: n for n in self.arrays}
        dtype = np.dtype([(i, self.fields[a][0], self.fields[a][1]) for i, a in picked.items()])
        for begin in range(start, self.rows, chunk_rows):
            end = min(begin + chunk_rows, self.rows)
            block = np.empty(end - begin, dtype)
            for name, array in picked.items():
                block[name] = self.arrays[array][begin:end]
            yield block, {}


READERS: dict[str, Callable[..., Reader]] = {
    ".npy": NpyReader,
    ".parquet": ParquetReader,
    ".pq": ParquetReader,
    ".csv": CsvReader,
    NPZ: NpzReader,
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
