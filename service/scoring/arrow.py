"""Arrow columns as float matrices: what the Parquet reader and the Ray engine share.

A row's values come either from one *vector* column (a list or fixed-size list of numbers, or
binary holding the row's raw little-endian values in the model input's dtype) or from one numeric
column per feature. Structurally bad rows (null, wrong length, a non-numeric string) are reported
by local index with a reason; missing values become NaN (and `readers.make_chunk` sets them aside).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from service.scoring import ScoringError


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


def is_vector(type_: Any) -> bool:
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
        vectors = [n for n in names if is_vector(types[n])]
        picked = vectors if len(vectors) == 1 else [n for n in names if _is_number(types[n])]
        if not picked:
            raise ScoringError(
                f"{where}: no numeric or list column to score (columns: {', '.join(names)}); "
                "name one with --column"
            )
    if len(picked) == 1 and is_vector(types[picked[0]]):
        return picked
    for name in picked:
        if is_vector(types[name]):
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
    if len(columns) == 1 and is_vector(table.schema.field(columns[0]).type):
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
