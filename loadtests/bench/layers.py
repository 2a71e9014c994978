"""Server CPU per request, layer by layer, in one run: what the kernel and event loop, the decode,
onnxserve's dataplane and onnxserve's HTTP server each add to a request.

    .venv/bin/python -m loadtests.bench.layers [--protocol v2-json] [--conns 64] [--seconds 5]
        [--rounds 3] [--out runs/layers.json]

Four servers take the same wrk load (CNN single sample, the benchmark's requests), each pinned
to CPU 0 with one ONNX Runtime thread, wrk on CPU 1, measured one after the other in each round
so that drift on a shared machine biases them alike:

- `loop`: a bare uvloop protocol that splits requests off the stream and answers each with a
  fixed body the size of a CNN answer: the floor of the kernel, uvloop and the client;
- `decode`: the same, decoding each body as onnxserve does (`codec.decode_request`);
- `dataplane`: the same protocol over onnxserve's DataPlane (`begin_v2`, `end_v2`: decode,
  validation, the batcher, ONNX Runtime in its thread, encode, metrics, statistics), its answers
  written at the end of the loop's turn as onnxserve writes them (`httpserver.Outbox`), without
  uvicorn, the direct lane, the guard, timeouts or limits;
- `onnxserve`: `onnxserve serve` itself.

CPU per request is the server process's CPU time over the requests wrk completed. The bare
protocol (`python -m loadtests.bench.layers serve LAYER PORT`) expects well-formed requests with a
Content-Length, as wrk sends them: it is a measuring device, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadtests.bench.cells import CellSpec
from loadtests.bench.cpu import process_ticks
from loadtests.bench.measure import write_manifest
from loadtests.bench.models import load_model_info
from loadtests.bench.render import write_results
from loadtests.bench.wrk import ensure_wrk, parse_wrk_output, run_wrk
from loadtests.serverproc import ROOT, free_port, serve_command, serving
from service.codec import HEADER_LENGTH, decode_request

LAYERS = ("loop", "decode", "dataplane", "onnxserve")
#: The fixed answer of the `loop` and `decode` layers: a CNN answer's size (~400 bytes).
FIXED_BODY = (
    b'{"model_name":"cnn","model_version":"1","outputs":[{"name":"probabilities",'
    b'"datatype":"FP32","shape":[1,10],"data":[' + b",".join([b"0.0999999"] * 10) + b']},'
    b'{"name":"label","datatype":"INT64","shape":[1],"data":[4]}]}'
)  # fmt: skip
FIXED_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    % len(FIXED_BODY)
) + FIXED_BODY


def split_request(buffer: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(head, body, rest) of the first whole request in `buffer`, or None until it is all in.
    The head keeps its line ends; the body is Content-Length bytes (none without one)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[: end + 2]
    lower = head.lower()
    at = lower.find(b"\r\ncontent-length:")
    length = int(head[at + 17 : head.index(b"\r\n", at + 2)]) if at >= 0 else 0
    start = end + 4
    if len(buffer) < start + length:
        return None
    return head, buffer[start : start + length], buffer[start + length :]


def _header_length(head: bytes) -> str | None:
    """The request's Inference-Header-Content-Length, if it has one."""
    name = HEADER_LENGTH.encode() + b":"
    at = head.lower().find(name)
    if at < 0:
        return None
    return head[at + len(name) : head.index(b"\r\n", at)].strip().decode()


class BareProtocol(asyncio.Protocol):
    """Splits requests off the stream and hands each POST to `answer` (GETs get FIXED_ANSWER)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        while (request := split_request(buffer)) is not None:
            head, body, buffer = request
            assert self.transport is not None
            if head.startswith(b"POST "):
                self.answer(self.transport, head, body)
            else:
                self.transport.write(FIXED_ANSWER)
        self.buffer = buffer


def _fixed(transport: asyncio.Transport, head: bytes, body: bytes) -> None:
    transport.write(FIXED_ANSWER)


def _decoded(transport: asyncio.Transport, head: bytes, body: bytes) -> None:
    decode_request(body, _header_length(head))
    transport.write(FIXED_ANSWER)


async def _serve(layer: str, port: int, repository: Path, model: str) -> None:
    loop = asyncio.get_running_loop()
    if layer != "dataplane":
        answer = _fixed if layer == "loop" else _decoded
        server = await loop.create_server(lambda: BareProtocol(answer), "127.0.0.1", port)
        await server.serve_forever()
        return
    from service.app import create_app
    from service.config import Settings
    from service.httpserver import OneWrite, Outbox, encode_answer

    settings = Settings(repository=repository, models=[model], intra_op_threads=1, grpc_port=0)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        dataplane, outbox = app.state.dataplane, Outbox()

        def infer(transport: asyncio.Transport, head: bytes, body: bytes) -> None:
            headers = {"content-type": "application/json"}
            header_length = _header_length(head)
            if header_length is not None:
                headers[HEADER_LENGTH] = header_length
            started = dataplane.begin_v2(model, None, body, headers)
            if not isinstance(started, tuple):  # refused: an Answer
                transport.write(encode_answer(started, True))
                return
            call, pending = started
            writer = OneWrite(transport, outbox)
            pending.future.add_done_callback(
                lambda done: writer.write_whole(encode_answer(dataplane.end_v2(call, done), True))
            )

        server = await loop.create_server(lambda: BareProtocol(infer), "127.0.0.1", port)
        await server.serve_forever()


def layer_command(layer: str, port: int, repository: Path, model: str) -> list[str]:
    """The command that serves `layer` on `port`."""
    if layer == "onnxserve":
        return serve_command(repository, "--threads", "1", "--models", model, port=port)
    return [sys.executable, "-m", "loadtests.bench.layers", "serve", layer, str(port),
            "--repository", str(repository), "--model", model]  # fmt: skip


def measure(layer: str, args: argparse.Namespace, manifest: Path, workdir: Path) -> dict:
    """One layer, one round: requests/s and server CPU µs per request."""
    port = free_port()
    cmd = layer_command(layer, port, args.repository.resolve(), "cnn")
    url = f"http://127.0.0.1:{port}"
    env = {"OMP_NUM_THREADS": "1"}
    with serving(cmd, workdir / f"{layer}.log", f"{url}/v2/health/ready", cpus="0",
                 env=env) as process:  # fmt: skip
        run_wrk(url, manifest, args.conns, 2, "1", workdir / "warm.log")
        ticks = process_ticks(process.pid)
        out, _, _ = run_wrk(url, manifest, args.conns, args.seconds, "1", workdir / "wrk.log")
        ticks = process_ticks(process.pid) - ticks
    done = parse_wrk_output(out)
    per_request = 1e6 / os.sysconf("SC_CLK_TCK") / max(1, done["requests"])
    return {"rps": round(done["rps"], 1), "non2xx": done["non2xx"],
            "cpu_us_per_request": round(ticks * per_request, 1)}  # fmt: skip


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A layer's rounds: medians, and every round's figure."""
    return {
        "rps": statistics.median(r["rps"] for r in rounds),
        "rps_all": [r["rps"] for r in rounds],
        "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in rounds),
        "cpu_us_all": [r["cpu_us_per_request"] for r in rounds],
        "non2xx": sum(r["non2xx"] for r in rounds),
    }


def render(results: dict[str, Any]) -> str:
    """A markdown table: each layer's CPU per request, and what it adds to the one before."""
    lines = ["| layer | req/s, median (rounds) | server CPU µs/request, median (rounds) | added |",
             "|---|---:|---:|---:|"]  # fmt: skip
    before = None
    for layer, r in results["layers"].items():
        cpu = r["cpu_us_per_request"]
        rounds = ", ".join(f"{c:.0f}" for c in r["cpu_us_all"])
        rps = ", ".join(f"{x:,.0f}" for x in r["rps_all"])
        added = "–" if before is None else f"{cpu - before:+.0f}"
        lines.append(f"| {layer} | {r['rps']:,.0f} ({rps}) | {cpu:.0f} ({rounds}) | {added} |")
        before = cpu
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--protocol", default="v2-json", choices=("v2-json", "v2-binary"))
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated, in order")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "layers.json")
    return p.parse_args(argv)


def serve_main(argv: list[str]) -> int:
    """`serve LAYER PORT`: one of the bare layers, until killed (started by `measure`)."""
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.layers serve")
    p.add_argument("layer", choices=[layer for layer in LAYERS if layer != "onnxserve"])
    p.add_argument("port", type=int)
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--model", default="cnn")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.layer, args.port, args.repository, args.model))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Measure every layer, alternating, and write JSON and a table (or `serve` one layer)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    args = parse_args(argv)
    ensure_wrk()
    layers = [layer for layer in args.layers.split(",") if layer]
    unknown = set(layers) - set(LAYERS)
    if unknown:
        raise SystemExit(f"unknown layers {sorted(unknown)}; choose from {', '.join(LAYERS)}")
    info = load_model_info(args.repository, "cnn")
    rounds: dict[str, list[dict[str, Any]]] = {layer: [] for layer in layers}
    with tempfile.TemporaryDirectory(prefix="layers-") as tmp:
        workdir = Path(tmp)
        spec = CellSpec("onnxserve", "cnn", args.protocol, args.conns)
        manifest, _ = write_manifest(spec, info, workdir)
        for k in range(args.rounds):
            for layer in layers:
                r = measure(layer, args, manifest, workdir)
                rounds[layer].append(r)
                print(f"round {k + 1} {layer}: {r['rps']:,.0f} req/s, "
                      f"{r['cpu_us_per_request']} µs CPU/request", file=sys.stderr)  # fmt: skip
    results = {
        "command": " ".join(["python -m loadtests.bench.layers", *argv]),
        "protocol": args.protocol,
        "conns": args.conns,
        "layers": {layer: combine(rs) for layer, rs in rounds.items()},
    }
    write_results(args.out, results, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
