"""ONNX Runtime sessions: provider choice with CPU fallback, thread sizing, IO binding, warm-up."""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.config import BatchingOverride, Settings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
PREFERENCE = (TENSORRT, CUDA, CPU)


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built (taken from the service settings)."""

    providers: Sequence[str] | None = None
    intra_op_threads: int = 0
    cudnn_conv_algo_search: str = "HEURISTIC"
    device_id: int = 0
    require_gpu: bool = False

    @classmethod
    def from_settings(
        cls, settings: Settings, override: BatchingOverride | None = None
    ) -> RuntimeOptions:
        """The options for one model: server settings, with the model's own overrides on top."""
        return cls(
            providers=settings.providers,
            intra_op_threads=settings.intra_op_threads,
            cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
            device_id=settings.device_id,
            require_gpu=settings.require_gpu,
        )


def _onnxruntime() -> ModuleType:
    import onnxruntime

    return onnxruntime


def available_cores() -> int:
    """Cores this process may run on (respects taskset / cgroup pinning)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def select_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Requested providers (or the default preference) that onnxruntime offers, CPU last."""
    order = list(requested) if requested else list(PREFERENCE)
    missing = [p for p in order if p not in available]
    if requested and missing:
        log.warning("providers %s are not offered by this onnxruntime (has %s)", missing, available)
    chosen = [p for p in order if p in available and p != CPU]
    return [*chosen, CPU]


def intra_op_threads(requested: int, instances: int, cores: int | None = None) -> int:
    """Threads per session so that instances x threads never exceeds the cores."""
    cores = cores or available_cores()
    budget = max(1, cores // max(1, instances))
    return min(requested, budget) if requested > 0 else budget


def provider_options(provider: str, options: RuntimeOptions) -> dict[str, Any]:
    """Options for one provider; CUDA's conv algorithm search defaults to HEURISTIC."""
    if provider == CUDA:
        return {
            "device_id": options.device_id,
            "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
        }
    if provider == TENSORRT:
        return {"device_id": options.device_id, "trt_engine_cache_enable": True}
    return {}


class ModelRuntime:
    """A pool of identical sessions over one model file; `run` may be called from any thread."""

    def __init__(
        self,
        path: Path,
        options: RuntimeOptions,
        instances: int = 1,
        ort: ModuleType | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options
        self._ort = ort or _onnxruntime()
        self.threads = intra_op_threads(options.intra_op_threads, instances)
        self.fallback_reason: str | None = None
        self._sessions: queue.SimpleQueue = queue.SimpleQueue()
        first = self._create()
        self.provider: str = first.get_providers()[0]
        self.io_binding = self.provider in GPU_PROVIDERS
        self.inputs = {i.name: i for i in first.get_inputs()}
        self.outputs = {o.name: o for o in first.get_outputs()}
        self.output_names = list(self.outputs)
        self._sessions.put(first)
        for _ in range(instances - 1):
            self._sessions.put(self._create())

    def _session_options(self) -> Any:
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the core that the event loop needs between batches.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return so

    def _create(self) -> Any:
        providers = select_providers(self.options.providers, self._ort.get_available_providers())
        with_options = [(p, provider_options(p, self.options)) for p in providers]
        try:
            session = self._ort.InferenceSession(
                str(self.path), sess_options=self._session_options(), providers=with_options
            )
        except Exception as exc:
            if providers == [CPU]:
                raise
            self.fallback_reason = f"{providers[0]} failed to create the session: {exc}"
            log.warning("%s: %s; falling back to the CPU provider", self.path, self.fallback_reason)
            session = self._ort.InferenceSession(
                str(self.path), sess_options=self._session_options(), providers=[CPU]
            )
        active = session.get_providers()[0]
        if active == CPU and providers[0] != CPU and self.fallback_reason is None:
            self.fallback_reason = f"onnxruntime placed the model on {CPU}, not {providers[0]}"
            log.warning("%s: %s", self.path, self.fallback_reason)
        return session

    @property
    def not_ready_reason(self) -> str | None:
        """Why this runtime must not serve (require_gpu on a CPU session), or None."""
        if self.options.require_gpu and self.provider not in GPU_PROVIDERS:
            why = self.fallback_reason or "no GPU provider is available"
            return f"require_gpu is set but the model runs on {self.provider} ({why})"
        return None

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on a free session; returns every output by name."""
        session = self._sessions.get()
        try:
            if self.io_binding:
                return self._run_bound(session, inputs)
            return dict(zip(self.output_names, session.run(self.output_names, inputs), strict=True))
        finally:
            self._sessions.put(session)

    def _run_bound(self, session: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """IO binding: one host-to-device copy per input, outputs left on the device until read."""
        device = "cpu" if self.provider == CPU else "cuda"  # "cpu": the tests' CPU stand-in
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, device, self.options.device_id)
        session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))

    def warm_up_sizes(self, max_batch_size: int) -> tuple[int, ...]:
        """Batch sizes to warm up before serving (the caller builds the inputs)."""
        return tuple(sorted({1, max(1, max_batch_size)}))

    def warm_up_lengths(self) -> tuple[int, ...]:
        """Lengths to give dynamic non-batch axes during warm-up."""
        return (8,)

    def warm_up(self, examples: Sequence[dict[str, np.ndarray]]) -> None:
        """Run each example once on every session (first-run allocation off the request path)."""
        held = [self._sessions.get() for _ in range(self._sessions.qsize())]
        try:
            for session in held:
                for example in examples:
                    if self.io_binding:
                        self._run_bound(session, example)
                    else:
                        session.run(self.output_names, example)
        finally:
            for session in held:
                self._sessions.put(session)
