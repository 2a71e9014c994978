"""Comparisons between cells (vs baseline, batching off, ceiling) and the PASS/FAIL targets."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loadtests.bench.cells import BIG_CONNECTIONS, BIG_ROWS, NOISY_PCT, WRK_SATURATED_PCT
from loadtests.payloads import GRPC, V2_BINARY, V2_JSON


def find_cell(cells: list[dict[str, Any]], **fields: Any) -> dict[str, Any] | None:
    """The measured cell whose fields all match (rows defaults to 1), or None."""
    fields.setdefault("rows", 1)
    for cell in cells:
        if all(cell.get(k) == v for k, v in fields.items()):
            return cell
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def latency(cell: dict[str, Any] | None, p: str) -> float | None:
    """A latency percentile of a cell (microseconds), if measured."""
    if cell is None or cell.get("latency_us") is None:
        return None
    return cell["latency_us"].get(p)


def rps_of(cell: dict[str, Any] | None) -> float | None:
    """Requests per second of a cell, if measured."""
    return None if cell is None else cell.get("rps")


def ceiling(inprocess: dict[str, Any], model: str, batch: int) -> float | None:
    """Samples/s of ONNX Runtime alone at one batch size, if measured."""
    for row in inprocess.get("models", {}).get(model, {}).get("ceiling", []):
        if row["batch"] == batch:
            return row["samples_per_s"]
    return None


def attach_comparisons(cells: list[dict[str, Any]], inprocess: dict[str, Any]) -> None:
    """Add ratios to onnxserve cells: vs the baseline (v2 JSON, same model and connections), vs
    batching off (same protocol), and multi-row requests vs the in-process ceiling."""
    for cell in cells:
        if cell["server"] != "onnxserve":
            continue
        if cell["rows"] == 1:
            base = find_cell(
                cells,
                server="baseline",
                model=cell["model"],
                protocol=V2_JSON,
                conns=cell["conns"],
            )
            cell["vs_baseline"] = {
                "rps": ratio(rps_of(cell), rps_of(base)),
                "p50": ratio(latency(cell, "p50"), latency(base, "p50")),
                "p99": ratio(latency(cell, "p99"), latency(base, "p99")),
            }
        if cell["batching"] == "on":
            off = find_cell(
                cells,
                server="onnxserve",
                model=cell["model"],
                protocol=cell["protocol"],
                conns=cell["conns"],
                rows=cell["rows"],
                batching="off",
            )
            cell["vs_batching_off"] = ratio(rps_of(cell), rps_of(off))
        if cell["rows"] > 1:
            top = ceiling(inprocess, cell["model"], cell["rows"])
            cell["vs_ceiling"] = ratio(cell.get("samples_per_s"), top)


@dataclass(frozen=True)
class Target:
    """A goal: `value op threshold`, value computed from the cells."""

    id: str
    text: str
    op: str  # ">=" or "<="
    threshold: float


#: Issue 12's goals (they tightened issue 4's 1.9x, 2.4x and 1.1x).
TARGETS = (
    Target("cnn_64c_json_rps", "CNN 64 conns v2 JSON: RPS vs baseline", ">=", 2.0),
    Target("cnn_64c_json_p99", "CNN 64 conns v2 JSON: p99 vs baseline", "<=", 0.5),
    Target("cnn_1c_json_p50", "CNN 1 conn v2 JSON: p50 vs baseline", "<=", 1.0),
    Target("cnn_64c_binary_rps", "CNN 64 conns v2 binary: RPS vs baseline (v2 JSON)", ">=", 2.6),
    Target(
        "cnn_32row_ceiling",
        f"CNN {BIG_ROWS}-row binary, {BIG_CONNECTIONS[-1]} conns: samples/s vs in-process "
        f"ceiling at batch {BIG_ROWS}",
        ">=",
        0.70,
    ),
    Target("cnn_64c_grpc_rps", "CNN 64 concurrent gRPC calls: RPS vs v2 binary at 64", ">=", 1.0),
    Target(
        "cnn_32row_grpc_ceiling",
        f"CNN {BIG_ROWS}-row gRPC, {BIG_CONNECTIONS[-1]} calls: samples/s vs in-process "
        f"ceiling at batch {BIG_ROWS}",
        ">=",
        0.70,
    ),
    Target("lstm_64c_json_batching", "LSTM 64 conns v2 JSON: batching on vs off (RPS)", ">=", 1.8),
    Target(
        "lstm_64c_binary_batching", "LSTM 64 conns v2 binary: batching on vs off (RPS)", ">=", 1.8
    ),
)


def evaluate(value: float | None, op: str, threshold: float, failed_requests: int = 0) -> str:
    """PASS or FAIL: a missing value, or failed requests in the cells compared, never pass."""
    if value is None or failed_requests:
        return "FAIL"
    if op == ">=":
        return "PASS" if value >= threshold else "FAIL"
    if op == "<=":
        return "PASS" if value <= threshold else "FAIL"
    raise ValueError(f"unknown operator {op!r}")


def _target_inputs(
    target_id: str, cells: list[dict[str, Any]], inprocess: dict[str, Any]
) -> tuple[float | None, list[dict[str, Any] | None]]:
    """The value of one target and the cells it compares (onnxserve batching on by default)."""
    on = {"server": "onnxserve", "batching": "on"}
    base64 = find_cell(cells, server="baseline", model="cnn", protocol=V2_JSON, conns=64)
    if target_id in ("cnn_64c_json_rps", "cnn_64c_json_p99"):
        cell = find_cell(cells, model="cnn", protocol=V2_JSON, conns=64, **on)
        if target_id.endswith("rps"):
            return ratio(rps_of(cell), rps_of(base64)), [cell, base64]
        return ratio(latency(cell, "p99"), latency(base64, "p99")), [cell, base64]
    if target_id == "cnn_1c_json_p50":
        cell = find_cell(cells, model="cnn", protocol=V2_JSON, conns=1, **on)
        base1 = find_cell(cells, server="baseline", model="cnn", protocol=V2_JSON, conns=1)
        return ratio(latency(cell, "p50"), latency(base1, "p50")), [cell, base1]
    if target_id == "cnn_64c_binary_rps":
        cell = find_cell(cells, model="cnn", protocol=V2_BINARY, conns=64, **on)
        return ratio(rps_of(cell), rps_of(base64)), [cell, base64]
    if target_id == "cnn_64c_grpc_rps":
        cell = find_cell(cells, model="cnn", protocol=GRPC, conns=64, **on)
        binary = find_cell(cells, model="cnn", protocol=V2_BINARY, conns=64, **on)
        return ratio(rps_of(cell), rps_of(binary)), [cell, binary]
    if target_id in ("cnn_32row_ceiling", "cnn_32row_grpc_ceiling"):
        protocol = GRPC if "_grpc_" in target_id else V2_BINARY
        cell = find_cell(
            cells,
            model="cnn",
            protocol=protocol,
            conns=BIG_CONNECTIONS[-1],
            rows=BIG_ROWS,
            **on,
        )
        samples = None if cell is None else cell.get("samples_per_s")
        return ratio(samples, ceiling(inprocess, "cnn", BIG_ROWS)), [cell]
    if target_id.startswith("lstm_64c_"):
        protocol = V2_JSON if "_json_" in target_id else V2_BINARY
        cell = find_cell(cells, model="lstm", protocol=protocol, conns=64, **on)
        off = find_cell(
            cells, server="onnxserve", model="lstm", protocol=protocol, conns=64, batching="off"
        )
        return ratio(rps_of(cell), rps_of(off)), [cell, off]
    raise KeyError(target_id)


def evaluate_targets(
    cells: list[dict[str, Any]], inprocess: dict[str, Any], server_cores: int = 1
) -> list[dict[str, Any]]:
    """Every target with its value, PASS/FAIL and a note (errors, generator saturation)."""
    results = []
    for target in TARGETS:
        value, involved = _target_inputs(target.id, cells, inprocess)
        notes = []
        if any(c is None or c.get("error") for c in involved):
            notes.append("a cell was not measured")
        failed = sum(c.get("failed_requests", 0) for c in involved if c)
        if failed:
            notes.append(f"{failed} failed requests")
        if any(c and c.get("wrk_saturated") for c in involved):
            notes.append(f"wrk CPU >= {WRK_SATURATED_PCT:.0f}%: generator-bound")
        if any(c and c.get("noisy") for c in involved):
            notes.append(f"noisy: other processes took >= {NOISY_PCT:.0f}% of the server's CPU")
        if server_cores != 1:
            notes.append(f"server on {server_cores} cores; targets assume one")
        results.append(
            {
                **asdict(target),
                "value": value,
                "status": evaluate(value, target.op, target.threshold, failed),
                "note": "; ".join(notes),
            }
        )
    return results
