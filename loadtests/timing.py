"""Per-request timings: the client's latency beside the server's `Server-Timing` header.

The locustfile records one row per request (`TimingLog`); Locust workers ship their rows to the
master in their periodic reports, and the master (or a lone local runner) writes one CSV. The
report reads it back with `read_timings` and sets the client's view beside the server's with
`summarize`.
"""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("timestamp", "name", "ok", "client_ms", "queue_ms", "compute_ms", "total_ms")
Row = tuple[float, str, int, float, float, float, float]


class TimingLog:
    """A bounded, uniform sample of request rows (reservoir sampling beyond `capacity`)."""

    def __init__(self, capacity: int = 500_000, seed: int | None = None) -> None:
        self.capacity = capacity
        self.rows: list[Row] = []
        self.seen = 0
        self._random = random.Random(seed)

    def add(self, row: Row) -> None:
        """Keep `row` (or, once full, keep it with probability capacity/seen)."""
        self.seen += 1
        if len(self.rows) < self.capacity:
            self.rows.append(row)
            return
        slot = self._random.randrange(self.seen)
        if slot < self.capacity:
            self.rows[slot] = row

    def extend(self, rows: list[Row] | list[list[Any]]) -> None:
        for row in rows:
            self.add(tuple(row))  # type: ignore[arg-type]

    def drain(self) -> list[Row]:
        """Hand over the rows collected so far and start afresh (a worker's report)."""
        rows, self.rows, self.seen = self.rows, [], 0
        return rows

    def clear(self) -> None:
        self.rows, self.seen = [], 0

    def write(self, path: Path) -> None:
        """Write the rows as CSV (NaN where the server sent no timing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(FIELDS)
            out.writerows(sorted(self.rows))


def read_timings(path: Path) -> list[dict[str, Any]]:
    """Rows of a timings CSV as dicts of floats (and `name`); [] if the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {k: float(r[k]) for k in FIELDS if k != "name"}
            row["name"] = r["name"]
            rows.append(row)
    return rows


def _p(values: list[float], q: float) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return round(float(np.percentile(finite, q)), 3) if finite else None


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return round(float(np.mean(finite)), 3) if finite else None


def _view(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["ok"] and not math.isnan(r["total_ms"])]
    client = [r["client_ms"] for r in ok]
    total = [r["total_ms"] for r in ok]
    client_p50, server_p50 = _p(client, 50), _p(total, 50)
    return {
        "requests": len(rows),
        "with_server_timing": len(ok),
        "client_p50_ms": client_p50,
        "client_p99_ms": _p(client, 99),
        "queue_p50_ms": _p([r["queue_ms"] for r in ok], 50),
        "queue_mean_ms": _mean([r["queue_ms"] for r in ok]),
        "compute_p50_ms": _p([r["compute_ms"] for r in ok], 50),
        "server_total_p50_ms": server_p50,
        "server_total_p99_ms": _p(total, 99),
        # What neither queue nor compute explains: HTTP, (de)serialisation, the client itself.
        "outside_server_p50_ms": _p([r["client_ms"] - r["total_ms"] for r in ok], 50),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Client latency beside Server-Timing's queue/compute/total, in total and per request name.

    Only successful requests that carried a Server-Timing header enter the percentiles.
    """
    names = sorted({r["name"] for r in rows})
    return {
        "total": _view(rows),
        "endpoints": {n: _view([r for r in rows if r["name"] == n]) for n in names},
    }
