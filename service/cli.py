"""The `onnxserve` command: build, serve (and more as they land)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path


def _boolean(text: str) -> bool:
    """A flag's true/false value, as Triton's flags take them."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _build(args: argparse.Namespace) -> int:
    from export.build import MODEL_NAMES, build_repository  # torch is imported only here

    names = [m.strip() for m in args.models.split(",")] if args.models else list(MODEL_NAMES)
    unknown = sorted(set(names) - set(MODEL_NAMES))
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}", file=sys.stderr)
        return 2
    results = build_repository(args.repository, names, force=args.force, quick=args.quick)
    for r in results:
        status = "up to date" if r.get("skipped") else f"built in {r.get('seconds', 0):.1f}s"
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in (r.get("metrics") or {}).items())
        print(f"{r['name']} v{r['version']}: {status}  {metrics}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from service.config import Settings, get_settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    settings = get_settings(**given)
    if not settings.repository.is_dir():
        where = settings.repository
        print(f"no model repository at {where}: run `onnxserve build`", file=sys.stderr)
        return 2
    from service.workers import supervise, worker_count

    workers = worker_count(settings)
    if workers > 1:  # before anything imports prometheus_client (its multiprocess mode)
        return supervise(settings, workers)
    from service.app import create_app
    from service.httpserver import serve

    settings = settings.model_copy(update={"workers": 1})
    return serve(create_app(settings), settings)


def _workers(text: str) -> int | str:
    """`--workers`: a count, or `auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers >= 1 or auto, got {text!r}")
    return count


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _serve_flags(s: argparse.ArgumentParser) -> None:
    """`onnxserve serve`'s flags: each `dest` is a Settings field (a test checks it), so every
    flag is also an `ONNXSERVE_*` variable; None (not given) keeps the environment's value."""
    s.add_argument("--repository", type=Path)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 8001, as Triton's; 0: off)")
    s.add_argument(
        "--grpc-server", choices=["native", "grpcio"],
        help="native (default): onnxserve's own HTTP/2 server for gRPC; grpcio: grpc.aio's",
    )  # fmt: skip
    s.add_argument(
        "--workers", type=_workers, metavar="N|auto",
        help="server processes on one port (default 1; auto: one per core, 1 on a GPU)",
    )  # fmt: skip
    s.add_argument("--models", type=_csv, help="comma-separated models to load (default: all)")
    s.add_argument("--version-policy", choices=["latest", "all"], help="default: latest")
    s.add_argument(
        "--model-control-mode", choices=["none", "poll", "explicit"],
        help="none (default): read the repository at start-up; explicit: the load/unload API; "
        "poll: follow the repository's files",
    )  # fmt: skip
    s.add_argument("--repository-poll-secs", type=float, help="poll mode's interval (default 15)")
    s.add_argument(
        "--load-model", action="append", metavar="NAME",
        help="explicit mode: a model to load at start-up (repeatable; '*' = all)",
    )  # fmt: skip
    s.add_argument(
        "--strict-readiness", type=_boolean, metavar="BOOL",
        help="ready only when every model serves (default true; false: ready once started)",
    )  # fmt: skip
    s.add_argument("--providers", type=_csv, help="e.g. CUDAExecutionProvider,CPUExecutionProvider")
    s.add_argument("--threads", dest="intra_op_threads", type=int, help="per session (0 = auto)")
    s.add_argument("--require-gpu", action="store_const", const=True)
    s.add_argument("--device-id", type=int)
    s.add_argument(
        "--no-batching", dest="batching", action="store_const", const=False,
        help="run each request on its own",
    )  # fmt: skip
    s.add_argument(
        "--inline-compute-us", type=float, metavar="US",
        help="run a lone one-row request to an idle model on the event loop when the model's "
        "one-row runs take under this (default 200; 0: never)",
    )  # fmt: skip
    s.add_argument(
        "--one-cpu-inline-ms", type=float, metavar="MS",
        help="on a process confined to one CPU, run batches expected to take under this on the "
        "event loop, at any load (default 5; 0: never)",
    )  # fmt: skip
    s.add_argument("--max-body-bytes", type=int)
    s.add_argument("--max-json-body-bytes", type=int, help="JSON bodies (default 2 MiB)")
    s.add_argument("--max-rows", type=int, help="rows per request (default 4096)")
    s.add_argument("--max-elements", type=int, help="elements per request, all inputs together")
    s.add_argument("--max-dim", type=int, help="length of each dynamic non-batch axis")
    s.add_argument("--jobs-root", type=Path, help="enable /v1/jobs for files under this folder")
    s.add_argument(
        "--api-keys-file", type=Path, help="JSON keys with scopes (see docs/security.md)"
    )
    s.add_argument(
        "--anonymous-scopes", type=_csv,
        help="scopes open without a key (default: infer,read,metrics without a keys file)",
    )  # fmt: skip
    s.add_argument(
        "--unsafe-anonymous-admin", action="store_const", const=True,
        help="local development only: model control and jobs without a key",
    )  # fmt: skip
    s.add_argument("--allowed-hosts", type=_csv, help="Host header names accepted ('*' = any)")
    s.add_argument("--ssl-certfile", type=Path)
    s.add_argument("--ssl-keyfile", type=Path)
    s.add_argument("--header-timeout-s", type=float, help="request headers must arrive within")
    s.add_argument("--body-timeout-s", type=float, help="a request body must arrive within")
    s.add_argument("--keep-alive-timeout-s", type=float, help="idle keep-alive connections close")
    s.add_argument("--graceful-timeout-s", type=float, help="shutdown waits at most this long")
    s.add_argument("--log-level")
    s.add_argument("--access-log", action="store_const", const=True)


#: Subcommands whose parser lives with their feature, imported only when used.
DELEGATED = {
    "export": ("export.cli", "export a PyTorch module into the repository as a verified version"),
    "score": ("service.scoring.cli", "score a file through a model (offline, remote or Ray)"),
    "loadtest": ("loadtests.cli", "run Locust headless and write a report with plots"),
}


#: The extras each delegated command needs beyond the serving core.
EXTRAS = {"export": "cpu,train", "score": "cpu,score", "loadtest": "loadtest"}


def parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    p = argparse.ArgumentParser(prog="onnxserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="train and export models into the repository")
    b.add_argument("--repository", type=Path, default=Path("model_repository"))
    b.add_argument("--models", help="comma-separated subset (default: all)")
    b.add_argument("--force", action="store_true", help="retrain even if up to date")
    b.add_argument("--quick", action="store_true", help="few epochs (smoke tests)")
    b.set_defaults(func=_build)

    s = sub.add_parser("serve", help="serve the repository over HTTP (env: ONNXSERVE_*)")
    _serve_flags(s)
    s.set_defaults(func=_serve)

    for name, (_, text) in DELEGATED.items():  # listed in --help; main() hands them over
        sub.add_parser(name, help=f"{text} (see `onnxserve {name} --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `onnxserve` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        try:
            module = importlib.import_module(DELEGATED[argv[0]][0])
        except ModuleNotFoundError as exc:
            extra = EXTRAS.get(argv[0], "")
            print(
                f"`onnxserve {argv[0]}` needs {exc.name!r}: pip install 'onnxserve[{extra}]'",
                file=sys.stderr,
            )
            return 2
        return module.main(argv[1:])
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
