"""`onnxserve score MODEL INPUT OUTPUT`: score a file in-process, through a server, or on Ray.

Exit codes: 0 done; 1 done but more bad rows than --max-error-ratio allows, or failed midway
(re-run the same command to resume); 2 refused before any work (bad arguments, missing input,
unknown model, unreadable format, an output made with other arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from service.scoring import ScoringError
from service.scoring.plan import DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_ROWS, local_model, prepare
from service.scoring.writer import Manifest, Summary

log = logging.getLogger(__name__)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """The `score` subcommand's arguments."""
    p = argparse.ArgumentParser(
        prog="onnxserve score",
        description="Score a file (.npy, .parquet, .csv; .npz for several or string inputs) "
        "through a model, in chunks, resumably. "
        "OUTPUT is a folder of Parquet parts (or a structured .npy when it ends with .npy); "
        "re-running the same command resumes an interrupted job.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument(
        "--repository", type=Path, help="default: $ONNXSERVE_REPOSITORY or model_repository"
    )
    p.add_argument("--version", help="model version (default: the highest)")
    p.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE)
    p.add_argument(
        "--chunk-rows",
        type=_positive,
        default=DEFAULT_CHUNK_ROWS,
        help="rows per committed part file",
    )
    p.add_argument(
        "--column",
        type=lambda s: [c for c in s.split(",") if c],
        help="feature column(s) of a .parquet/.csv input: one list column, or "
        "comma-separated scalar columns (default: the only list column, else every "
        "numeric column)",
    )
    p.add_argument("--max-error-ratio", type=_ratio, help="exit 1 when errors/rows exceeds this")
    p.add_argument(
        "--url", help="score through a running server: http://host:port, or grpc://host:port "
        "for its gRPC port (Triton's ModelInfer)",
    )  # fmt: skip
    p.add_argument("--concurrency", type=_positive, default=4, help="requests in flight (--url)")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument(
        "--ray-address",
        help="Ray cluster to join, e.g. ray://head:10001 or auto (default: start a local Ray)",
    )
    p.add_argument("--ray-actors", type=_positive, help="actor pool size (default: CPUs - 1)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


class ProgressBar:
    """A tqdm bar (rows, rows/s, time left) fed with manifests."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.bar: Any = None

    def __call__(self, manifest: Manifest) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=manifest.total_rows, initial=manifest.rows_done, desc=self.label,
                unit="rows", unit_scale=True, dynamic_ncols=True, disable=not self.enabled,
            )  # fmt: skip
        self.bar.set_postfix(errors=manifest.errors, refresh=False)
        self.bar.update(manifest.rows_done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _score(args: argparse.Namespace, bar: ProgressBar) -> Summary:
    sizes = {"batch_size": args.batch_size, "chunk_rows": args.chunk_rows, "columns": args.column}
    if args.url:
        from service.scoring import remote

        return asyncio.run(
            remote.score(args.url, args.model, args.version, args.input, args.output,
                         concurrency=args.concurrency, progress=bar, **sizes)
        )  # fmt: skip
    if args.repository is None:
        from service.config import get_settings

        args.repository = get_settings().repository
    config, version, model_path = local_model(args.repository, args.model, args.version)
    if args.engine == "ray":
        from service.scoring import ray_engine

        plan = prepare(config, version, args.input, args.output, engine="ray", **sizes)
        return ray_engine.score(plan, model_path, args.ray_address, args.ray_actors)
    from service.scoring.engine import score_local

    plan = prepare(config, version, args.input, args.output, engine="local", **sizes)
    return asyncio.run(score_local(plan, model_path, args.threads, progress=bar))


def main(argv: list[str]) -> int:
    """Run `onnxserve score` with these arguments; returns the exit code."""
    args = parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    if args.url and args.engine == "ray":
        sys.stderr.write("onnxserve score: error: --url and --engine ray exclude each other\n")
        return 2
    bar = ProgressBar(args.model, enabled=not args.no_progress)
    try:
        summary = _score(args, bar)
    except ScoringError as exc:
        bar.close()
        sys.stderr.write(f"onnxserve score: error: {exc.message}\n")
        return 2
    except Exception as exc:  # midway: what is committed stays; the same command resumes
        bar.close()
        log.error("scoring failed: %s", exc, exc_info=not isinstance(exc, OSError))
        sys.stderr.write("what was committed is kept; re-run the same command to resume\n")
        return 1
    bar.close()
    sys.stdout.write(summary.line() + "\n")
    if summary.errors:
        sys.stdout.write(f"{summary.errors} bad rows listed in {summary.errors_file}\n")
    if args.max_error_ratio is not None and summary.error_ratio > args.max_error_ratio:
        sys.stderr.write(
            f"onnxserve score: error ratio {summary.error_ratio:.4f} exceeds "
            f"--max-error-ratio {args.max_error_ratio}\n"
        )
        return 1
    return 0
