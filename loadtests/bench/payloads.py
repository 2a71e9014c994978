"""The benchmark's request bodies: real samples cycled (`request_rows`) and the manifest that
loadtests/wrk/post.lua reads. Requests themselves are `loadtests.payloads.make_payload`'s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DISTINCT_BODIES = 16  # real samples cycled per cell


def request_rows(samples: np.ndarray, rows: int, count: int) -> list[np.ndarray]:
    """`count` arrays of `rows` consecutive real samples (wrapping round the samples)."""
    n = len(samples)
    return [np.take(samples, (k * rows + np.arange(rows)) % n, axis=0) for k in range(count)]


def manifest_text(entries: list[tuple[str, Path, dict[str, str]]]) -> str:
    """The request manifest that loadtests/wrk/post.lua reads: path, body file, headers per line."""
    lines = []
    for path, body_file, headers in entries:
        fields = [path, str(body_file), *(f"{k}: {v}" for k, v in headers.items())]
        if any("\t" in f or "\n" in f for f in fields):
            raise ValueError(f"tab or newline in a manifest field: {fields}")
        lines.append("\t".join(fields))
    return "\n".join(lines) + "\n"
