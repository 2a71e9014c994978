"""The report of one run: Locust's CSVs read back, the summary assembled, PNG plots, a table.

Pure functions over files and dicts (matplotlib with the Agg backend for the plots).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = {"p50": "50%", "p90": "90%", "p95": "95%", "p99": "99%"}


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def _stat(row: dict[str, str]) -> dict[str, Any]:
    requests = int(_number(row["Request Count"]) or 0)
    failures = int(_number(row["Failure Count"]) or 0)
    latency = {k: _number(row.get(col)) for k, col in PERCENTILES.items()}
    latency["max"] = _number(row.get("Max Response Time"))
    latency["avg"] = _number(row.get("Average Response Time"))
    return {
        "requests": requests,
        "failures": failures,
        "failure_ratio": failures / requests if requests else 0.0,
        "rps": round(_number(row.get("Requests/s")) or 0.0, 3),
        "latency_ms": {k: None if v is None else round(v, 3) for k, v in latency.items()},
    }


def read_stats(path: Path) -> dict[str, Any]:
    """Locust's `<prefix>_stats.csv` -> {"total": stat, "endpoints": {name: stat}}.

    A stat holds requests, failures, failure_ratio, rps and latency_ms (p50/p90/p95/p99/max/avg,
    Locust's bucketed client-side percentiles).
    """
    endpoints, total = {}, None
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                total = _stat(row)
            else:
                endpoints[row["Name"]] = _stat(row)
    if total is None:
        raise ValueError(f"{path} has no Aggregated row: did Locust run at all?")
    return {"total": total, "endpoints": endpoints}


def locust_percentile(times: dict[int, int], count: int, q: float) -> float | None:
    """Locust's own percentile over its bucketed {response time ms: requests} counts."""
    if not count:
        return None
    within, done = int(count * q), 0
    for t in sorted(times, reverse=True):
        done += times[t]
        if count - done <= within:
            return float(t)
    return 0.0


def _merged(entries: list[dict[str, Any]]) -> dict[str, Any]:
    times: dict[int, int] = {}
    for e in entries:
        for t, n in (e.get("response_times") or {}).items():
            times[int(float(t))] = times.get(int(float(t)), 0) + n
    requests = sum(e["num_requests"] for e in entries)
    failures = sum(e["num_failures"] for e in entries)
    start = min((e["start_time"] for e in entries if e.get("start_time")), default=0.0)
    last = max((e["last_request_timestamp"] or 0.0 for e in entries), default=0.0)
    latency = {
        k: locust_percentile(times, requests, int(c[:-1]) / 100) for k, c in PERCENTILES.items()
    }
    latency["max"] = max((e["max_response_time"] or 0 for e in entries), default=None)
    total_ms = sum(e["total_response_time"] for e in entries)
    latency["avg"] = total_ms / requests if requests else None
    return {
        "requests": requests,
        "failures": failures,
        "failure_ratio": failures / requests if requests else 0.0,
        "rps": round(requests / (last - start), 3) if requests and last > start else 0.0,
        "latency_ms": {k: None if v is None else round(v, 3) for k, v in latency.items()},
    }


def read_stats_json(path: Path) -> dict[str, Any]:
    """Locust's final statistics (`--json-file`) -> {"total": stat, "endpoints": {name: stat}}.

    Same figures as `read_stats`, but written at exit, so nothing of the last second is lost
    (Locust rewrites its `_stats.csv` only once a second).
    """
    entries = json.loads(Path(path).read_text())
    names = sorted({e["name"] for e in entries})
    return {
        "total": _merged(entries),
        "endpoints": {n: _merged([e for e in entries if e["name"] == n]) for n in names},
    }


def read_history(path: Path) -> list[dict[str, Any]]:
    """The Aggregated rows of `<prefix>_stats_history.csv`, one a second.

    `t` counts seconds from the first row; `rps` and `failures_per_s` are the changes in the
    cumulative counts since the previous row (Locust's own columns average over 10 s and lag);
    the percentiles are Locust's current-window ones (its last 10 s).
    """
    rows = []
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated":
                continue
            rows.append(
                {
                    "timestamp": float(row["Timestamp"]),
                    "users": int(_number(row["User Count"]) or 0),
                    "rps": _number(row["Requests/s"]) or 0.0,
                    "failures_per_s": _number(row["Failures/s"]) or 0.0,
                    **{k: _number(row[col]) for k, col in PERCENTILES.items()},
                    "requests": int(_number(row["Total Request Count"]) or 0),
                    "failures": int(_number(row["Total Failure Count"]) or 0),
                }
            )
    start = rows[0]["timestamp"] if rows else 0.0
    previous = None
    for r in rows:
        r["t"] = r["timestamp"] - start
        span = r["timestamp"] - previous["timestamp"] if previous else 0.0
        if previous and span > 0:
            r["rps"] = (r["requests"] - previous["requests"]) / span
            r["failures_per_s"] = (r["failures"] - previous["failures"]) / span
        elif previous:  # two rows in the same second: keep the earlier rate
            r["rps"], r["failures_per_s"] = previous["rps"], previous["failures_per_s"]
        else:
            r["rps"] = r["failures_per_s"] = 0.0
        previous = r
    return rows


def read_failures(path: Path, limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent failure messages of `<prefix>_failures.csv`."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = [
            {"name": r["Name"], "error": r["Error"], "occurrences": int(r["Occurrences"])}
            for r in csv.DictReader(f)
        ]
    return sorted(rows, key=lambda r: -r["occurrences"])[:limit]


def step_table(
    timings: list[dict[str, Any]], steps: list[int], step_s: float, scale: float = 1.0
) -> list[dict[str, Any]]:
    """Per-step RPS, client p50/p99 and failures from per-request rows of a step-load run.

    Step i covers [t0 + i*step_s, t0 + (i+1)*step_s), t0 being the first request's start.
    `scale` (requests seen / rows kept) corrects counts when the timing log was sampled.
    """
    if not timings:
        return []
    t0 = min(r["timestamp"] for r in timings)
    end = max(r["timestamp"] for r in timings)
    table = []
    for i, users in enumerate(steps):
        lo, hi = t0 + i * step_s, t0 + (i + 1) * step_s
        rows = [r for r in timings if lo <= r["timestamp"] < hi]
        span = max(min(hi, end) - lo, 1e-9)
        latencies = [r["client_ms"] for r in rows]
        failures = sum(1 for r in rows if not r["ok"])
        table.append(
            {
                "users": users,
                "requests": round(len(rows) * scale),
                "rps": round(len(rows) * scale / span, 2) if rows else 0.0,
                "p50_ms": round(float(np.percentile(latencies, 50)), 3) if rows else None,
                "p99_ms": round(float(np.percentile(latencies, 99)), 3) if rows else None,
                "failures": round(failures * scale),
                "failure_ratio": failures / len(rows) if rows else 0.0,
            }
        )
    return table


# -- plots -------------------------------------------------------------------------------------
def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_timeline(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """RPS (with users) and latency percentiles over time, from the stats history."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, dpi=90)
    t = [r["t"] for r in history]
    top.plot(t, [r["rps"] for r in history], color="tab:blue", label="requests/s")
    top.plot(t, [r["failures_per_s"] for r in history], color="tab:red", label="failures/s")
    top.set_ylabel("requests / s")
    users = top.twinx()
    users.step(t, [r["users"] for r in history], where="post", color="grey", alpha=0.6)
    users.set_ylabel("users", color="grey")
    top.legend(loc="upper left", fontsize=8)
    for key, color in (("p50", "tab:green"), ("p95", "tab:orange"), ("p99", "tab:red")):
        values = [np.nan if r[key] is None else r[key] for r in history]
        bottom.plot(t, values, color=color, label=key)
    bottom.set_ylabel("latency (ms, last 10 s)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", fontsize=8)
    top.set_title(title or "Throughput and client latency over time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_batches(histogram: list[dict[str, Any]], path: Path, mean: float | None) -> Path:
    """Batches executed by the server per batch-size bucket during the run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=90)
    used = [i for i, h in enumerate(histogram) if h["batches"]]
    shown = histogram[: max(used[-1] + 2 if used else 4, 4)]  # up to one bucket past the last used
    shown = [h for h in shown if h["le"] != "+Inf" or h["batches"]]
    ax.bar([h["bucket"] for h in shown], [h["batches"] for h in shown], color="tab:purple")
    ax.set_xlabel("rows per executed batch")
    ax.set_ylabel("batches")
    mean_text = "n/a" if mean is None else f"{mean:.2f}"
    ax.set_title(f"Server batch sizes during the run (mean {mean_text})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_latency_split(server_timing: dict[str, Any], path: Path) -> Path:
    """Client p50 split into the server's queue, compute, rest, and time outside the server."""
    plt = pyplot()
    views = {"all": server_timing["total"], **server_timing["endpoints"]}
    views = {k: v for k, v in views.items() if v["client_p50_ms"] is not None}
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(views) + 1.6), dpi=90)
    names = list(views)
    left = np.zeros(len(names))
    parts = (
        ("queue", "tab:orange", lambda v: v["queue_p50_ms"]),
        ("compute", "tab:green", lambda v: v["compute_p50_ms"]),
        ("rest of server", "tab:olive",
         lambda v: v["server_total_p50_ms"] - v["queue_p50_ms"] - v["compute_p50_ms"]),
        ("outside server", "tab:grey", lambda v: v["client_p50_ms"] - v["server_total_p50_ms"]),
    )  # fmt: skip
    for label, color, part in parts:
        widths = np.array([max(part(views[n]) or 0.0, 0.0) for n in names])
        ax.barh(names, widths, left=left, color=color, label=label)
        left += widths
    ax.set_xlabel("ms (medians; Server-Timing header vs client)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, ncol=4, loc="lower right")
    ax.set_title("Where a request's time goes (p50)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# -- text --------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_table(summary: dict[str, Any]) -> str:
    """A short plain-text table of the run for the terminal."""
    head = f"{'endpoint':<24} {'reqs':>8} {'fails':>6} {'rps':>9} {'p50':>7} {'p95':>7} "
    lines = [head + f"{'p99':>7} {'max':>7}  (ms)"]
    rows = [*summary["endpoints"].items(), ("TOTAL", summary["total"])]
    for name, s in rows:
        lat = s["latency_ms"]
        lines.append(
            f"{name:<24} {s['requests']:>8} {s['failures']:>6} {s['rps']:>9.1f} "
            f"{_ms(lat['p50']):>7} {_ms(lat['p95']):>7} {_ms(lat['p99']):>7} {_ms(lat['max']):>7}"
        )
    server, timing = summary.get("server") or {}, (summary.get("server_timing") or {}).get("total")
    if server:
        lines.append(
            f"server: mean batch size {server.get('mean_batch_size')}, mean queue wait "
            f"{_ms(server.get('mean_queue_ms'))} ms, failures {server.get('requests_failed') or 0}"
        )
    if timing and timing.get("client_p50_ms") is not None:
        lines.append(
            f"p50: client {_ms(timing['client_p50_ms'])} ms = server "
            f"{_ms(timing['server_total_p50_ms'])} (queue {_ms(timing['queue_p50_ms'])}, compute "
            f"{_ms(timing['compute_p50_ms'])}) + outside {_ms(timing['outside_server_p50_ms'])}"
        )
    for step in summary.get("steps") or []:
        lines.append(
            f"step {step['users']:>4} users: {step['rps']:>9.1f} rps, p50 {_ms(step['p50_ms'])}, "
            f"p99 {_ms(step['p99_ms'])} ms, {step['failures']} failures"
        )
    lines.extend(f"WARNING: {w}" for w in summary.get("warnings") or [])
    return "\n".join(lines)
