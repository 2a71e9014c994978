"""CPU accounting from /proc: a process's ticks, per-CPU busy time, other processes' share."""

from __future__ import annotations

import re
from pathlib import Path


def parse_proc_stat(text: str) -> int:
    """utime + stime (clock ticks, all threads) from the text of /proc/<pid>/stat."""
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def parse_cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) clock ticks from the text of /proc/stat."""
    times = {}
    for line in text.splitlines():
        match = re.match(r"cpu(\d+)\s+(.*)", line)
        if match:
            ticks = [int(x) for x in match.group(2).split()[:8]]  # guest time is inside user
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            times[int(match.group(1))] = (sum(ticks) - idle, sum(ticks))
    return times


def foreign_cpu_pct(
    before: dict[int, tuple[int, int]],
    after: dict[int, tuple[int, int]],
    cpus: list[int],
    own_ticks: float,
) -> float:
    """Share (%) of `cpus` used by processes other than ours (`own_ticks`) between two reads."""
    busy = sum(after[c][0] - before[c][0] for c in cpus if c in before and c in after)
    total = sum(after[c][1] - before[c][1] for c in cpus if c in before and c in after)
    return max(0.0, 100 * (busy - own_ticks) / total) if total > 0 else 0.0


def parse_cpu_list(text: str) -> list[int]:
    """CPUs in taskset's list form: "0", "0,2", "0-3"."""
    cpus: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return sorted(set(cpus))


def process_ticks(pid: int) -> int:
    """CPU clock ticks (user + system, all threads) a live process has used."""
    return parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())


def main_thread_ticks(pid: int) -> int:
    """CPU clock ticks a live process's main thread (the event loop's) has used."""
    return parse_proc_stat(Path(f"/proc/{pid}/task/{pid}/stat").read_text())


def cpu_times() -> dict[int, tuple[int, int]]:
    """Per-CPU (busy, total) ticks now."""
    return parse_cpu_times(Path("/proc/stat").read_text())
