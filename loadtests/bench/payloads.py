"""The benchmark's request bodies: real samples cycled (`request_rows`) and the manifest that
loadtests/wrk/post.lua reads. Requests themselves are `loadtests.payloads.make_payload`'s."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

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


class Request(Protocol):
    """A request for post.lua: `loadtests.payloads.Payload` is one."""

    path: str
    body: bytes
    headers: dict[str, str]


def write_requests(requests: Iterable[Request], folder: Path, stem: str) -> Path:
    """Each request's body as `folder/stem-K.body`, and the manifest naming them
    (`folder/stem.tsv`, returned) for loadtests/wrk/post.lua."""
    entries = []
    for k, request in enumerate(requests):
        body_file = folder / f"{stem}-{k}.body"
        body_file.write_bytes(request.body)
        entries.append((request.path, body_file, request.headers))
    manifest = folder / f"{stem}.tsv"
    manifest.write_text(manifest_text(entries))
    return manifest
