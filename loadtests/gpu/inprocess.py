"""In-process figures on the device, no HTTP: rows/s by batch size with IO binding off and on and
with a CUDA graph where ONNX Runtime allows one; the first request at a batch size that warm-up
did not see; GPU memory per instance."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np

from loadtests.bench.inprocess import rate
from loadtests.gpu.env import gpu_memory_mib
from loadtests.gpu.parity import Model
from service.model_config import MODEL_FILE
from service.runtime import ModelRuntime, RuntimeOptions

BATCHES = (1, 32, 256)
#: How each mode changes the device options.
MODES: dict[str, dict[str, Any]] = {
    "run": {},
    "io_binding": {"io_binding": True},
    "cuda_graph": {"enable_cuda_graph": True},
}


def rows_of(samples: np.ndarray, rows: int, offset: int = 0) -> np.ndarray:
    """`rows` consecutive real samples from `offset`, wrapping round."""
    return np.take(samples, (offset + np.arange(rows)) % len(samples), axis=0)


def throughput(
    model: Model,
    device: RuntimeOptions,
    cpu: RuntimeOptions,
    seconds: float,
    batches: tuple[int, ...] = BATCHES,
) -> list[dict[str, Any]]:
    """Rows/s of the FP32 graph by mode and batch size; `cpu` is the CPU provider for reference."""
    path = model.folder / MODEL_FILE
    setups = [(mode, replace(device, **changes)) for mode, changes in MODES.items()]
    rows: list[dict[str, Any]] = []
    for mode, options in [*setups, ("cpu", cpu)]:
        runtime = ModelRuntime(path, options)
        report = runtime.sessions[0]
        if mode == "cuda_graph" and report.cuda_graph != "on":
            rows.append(
                {
                    "model": model.name,
                    "mode": mode,
                    "eligible": False,
                    "why": report.cuda_graph,
                    "provider": runtime.provider,
                }
            )
            continue
        for batch in batches:
            feeds = {model.input_name: rows_of(model.inputs, batch)}
            runtime.warm_up([feeds])
            median, best = rate(lambda r=runtime, f=feeds: r.run(f), seconds)
            rows.append(
                {
                    "model": model.name,
                    "mode": mode,
                    "batch": batch,
                    "provider": runtime.provider,
                    "io_binding": report.io_binding,
                    "cuda_graph": report.cuda_graph,
                    "rows_per_s": median * batch,
                    "best_rows_per_s": best * batch,
                    "ms_per_batch": 1000 / median,
                }
            )
    return rows


def first_request(model: Model, device: RuntimeOptions, repeats: int = 5) -> dict[str, Any]:
    """Latency of the first run at a batch size warm-up did not cover, against the same size's
    steady latency (what a request pays for an unseen shape: allocation, cuDNN search)."""
    runtime = ModelRuntime(model.folder / MODEL_FILE, device)
    sizes = runtime.warm_up_sizes(model.max_batch_size)
    runtime.warm_up([{model.input_name: rows_of(model.inputs, n)} for n in sizes])
    unseen = max(sizes) + 17
    feeds = {model.input_name: rows_of(model.inputs, unseen)}
    start = time.perf_counter()
    runtime.run(feeds)
    first = time.perf_counter() - start
    steady = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.run(feeds)
        steady.append(time.perf_counter() - start)
    return {
        "model": model.name,
        "warmed_sizes": [min(sizes), max(sizes)],
        "warmed_count": len(sizes),
        "unseen_batch": unseen,
        "first_ms": first * 1000,
        "steady_ms": statistics.median(steady) * 1000,
    }


def memory_per_instance(model: Model, device: RuntimeOptions, instances: int = 2) -> dict:
    """GPU memory this process gains for `instances` warmed instances of the FP32 graph, per
    instance (nvidia-smi; the CUDA context exists already when earlier steps ran)."""
    before, how = gpu_memory_mib(os.getpid())
    runtime = ModelRuntime(model.folder / MODEL_FILE, device, instances=instances)
    sizes = runtime.warm_up_sizes(model.max_batch_size)
    runtime.warm_up([{model.input_name: rows_of(model.inputs, n)} for n in sizes])
    after, _ = gpu_memory_mib(os.getpid())
    per = (after - before) / instances if before is not None and after is not None else None
    del runtime
    return {
        "model": model.name,
        "instances": instances,
        "before_mib": before,
        "after_mib": after,
        "per_instance_mib": per,
        "measured": how,
    }
