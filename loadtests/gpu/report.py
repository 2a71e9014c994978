"""The GPU check's verdicts against the issue's targets, and its Markdown report."""

from __future__ import annotations

from typing import Any

FP32_MAX_ABS_DIFF = 1e-4
FP16_ACCURACY_DROP = 0.005  # CNN accuracy may drop by half a point
FP16_RMSE_RISE = 0.02  # LSTM RMSE may rise by 2 %
SERVED_SHARE_256 = 0.5  # served 256-row rows/s over in-process rows/s at batch 256
BATCHING_GAIN = 3.0  # single-sample req/s at 64 connections, batching on over off


def _target(name: str, value: float | bool | None, rule: str, met: bool | None) -> dict:
    return {"target": name, "value": value, "rule": rule, "met": met}


def _row(table: list[dict], **match: Any) -> dict | None:
    return next((r for r in table if all(r.get(k) == v for k, v in match.items())), None)


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it is met (None: not measured)."""
    parity = result.get("parity", [])
    found = []
    for row in parity:
        if row["kind"] == "fp32":
            worst = max(row["max_abs_diff"].values(), default=None)
            found.append(
                _target(
                    f"{row['model']} FP32 max abs diff vs CPU",
                    worst,
                    f"<= {FP32_MAX_ABS_DIFF:g}",
                    None if worst is None else worst <= FP32_MAX_ABS_DIFF,
                )
            )
            if "labels_identical" in row:
                same = row["labels_identical"]
                found.append(
                    _target(f"{row['model']} FP32 labels identical", same, "identical", same)
                )
    fp16_rules = {
        "accuracy": (
            f"drop <= {FP16_ACCURACY_DROP:g}",
            lambda d, ref: ref - d <= FP16_ACCURACY_DROP,
        ),
        "rmse": (f"rise <= {FP16_RMSE_RISE:.0%}", lambda d, ref: d <= ref * (1 + FP16_RMSE_RISE)),
    }
    for model, metric in (("cnn", "accuracy"), ("lstm", "rmse")):
        row = _row(parity, model=model, kind="fp16")
        rule, ok = fp16_rules[metric]
        if row is None or row.get("device_value") is None:
            found.append(_target(f"{model} FP16 {metric}", None, rule, None))
            continue
        value, ref = row["device_value"], row["fp32_cpu_value"]
        found.append(
            _target(f"{model} FP16 {metric} (FP32 CPU {ref:.4g})", value, rule, ok(value, ref))
        )
    inproc = _row(result.get("throughput", []), model="cnn", mode="run", batch=256)
    served = _row(result.get("served", []), model="cnn", rows=256, batching=True)
    share = None
    if inproc and served and inproc["rows_per_s"]:
        share = served["rows_per_s"] / inproc["rows_per_s"]
    found.append(
        _target(
            "cnn served 256-row rows/s over in-process batch 256",
            share,
            f">= {SERVED_SHARE_256:.0%}",
            None if share is None else share >= SERVED_SHARE_256,
        )
    )
    on = _row(result.get("served", []), model="cnn", rows=1, connections=64, batching=True)
    off = _row(result.get("served", []), model="cnn", rows=1, connections=64, batching=False)
    gain = on["rps"] / off["rps"] if on and off and off["rps"] else None
    found.append(
        _target(
            "cnn single-sample c=64 batching on over off",
            gain,
            f">= {BATCHING_GAIN:g}x",
            None if gain is None else gain >= BATCHING_GAIN,
        )
    )
    return found


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    """The report as Markdown: machine, verdicts, then each step's table."""
    out = ["# GPU check", ""]
    if result.get("simulated"):
        out += ["**Simulated on the CPU provider: a self-test of the check, not GPU figures.**", ""]
    if result.get("no_gpu"):
        out += [f"**No usable GPU: {result['no_gpu']}**", "", "Nothing was measured.", ""]
    ort = result.get("onnxruntime", {})
    gpus = result.get("gpus", {})
    out += [
        f"- GPU: {', '.join(d.get('name', '?') for d in gpus.get('devices', [])) or '-'}",
        f"- driver: {_fmt((gpus.get('devices') or [{}])[0].get('driver_version'))}, "
        f"CUDA {_fmt(gpus.get('driver_cuda'))}",
        f"- onnxruntime: {_fmt(ort.get('version'))} ({', '.join(ort.get('distributions', []))}),"
        f" built for CUDA {_fmt(ort.get('cuda_version'))}; providers "
        f"{', '.join(ort.get('providers', []))}",
        f"- started {result.get('started', '-')}, took {_fmt(result.get('seconds'))} s",
        "",
    ]
    if result.get("targets"):
        out += ["## Targets", ""]
        out += _table(
            ["target", "value", "rule", "met"],
            [[t["target"], t["value"], t["rule"], t["met"]] for t in result["targets"]],
        )
    if result.get("parity"):
        out += ["## Parity and placement (device vs CPU, held-out samples)", ""]
        out += _table(
            [
                "model",
                "graph",
                "provider",
                "max abs diff",
                "metric",
                "device",
                "CPU",
                "nodes",
                "compute on CPU",
            ],
            [
                [
                    r["model"],
                    r["kind"],
                    r["provider"],
                    max(r["max_abs_diff"].values(), default=None),
                    r["metric"],
                    r["device_value"],
                    r["cpu_value"],
                    ", ".join(f"{k}: {v}" for k, v in r["nodes"].items()),
                    ", ".join(r["cpu_compute_nodes"]) or "-",
                ]
                for r in result["parity"]
            ],
        )
    if result.get("throughput"):
        out += ["## In-process rows/s (FP32)", ""]
        out += _table(
            ["model", "mode", "batch", "rows/s", "ms/batch", "note"],
            [
                [
                    r["model"],
                    r["mode"],
                    r.get("batch"),
                    r.get("rows_per_s"),
                    r.get("ms_per_batch"),
                    r.get("why", ""),
                ]
                for r in result["throughput"]
            ],
        )
    if result.get("first_request"):
        out += ["## First request at an unseen batch size", ""]
        out += _table(
            ["model", "warmed", "unseen batch", "first ms", "steady ms"],
            [
                [
                    r["model"],
                    f"{r['warmed_count']} sizes {r['warmed_sizes']}",
                    r["unseen_batch"],
                    r["first_ms"],
                    r["steady_ms"],
                ]
                for r in result["first_request"]
            ],
        )
    if result.get("memory"):
        out += ["## GPU memory per instance", ""]
        out += _table(
            ["model", "instances", "MiB per instance", "read from"],
            [
                [r["model"], r["instances"], r["per_instance_mib"], r["measured"]]
                for r in result["memory"]
            ],
        )
    if result.get("served"):
        out += ["## Served (v2 binary)", ""]
        out += _table(
            ["cell", "batching", "req/s", "rows/s", "p50 ms", "p99 ms", "non-2xx", "tool"],
            [
                [
                    r["cell"],
                    r["batching"],
                    r["rps"],
                    r["rows_per_s"],
                    r["latency_ms"]["p50"],
                    r["latency_ms"]["p99"],
                    r["non2xx"],
                    r["tool"],
                ]
                for r in result["served"]
            ],
        )
    if result.get("errors"):
        out += ["## Steps that failed", ""]
        out += [f"- {step}: {why}" for step, why in result["errors"].items()] + [""]
    return "\n".join(out)
