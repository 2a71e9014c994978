"""Capacity search: raise the users step by step until the latency SLO breaks.

Each step is its own short Locust run (statistics reset once its users are spawned), so every
step's RPS and p99 are measured at a steady user count. The capacity is the highest RPS of a
step whose client p99 is within the SLO with fewer than `max_failure_ratio` failures; the search
stops at the first step that breaks the SLO.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.report import pyplot
from loadtests.runner import CPU_LIMIT, LoadSpec, run_once

MAX_FAILURE_RATIO = 0.001


def doubling(max_users: int, start: int = 1) -> list[int]:
    """1, 2, 4, ... up to `max_users`, which ends the list even if it is not a power of two."""
    if max_users < start or start < 1:
        raise ValueError(f"need 1 <= start ({start}) <= max users ({max_users})")
    steps, users = [], start
    while users < max_users:
        steps.append(users)
        users *= 2
    return [*steps, max_users]


def step_row(users: int, summary: dict[str, Any]) -> dict[str, Any]:
    """The table row of one step, from that step's run summary."""
    total, server = summary["total"], summary.get("server") or {}
    cpu = (summary.get("load_generator") or {}).get("mean_percent")
    return {
        "users": users,
        "requests": total["requests"],
        "rps": total["rps"],
        "p50_ms": total["latency_ms"]["p50"],
        "p99_ms": total["latency_ms"]["p99"],
        "failures": total["failures"],
        "failure_ratio": total["failure_ratio"],
        "mean_batch_size": server.get("mean_batch_size"),
        "mean_queue_ms": server.get("mean_queue_ms"),
        "locust_cpu_percent": cpu,
        "client_cpu_bound": any("CPU-bound" in w for w in summary.get("warnings") or []),
    }


def meets_slo(row: dict[str, Any], slo_p99_ms: float, max_failure_ratio: float) -> bool:
    """A step holds the SLO when it made requests, its p99 <= the SLO and failures < the limit."""
    p99 = row.get("p99_ms")
    return (
        row.get("requests", 0) > 0
        and p99 is not None
        and p99 <= slo_p99_ms
        and row.get("failure_ratio", 1.0) < max_failure_ratio
    )


def decide(
    rows: list[dict[str, Any]], slo_p99_ms: float, max_failure_ratio: float = MAX_FAILURE_RATIO
) -> dict[str, Any] | None:
    """The step with the highest RPS among those that hold the SLO (None if none does)."""
    passing = [r for r in rows if meets_slo(r, slo_p99_ms, max_failure_ratio)]
    return max(passing, key=lambda r: r["rps"]) if passing else None


def find_capacity(
    spec: LoadSpec,
    users: list[int],
    slo_p99_ms: float,
    out: Path,
    max_failure_ratio: float = MAX_FAILURE_RATIO,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run `spec` at each user count of `users` (spec.step_s each) until the SLO breaks.

    Writes `capacity.json`, `capacity.md` and `capacity.png` into `out`, each step's Locust files
    under `out/steps/`, and returns the result.
    """
    rows: list[dict[str, Any]] = []
    stopped = None
    for i, n in enumerate(users, 1):
        step = dataclasses.replace(
            spec, users=n, spawn_rate=None, duration_s=spec.step_s, steps=None, reset_stats=True
        )
        summary = run_once(step, out / "steps" / f"{i:02d}-users-{n}", plots=False)
        row = step_row(n, summary)
        row["meets_slo"] = meets_slo(row, slo_p99_ms, max_failure_ratio)
        rows.append(row)
        if progress:
            progress(row)
        if not row["meets_slo"]:
            stopped = f"{n} users broke the SLO"
            break
    best = decide(rows, slo_p99_ms, max_failure_ratio)
    result = {
        "config": {**dataclasses.asdict(spec), "repository": str(spec.repository)},
        "slo_p99_ms": slo_p99_ms,
        "max_failure_ratio": max_failure_ratio,
        "users_planned": users,
        "steps": rows,
        "stopped_early": stopped,
        "capacity": best,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "capacity.md").write_text(markdown(result))
    plot_capacity(result, out / "capacity.png")
    return result


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict[str, Any]) -> str:
    """The step table and the verdict as Markdown."""
    slo, limit = result["slo_p99_ms"], result["max_failure_ratio"]
    lines = [
        f"# Capacity search: p99 <= {slo:g} ms, failures < {100 * limit:g}%",
        "",
        "| users | RPS | p50 ms | p99 ms | failures | mean batch | mean queue ms | "
        "Locust CPU % | meets SLO |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in result["steps"]:
        cpu = _fmt(r["locust_cpu_percent"], 0) + (" (bound)" if r["client_cpu_bound"] else "")
        lines.append(
            f"| {r['users']} | {_fmt(r['rps'])} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
            f"{r['failures']} ({100 * r['failure_ratio']:.2f}%) | {_fmt(r['mean_batch_size'], 2)} "
            f"| {_fmt(r['mean_queue_ms'], 2)} | {cpu} | {'yes' if r['meets_slo'] else 'no'} |"
        )
    best = result["capacity"]
    lines.append("")
    if best:
        lines.append(
            f"**Capacity: {best['rps']:.1f} requests/s** at {best['users']} users "
            f"(p99 {_fmt(best['p99_ms'])} ms)."
        )
    else:
        lines.append("**No step met the SLO.**")
    if result["stopped_early"]:
        lines.append(f"Stopped early: {result['stopped_early']}.")
    elif best and best == result["steps"][-1]:
        lines.append(
            "The SLO held up to the last step: the capacity is at least this; raise --max-users."
        )
    if any(r["client_cpu_bound"] for r in result["steps"]):
        lines.append(
            f"Some steps had the load generator above {CPU_LIMIT:g}% CPU: their RPS is a lower "
            "bound on the server's; rerun with more Locust processes or machines."
        )
    return "\n".join(lines) + "\n"


def plot_capacity(result: dict[str, Any], path: Path) -> Path:
    """RPS and p99 against users, with the SLO line and the capacity marked."""
    plt = pyplot()
    rows = result["steps"]
    users = [r["users"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4), dpi=90)
    left.plot(users, [r["rps"] for r in rows], "o-", color="tab:blue", label="requests/s")
    left.set_xscale("log", base=2)
    left.set_xlabel("users (concurrent closed-loop clients)")
    left.set_ylabel("requests / s", color="tab:blue")
    right = left.twinx()
    p99 = [float("nan") if r["p99_ms"] is None else r["p99_ms"] for r in rows]
    right.plot(users, p99, "s-", color="tab:red", label="p99 latency")
    right.axhline(result["slo_p99_ms"], color="tab:red", linestyle="--", alpha=0.6, label="SLO")
    right.set_ylabel("p99 latency (ms)", color="tab:red")
    highest = max([result["slo_p99_ms"], *(v for v in p99 if v == v)])  # v == v: not NaN
    right.set_ylim(0, highest * 1.25)
    left.set_ylim(0, max([r["rps"] for r in rows] + [1.0]) * 1.25)
    left.set_xticks(users, [str(u) for u in users])
    left.minorticks_off()
    best = result["capacity"]
    title = "Capacity search"
    if best:
        left.plot([best["users"]], [best["rps"]], "*", color="gold", markersize=16, zorder=5)
        title += f": {best['rps']:.0f} req/s within p99 <= {result['slo_p99_ms']:g} ms"
    left.set_title(title, fontsize=10)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
