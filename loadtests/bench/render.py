"""results.json as markdown: results.md and the docs page (docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtests.bench.cells import NOISY_PCT, WRK_SATURATED_PCT
from loadtests.bench.targets import ceiling, latency, ratio


def fmt(x: float | None, spec: str = ",.0f", suffix: str = "") -> str:
    """A number in `spec` format with `suffix`, or an en dash when missing."""
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _ms(cell: dict[str, Any], p: str) -> str:
    v = latency(cell, p)
    return fmt(None if v is None else v / 1000, ".2f")


def _server_name(cell: dict[str, Any]) -> str:
    if cell["server"] == "baseline":
        return "baseline (FastAPI)"
    return f"onnxserve, batching {cell['batching']}"


def render_markdown(results: dict[str, Any], level: int = 1) -> str:
    """results.json as markdown tables (headings start at `level`)."""
    h = "#" * level
    m, cfg = results["machine"], results["config"]
    out = [f"{h} onnxserve benchmark", ""]
    if results["config"]["quick"]:
        out += ["> **Quick mode** (short cells): a smoke run; figures are indicative only.", ""]
    pk = m["packages"]
    models = ", ".join(f"{k} v{v['version']}" for k, v in cfg["models"].items())
    out += [
        f"- Command: `{results['command']}`",
        f"- When: {results['started']} → {results['finished']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores; {m['platform']}",
        f"- Versions: Python {m['python']}, onnxruntime {pk['onnxruntime']}, numpy {pk['numpy']}, "
        f"fastapi {pk['fastapi']}, uvicorn {pk['uvicorn']}, {m['wrk']}",
        f"- Pinning: server on CPU {cfg['server_cpus']} ({cfg['threads']} intra-op thread(s)), "
        f"wrk on CPU {cfg['wrk_cpus']} (1 thread); {cfg['seconds']} s per cell after a "
        f"{cfg['warmup']} s warm-up"
        + (f"; {cfg['rounds']} rounds, each cell its median" if cfg.get("rounds", 1) > 1 else ""),
        f"- Load average (1/5/15 min) at start {results['load_average']['start']}, "
        f"at end {results['load_average']['end']}",
        f"- Repository: `{cfg['repository']}` ({models})",
        "",
        f"{h}# Targets (CNN single-sample unless said; onnxserve with batching on)",
        "",
        "| Target | Measured | Goal | Result | Note |",
        "|---|---:|---:|:---:|---|",
    ]
    for t in results["targets"]:
        share = t["id"].endswith("_ceiling")  # a share of the ceiling, not a ratio
        unit = "" if share else "×"
        value = fmt(t["value"], ".0%") if share else fmt(t["value"], ".2f")
        goal = f"{t['op']} {t['threshold']:.0%}" if not unit else f"{t['op']} {t['threshold']}×"
        out.append(f"| {t['text']} | {value}{unit} | {goal} | **{t['status']}** | {t['note']} |")

    inproc = results["inprocess"]
    out += [
        "",
        f"{h}# In-process ceiling: ONNX Runtime alone on the server's core",
        "",
        "| Model | Batch | Samples/s | ms per batch |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in inproc.get("models", {}).items():
        for row in entry["ceiling"]:
            out.append(
                f"| {name} | {row['batch']} | {fmt(row['samples_per_s'])} | "
                f"{row['ms_per_batch']:.3f} |"
            )
    gain = ratio(ceiling(inproc, "lstm", 8), ceiling(inproc, "lstm", 1))
    out += [
        "",
        f"LSTM ceiling, batch 8 vs batch 1: {fmt(gain, '.2f')}× samples/s. Other processes took "
        f"{fmt(inproc.get('other_cpu_pct'), '.0f', '%')} of the server's CPU meanwhile.",
    ]
    out += [
        "",
        f"{h}# In-process floor: service.codec decode → run → encode, no HTTP",
        "",
        "| Model | Request | Rows | Body bytes | Req/s | Samples/s | decode µs | run µs | "
        "encode µs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in inproc.get("models", {}).items():
        for row in entry["floor"]:
            us = row["us"]
            out.append(
                f"| {name} | {row['protocol']} | {row['rows']} | {row['body_bytes']:,} | "
                f"{fmt(row['req_per_s'])} | {fmt(row['samples_per_s'])} | {us['decode']:.0f} | "
                f"{us['run']:.0f} | {us['encode']:.0f} |"
            )
    out += [
        "",
        f"{h}# Over the network (closed loops: wrk for HTTP, loadtests.bench.grpcload for gRPC)",
        "",
        "For gRPC cells *Conns* is concurrent calls on one HTTP/2 connection and *Client CPU* "
        "the gRPC generator's. "
        "Ratios are against the baseline's v2 JSON cell with the same model and connections; "
        "*on/off* is batching on vs off. *Req/CPU-s* is requests per second of server CPU time. "
        "*Other CPU* is the share of the server's core that other processes took during the cell "
        f"(† at ≥ {NOISY_PCT:.0f}%: the figures are disturbed). ⚠ marks the load generator at "
        f"≥ {WRK_SATURATED_PCT:.0f}% CPU (generator-bound: a lower bound for the server).",
        "",
        "| Server | Model | Protocol | Rows | Conns | Req/s | Samples/s | p50 ms | p90 ms | "
        "p99 ms | Errors | Mean batch | Server CPU | Req/CPU-s | Other CPU | Client CPU | "
        "RPS × base | p99 × base | p50 × base | on/off |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|",
    ]
    for c in results["cells"]:
        lead = f"| {_server_name(c)} | {c['model']} | {c['protocol']} | {c['rows']} | {c['conns']}"
        if c.get("error"):
            out.append(f"{lead} | error: {c['error'][:120]} |" + " |" * 14)
            continue
        vs = c.get("vs_baseline") or {}
        cpu = c["cpu_pct"]
        warn = " ⚠" if c.get("wrk_saturated") else ""
        other = (c.get("other_cpu_pct") or {}).get("server_cpus")
        dagger = " †" if c.get("noisy") else ""
        out.append(
            f"{lead} | {fmt(c['rps'])} | {fmt(c['samples_per_s'])} | {_ms(c, 'p50')} | "
            f"{_ms(c, 'p90')} | {_ms(c, 'p99')} | {c['failed_requests']:,} | "
            f"{fmt(c.get('mean_batch_size'), '.1f')} | {cpu['server']:.0f}% | "
            f"{fmt(c.get('rps_per_server_cpu_s'))} | {fmt(other, '.0f', '%')}{dagger} | "
            f"{cpu['wrk']:.0f}%{warn} | {fmt(vs.get('rps'), '.2f')} | "
            f"{fmt(vs.get('p99'), '.2f')} | {fmt(vs.get('p50'), '.2f')} | "
            f"{fmt(c.get('vs_batching_off'), '.2f')} |"
        )
    big = [c for c in results["cells"] if c["rows"] > 1 and c.get("vs_ceiling") is not None]
    if big:
        out += [""] + [
            f"{c['model']} {c['rows']}-row {c['protocol']} at {c['conns']} conns: "
            f"{fmt(c['vs_ceiling'], '.0%')} of the in-process ceiling at batch {c['rows']}."
            for c in big
        ]
    return "\n".join(out) + "\n"


DOC_INTRO = """\
# Benchmarks

How fast onnxserve is on CPU, against the two numbers that bound it — ONNX Runtime alone on
the same model file (the **ceiling**) and the same codec without HTTP (the **floor**) — and
against what a user would write instead: a plain FastAPI app with an async endpoint at the same
v2 path, orjson in and out, one ONNX Runtime call per request, no batching
(`loadtests/baselines/fastapi_baseline.py`).

## Running it

```
.venv/bin/python -m loadtests.bench               # full run, ~8 min; writes this page
.venv/bin/python -m loadtests.bench --quick       # smoke run, 2 s cells, ~3 min
.venv/bin/python -m loadtests.bench --rounds 3    # each cell its median of 3 passes, ~20 min
.venv/bin/python -m loadtests.bench --render runs/bench/results.json --docs docs/benchmarks.md
.venv/bin/python -m loadtests.bench.layers        # CPU a request, layer by layer, ~3 min
.venv/bin/python -m loadtests.bench.stages        # CPU a request by stage (py-spy), per tree
```

The last two explain a figure rather than set one (docs/performance.md).

The benchmark needs `wrk` (installed with apt when missing and run as root) and the model
repository (`make build`). Results go to `--out` (default `runs/bench`): `results.json`,
`results.md`, the request bodies, and each process's log.

## Method

- The server is pinned to one core (`taskset -c 0`, one intra-op thread) and wrk to another
  (`taskset -c 1`, one thread, `-c 1/16/64`), so that the two never compete. The in-process
  measurements run pinned to the server's core with the server's own session options
  (`service.runtime.ModelRuntime`).
- The three servers (baseline, onnxserve with batching on, with batching off) are up at once,
  all idle but the one under load, and the cells that are compared run one after the other
  (baseline, on, off for each model and connection count), so drift in a shared machine's load
  biases the ratios less.
- Each cell has a warm-up run, then a measured run. With `--rounds N` the whole plan runs N
  times and each cell reports its median round (by requests/s; `rps_rounds` in the JSON has
  every round's): on a shared machine one cell can move by a third between rounds.
- Payloads are real held-out samples from the model's `samples.npz`, cycled (16 distinct bodies
  per cell). Before each cell one request is checked for a 200 answer, so an error path can never
  be measured as a fast one.
- `ONNXSERVE_*` variables in the environment reach the onnxserve servers (and are recorded), e.g.
  `ONNXSERVE_FAST_LANE=false` to measure the FastAPI routes instead of the fast lane.
- wrk is a closed loop: each connection sends its next request when the last is answered, so its
  percentiles suffer coordinated omission; compare them between cells of the same run, not with
  an open-loop tool. Errors are wrk's non-2xx (status > 399) plus socket errors.
- wrk cannot speak gRPC (HTTP/2), and `ghz` is not installable here, so the gRPC cells use
  `loadtests.bench.grpcload`: the same closed loop in Python (grpc.aio on uvloop, one channel,
  `-c` concurrent calls, pre-serialized requests sent as bytes), pinned where wrk is, reporting
  wrk's fields. It costs more CPU per call than wrk: watch its ⚠. The gRPC cells run on the
  batching-on server, right after the REST cells of the same model and connections.
- Both processes' CPU time is read during each cell (`/proc/<pid>/stat` for the server, the
  child's rusage for wrk). A cell where wrk used ≥ 90% of its core is generator-bound and marked ⚠.
  The per-CPU counters of `/proc/stat` give the share of the server's core that *other*
  processes took during the cell; at ≥ 10% the cell is marked † (noisy). *Req/CPU-s* (requests
  per second of server CPU time) is the figure least disturbed by such neighbours. Trust only
  quiet cells: the kernel shares a busy core per thread, so under contention onnxserve (event
  loop + ONNX Runtime thread) keeps more of it than the single-threaded baseline does.
- Mean batch size is the delta of `onnxserve_inference_count_total` over the delta of
  `onnxserve_inference_exec_count_total` during the measured run.
- Targets compare cells of the same run only; a target whose cells had failed requests fails.

"""


def render_docs(results: dict[str, Any]) -> str:
    """docs/benchmarks.md: the method, then the results of one run."""
    return DOC_INTRO + "## Results\n\n" + render_markdown(results, level=3)


def _kept_scale_section(docs: Path) -> str:
    """The --scale benchmark's section of an existing page (it has its own run), to keep."""
    from loadtests.bench.scale import SECTION_BEGIN, SECTION_END

    text = docs.read_text() if docs.is_file() else ""
    start, end = text.find(SECTION_BEGIN), text.find(SECTION_END)
    if start < 0 or end < start:
        return ""
    return "\n" + text[start : end + len(SECTION_END)] + "\n"


def write_reports(results: dict[str, Any], out: Path, docs: Path | None) -> None:
    """results.json, results.md and, if asked, the docs page."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render_markdown(results))
    if docs is not None:
        docs.parent.mkdir(parents=True, exist_ok=True)
        docs.write_text(render_docs(results) + _kept_scale_section(docs))


def write_results(out: Path, results: dict[str, Any], table: str) -> None:
    """The results as JSON at `out` and their markdown table beside it (printed too)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(table)
    print(table)
