"""`make gpu-check`: one command that, on a machine with an NVIDIA GPU, records in JSON and
Markdown the GPU, driver, ONNX Runtime build and providers; every model and variant on CUDA
against the CPU (parity, labels, task metric, node placement); in-process rows/s at batch
1/32/256 with IO binding off and on and with CUDA graphs where allowed; the first request at a
batch size warm-up did not see; GPU memory per instance; and the real server with
`--require-gpu` under load, batching on and off. Targets are judged in the report.

    python -m loadtests.gpu_check --repository model_repository --out runs/gpu-check

Exit status: 0 all measured and every target met; 1 a step failed or a target was missed;
2 no usable GPU (nothing measured; the report says why). `--simulate-on-cpu` runs every step on
the CPU provider as a self-test of the check itself (its figures are not GPU figures).

NVIDIA's CUDA libraries installed as pip wheels (for torch, or onnxruntime-gpu's extras) are put
on LD_LIBRARY_PATH by re-executing once, so that this process and the servers it starts load them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.gpu.env import (
    REEXEC_FLAG,
    cuda_too_old,
    find_gpus,
    library_path_with,
    nvidia_library_dirs,
    onnxruntime_build,
)
from loadtests.gpu.report import evaluate, markdown

log = logging.getLogger("gpu-check")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
MODELS = ("cnn", "lstm", "autoencoder")
STEPS = ("parity", "inprocess", "served")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    p.add_argument("--seconds", type=float, default=2.0, help="per in-process cell")
    p.add_argument("--load-seconds", type=int, default=8, help="per served cell")
    p.add_argument("--batches", default="1,32,256", help="in-process batch sizes")
    p.add_argument("--skip", default="", help=f"steps to leave out, of {','.join(STEPS)}")
    p.add_argument(
        "--simulate-on-cpu",
        action="store_true",
        help="self-test: every step on the CPU provider (not GPU figures)",
    )
    return p.parse_args(argv)


def reexec_with_nvidia_libraries(argv: list[str]) -> None:
    """Once: re-run this command with NVIDIA's wheel libraries on LD_LIBRARY_PATH (the loader
    reads it at start only). Returns when there is nothing to add."""
    if os.environ.get(REEXEC_FLAG):
        return
    path = library_path_with(nvidia_library_dirs(), os.environ.get("LD_LIBRARY_PATH"))
    if path is None:
        return
    log.info("re-running with NVIDIA's wheel libraries on LD_LIBRARY_PATH")
    env = {**os.environ, "LD_LIBRARY_PATH": path, REEXEC_FLAG: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "loadtests.gpu_check", *argv], env)


def usable_gpu_problem(result: dict[str, Any], probe_model: Path | None) -> str | None:
    """Why this machine cannot run the check on a GPU, or None (fills in the machine facts)."""
    gpus = find_gpus()
    result["gpus"] = gpus.as_dict()
    build = onnxruntime_build()
    result["onnxruntime"] = build
    result["nvidia_library_dirs"] = nvidia_library_dirs()
    if gpus.problem:
        return gpus.problem
    needed = int(build["cuda_version"].split(".")[0]) if build["cuda_version"] else None
    too_old = cuda_too_old(gpus.driver_cuda, needed)
    if too_old:
        return too_old
    if len(build["distributions"]) > 1:
        return "onnxruntime and onnxruntime-gpu are both installed: remove onnxruntime"
    if CUDA not in build["providers"]:
        return (
            f"onnxruntime {build['version']} ({', '.join(build['distributions'])}) offers no "
            f"{CUDA}: install the gpu extra (GPU=1 make setup)"
        )
    if probe_model is None:
        return "no model to probe the CUDA provider with: build the repository first"
    from service.runtime import ModelRuntime, RuntimeOptions

    probe = ModelRuntime(probe_model, RuntimeOptions(providers=(CUDA, CPU), require_gpu=True))
    result["probe"] = probe.report()
    return probe.not_ready_reason


def write(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "gpu-check.md").write_text(markdown(result))


def step(result: dict[str, Any], name: str, out: Path, work: Callable[[], None]) -> None:
    """Run one step; a failure is recorded (with its traceback's tail) and the check goes on."""
    log.info("step: %s", name)
    try:
        work()
    except Exception as exc:
        result.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        log.error("step %s failed:\n%s", name, traceback.format_exc()[-3000:])
    write(result, out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if not args.simulate_on_cpu:
        reexec_with_nvidia_libraries(argv)
    started = time.perf_counter()
    names = [m for m in args.models.split(",") if m]
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "simulated": args.simulate_on_cpu,
        "argv": argv,
    }
    from loadtests.gpu.parity import load_model

    missing = [m for m in names if not (args.repository / m / "config.json").is_file()]
    models = {m: load_model(args.repository, m) for m in names if m not in missing}
    probe = next((m.folder / "model.onnx" for m in models.values()), None)
    if args.simulate_on_cpu:
        result["gpus"], result["onnxruntime"] = {"problem": "simulated"}, onnxruntime_build()
    else:
        problem = usable_gpu_problem(result, probe)
        if problem:
            result["no_gpu"] = problem
            write(result, args.out)
            log.error("no usable GPU: %s (report in %s)", problem, args.out)
            return 2
    if missing:
        result.setdefault("errors", {})["models"] = f"not in {args.repository}: {missing}"
    run_measurements(args, models, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["targets"] = evaluate(result)
    write(result, args.out)
    for target in result["targets"]:
        log.info(
            "%s: %s (%s) met=%s", target["target"], target["value"], target["rule"], target["met"]
        )
    ok = not result.get("errors") and all(t["met"] for t in result["targets"])
    log.info("report: %s", args.out / "gpu-check.md")
    return 0 if ok else 1


def run_measurements(args: argparse.Namespace, models: dict, result: dict[str, Any]) -> None:
    """The measuring steps, each recorded as it finishes."""
    from loadtests.gpu import inprocess, parity, served
    from service.runtime import RuntimeOptions

    skip = set(args.skip.split(",")) - {""}
    cpu = RuntimeOptions(providers=(CPU,))
    if args.simulate_on_cpu:
        device, server_args = cpu, ["--providers", CPU]
    else:
        device = RuntimeOptions(providers=(CUDA, CPU), require_gpu=True)
        server_args = ["--require-gpu", "--providers", f"{CUDA},{CPU}"]
    batches = tuple(int(b) for b in args.batches.split(",") if b)
    if "parity" not in skip:
        result["parity"] = []
        step(
            result,
            "parity",
            args.out,
            lambda: [
                result["parity"].extend(parity.check_model(m, device, cpu)) for m in models.values()
            ],
        )
    if "inprocess" not in skip:
        for key, work in (
            ("throughput", lambda m: inprocess.throughput(m, device, cpu, args.seconds, batches)),
            ("first_request", lambda m: [inprocess.first_request(m, device)]),
            ("memory", lambda m: [inprocess.memory_per_instance(m, device)]),
        ):
            result[key] = []
            step(
                result,
                key,
                args.out,
                lambda k=key, w=work: [result[k].extend(w(m)) for m in models.values()],
            )
    if "served" not in skip:
        result["served"] = []
        for batching in (True, False):
            step(
                result,
                f"served batching={'on' if batching else 'off'}",
                args.out,
                lambda b=batching: result["served"].extend(
                    served.serve_and_load(
                        args.repository,
                        models,
                        served.CELLS,
                        server_args,
                        b,
                        args.load_seconds,
                        args.out / "served",
                    )
                ),
            )


if __name__ == "__main__":
    sys.exit(main())
