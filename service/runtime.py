"""ONNX Runtime sessions: a provider walk that keeps the true reason for any fallback, GPU
options, per-session checks, IO binding over reused buffers, warm-up.

ONNX Runtime's Python layer retries a failed provider list with its own fallback list and *no
options*, and its C++ layer skips a CUDA provider whose libraries do not load without raising
(measured with onnxruntime-gpu 1.31.1, see docs/gpu.md). So every session here is created with
that fallback off, providers are tried in order each with its options, and a provider missing
from a created session is diagnosed by loading its library as ONNX Runtime does. The reason (a
missing `libcublasLt.so.13`, a bad device id, out of memory) is kept per session, for the log,
model metadata, readiness and metrics.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import queue
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import BadRequest

if TYPE_CHECKING:
    from service.config import BatchingOverride, Settings

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
#: The order without `providers`: TensorRT only when asked for by name.
DEFAULT_ORDER = (CUDA, CPU)
#: Operators that decide speed: on the CPU beside a GPU provider they deserve a warning.
COMPUTE_OPS = frozenset(
    {
        "Attention", "Conv", "ConvInteger", "ConvTranspose", "DynamicQuantizeMatMul", "FusedConv",
        "FusedGemm", "FusedMatMul", "GRU", "Gemm", "LSTM", "MatMul", "MatMulInteger",
        "MatMulIntegerToFloat", "QLinearConv", "QLinearMatMul", "RNN",
    }
)  # fmt: skip
#: The library ONNX Runtime loads for each GPU provider (beside onnxruntime/capi, Linux names).
PROVIDER_LIBRARIES = {
    CUDA: "libonnxruntime_providers_cuda.so",
    TENSORRT: "libonnxruntime_providers_tensorrt.so",
}
CPU_WARM_UP_LENGTHS = (8,)
#: Dynamic non-batch axes (e.g. LSTM windows) warmed on a GPU: each new shape costs a search.
GPU_WARM_UP_LENGTHS = (8, 16, 32, 64, 128)
#: ONNX Runtime's CUDA provider captures a graph after two regular runs of a shape.
CUDA_GRAPH_WARM_RUNS = 3
#: Sets of bound buffers kept per session (the least recently used set is dropped).
BOUND_SHAPES = 64


#: Batches with at least this many input elements run with ONNX Runtime's arena shrinkage, so
#: that one legal but large request does not leave its memory held by the arena for good.
SHRINK_ELEMENTS = 1 << 18


class ModelRunError(BadRequest):
    """ONNX Runtime refused to run the model on this input (e.g. a window too short for the
    graph): the caller's error, mapped the same way by HTTP, gRPC, jobs and offline scoring."""

    reason = "model_refused"


def run_error(exc: Exception) -> Exception:
    """The error to raise for an exception from a session run: ONNX Runtime's own exceptions
    (this module is the one place that knows them) become ModelRunError."""
    if type(exc).__module__.startswith("onnxruntime"):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return ModelRunError(f"the model could not run on this input: {first}")
    return exc


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built: the service settings with one model's overrides on top.

    `max_batch_size` (0: not given) sizes TensorRT's optimisation profiles.
    """

    providers: Sequence[str] | None = None
    intra_op_threads: int = 0
    cudnn_conv_algo_search: str = "HEURISTIC"
    device_id: int = 0
    require_gpu: bool = False
    device_ids: tuple[int, ...] = ()
    gpu_mem_limit: int = 0
    arena_extend_strategy: str = "kNextPowerOfTwo"
    use_tf32: bool = False
    enable_cuda_graph: bool = False
    io_binding: bool = False
    trt_engine_cache_path: Path | None = None
    max_batch_size: int = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, override: BatchingOverride | None = None
    ) -> RuntimeOptions:
        """The options for one model: server settings, with the model's own overrides on top."""
        devices = override.device_ids if override is not None and override.device_ids else ()
        return cls(
            providers=tuple(settings.providers) if settings.providers else None,
            intra_op_threads=settings.intra_op_threads,
            cudnn_conv_algo_search=settings.cudnn_conv_algo_search,
            device_id=settings.device_id,
            require_gpu=settings.require_gpu,
            device_ids=tuple(devices),
            gpu_mem_limit=settings.gpu_mem_limit,
            arena_extend_strategy=settings.arena_extend_strategy,
            use_tf32=settings.use_tf32,
            enable_cuda_graph=settings.enable_cuda_graph,
            io_binding=settings.io_binding,
            trt_engine_cache_path=settings.trt_engine_cache_path,
            max_batch_size=(override.max_batch_size or 0) if override is not None else 0,
        )

    def device_for(self, instance: int) -> int:
        """The GPU of one instance: round-robin over `device_ids` (Triton's `gpus`), else
        `device_id`."""
        if self.device_ids:
            return self.device_ids[instance % len(self.device_ids)]
        return self.device_id


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
    """The providers to walk: those requested (default CUDA, then CPU) that onnxruntime offers,
    in order, CPU last."""
    order = list(requested) if requested else list(DEFAULT_ORDER)
    chosen = [p for p in dict.fromkeys(order) if p in available and p != CPU]
    return [*chosen, CPU]


def unoffered(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Providers asked for by name that this onnxruntime build does not offer."""
    return [p for p in dict.fromkeys(requested or ()) if p not in available]


def intra_op_threads(requested: int, instances: int, cores: int | None = None) -> int:
    """Threads per session so that instances x threads never exceeds the cores."""
    cores = cores or available_cores()
    budget = max(1, cores // max(1, instances))
    return min(requested, budget) if requested > 0 else budget


def _flag(on: bool) -> str:
    return "1" if on else "0"


def provider_options(
    provider: str,
    options: RuntimeOptions,
    device_id: int | None = None,
    profiles: dict[str, str] | None = None,
) -> dict[str, str]:
    """One provider's options, as strings in ONNX Runtime's own format, so that they can be
    compared with what `get_provider_options()` reports after creation."""
    device = str(options.device_id if device_id is None else device_id)
    if provider == CUDA:
        opts = {
            "device_id": device,
            "cudnn_conv_algo_search": options.cudnn_conv_algo_search,
            "arena_extend_strategy": options.arena_extend_strategy,
            "use_tf32": _flag(options.use_tf32),
            "enable_cuda_graph": _flag(options.enable_cuda_graph),
        }
        if options.gpu_mem_limit:
            opts["gpu_mem_limit"] = str(options.gpu_mem_limit)
        return opts
    if provider == TENSORRT:
        cache = str(trt_cache_dir(options))
        return {
            "device_id": device,
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": cache,
            "trt_cuda_graph_enable": _flag(options.enable_cuda_graph),
            **(profiles or {}),
        }
    return {}


def trt_cache_dir(options: RuntimeOptions) -> Path:
    """Where TensorRT keeps engines and timing caches (a temporary folder unless configured)."""
    return Path(options.trt_engine_cache_path or Path(tempfile.gettempdir()) / "onnxserve-trt")


def trt_profiles(inputs: Sequence[Any], max_batch_size: int, lengths: Sequence[int]) -> dict:
    """TensorRT optimisation profiles for inputs with dynamic axes: the batch axis from 1 to
    `max_batch_size` (optimum at the maximum), other dynamic axes from 1 to the longest warm-up
    length (optimum at the middle one). Empty when the batch size is not known."""
    if max_batch_size < 1:
        return {}
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    middle = sorted(lengths)[len(lengths) // 2]
    for meta in inputs:
        dims = [d if isinstance(d, int) and d > 0 else None for d in meta.shape]
        if all(d is not None for d in dims):
            continue
        ranges = [
            (d, d, d) if d is not None
            else (1, max_batch_size, max_batch_size) if axis == 0
            else (1, middle, max(lengths))
            for axis, d in enumerate(dims)
        ]  # fmt: skip
        for key, pick in (("min", 0), ("opt", 1), ("max", 2)):
            shapes[key].append(f"{meta.name}:" + "x".join(str(r[pick]) for r in ranges))
    if not shapes["min"]:
        return {}
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in shapes.items()}


_SOURCE = re.compile(r"^\S+\.(?:cc|cpp|cu|h):\d+ .*?\)(?: const)?(?: \[with [^\]]*\])? ")


def ort_error_text(exc: BaseException) -> str:
    """ONNX Runtime's message on one line, without its source location and C++ signature."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return _SOURCE.sub("", text, count=1) or text


def probe_provider_library(ort: ModuleType, provider: str) -> str | None:
    """Load a provider's library as ONNX Runtime does: the loader's error (a missing
    `libcublasLt.so.13`, `libcuda.so.1` without a driver), or None when it loads or cannot be
    tried. Call it only after ONNX Runtime has tried the provider (its shared bridge is loaded)."""
    name = PROVIDER_LIBRARIES.get(provider)
    where = getattr(getattr(ort, "capi", None), "__file__", None)
    if name is None or not where:
        return None
    path = Path(where).parent / name
    if not path.is_file():
        return f"{path} is missing"
    try:
        ctypes.CDLL(str(path), mode=getattr(os, "RTLD_LAZY", 1))
    except OSError as exc:
        text = str(exc)
        if "undefined symbol" in text:
            return None
        if "libcuda.so" in text:
            text += " (libcuda.so.1 comes with the NVIDIA driver: none is installed or visible)"
        return text
    return None


_preload_lock = threading.Lock()
_preloaded: dict[int, tuple[ModuleType, str]] = {}  # the module is kept: its id stays its own


def prepare_gpu_libraries(ort: ModuleType) -> str:
    """Once per process, before a GPU provider is tried: `onnxruntime.preload_dlls()` loads
    NVIDIA's CUDA and cuDNN libraries from their pip wheels (onnxruntime-gpu's `cuda`, `cudnn`
    extras). What it prints (libraries it could not load) goes to the log; returns that text."""
    with _preload_lock:
        if id(ort) in _preloaded:
            return _preloaded[id(ort)][1]
        preload = getattr(ort, "preload_dlls", None)
        said = io.StringIO()
        if preload is not None:
            try:
                with contextlib.redirect_stdout(said):
                    preload()
            except Exception as exc:  # a bad directory, an unexpected platform
                said.write(f"preload_dlls failed: {exc}")
        text = said.getvalue().strip()
        if text:
            log.info("onnxruntime.preload_dlls(): %s", " | ".join(text.splitlines()))
        _preloaded[id(ort)] = (ort, text)
        return text


def _refuses_graph_capture(text: str) -> bool:
    lowered = text.lower()
    return "graph capture" in lowered or "cuda graph" in lowered


def placement(session: Any) -> dict[str, list[str]]:
    """The operator of every node, by the provider it was assigned to ({} when this
    onnxruntime cannot say)."""
    try:
        subgraphs = session.get_provider_graph_assignment_info()
    except (AttributeError, RuntimeError):
        return {}
    nodes: dict[str, list[str]] = {}
    for subgraph in subgraphs:
        nodes.setdefault(subgraph.ep_name, []).extend(n.op_type for n in subgraph.get_nodes())
    return nodes


@dataclass
class SessionReport:
    """What one session of the pool runs on, and why (shown in model metadata)."""

    instance: int
    device_id: int | None
    provider: str
    failures: list[tuple[str, str]] = field(default_factory=list)
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    option_mismatches: dict[str, tuple[str, str]] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    cpu_compute_nodes: list[str] = field(default_factory=list)
    io_binding: bool = False
    cuda_graph: str = "off"

    @property
    def fallback_reason(self) -> str | None:
        """Why each provider ahead of the one in use was not used, or None."""
        if not self.failures:
            return None
        return "; ".join(f"{provider}: {why}" for provider, why in self.failures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "device_id": self.device_id,
            "provider": self.provider,
            "fallback_reason": self.fallback_reason,
            "provider_options": self.provider_options,
            "option_mismatches": {k: {"asked": a, "in_effect": e}
                                  for k, (a, e) in self.option_mismatches.items()},
            "nodes": self.nodes,
            "cpu_compute_nodes": self.cpu_compute_nodes,
            "io_binding": self.io_binding,
            "cuda_graph": self.cuda_graph,
        }  # fmt: skip


@dataclass
class _Bound:
    binding: Any
    inputs: dict[str, Any]
    run_options: Any
    outputs: list[Any] | None = None


class BoundRunner:
    """IO binding for one GPU session that pays for itself: for each set of input shapes, device
    buffers are bound once and reused. A run copies each input into its buffer, runs, and copies
    each output to the host once. With a CUDA graph each shape set has its own graph id, never
    reused, so a dropped set's captured graph is never replayed over new buffers.

    Outputs are bound from the first run's results: only for models whose output shapes follow
    from their input shapes. Not thread-safe: one session, one caller at a time (the pool)."""

    def __init__(
        self,
        ort: ModuleType,
        session: Any,
        device: str,
        device_id: int,
        cuda_graph: bool = False,
        capacity: int = BOUND_SHAPES,
    ) -> None:
        self._ort, self._session = ort, session
        self.device, self.device_id, self.cuda_graph = device, device_id, cuda_graph
        self.capacity = capacity
        self._names = [o.name for o in session.get_outputs()]
        self._sets: OrderedDict[tuple, _Bound] = OrderedDict()
        self._graph_ids = iter(range(1 << 62))

    def _bind(self, inputs: dict[str, np.ndarray]) -> _Bound:
        binding = self._session.io_binding()
        buffers = {}
        for name, array in inputs.items():
            value = self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(array.shape), array.dtype.type, self.device, self.device_id
            )
            binding.bind_ortvalue_input(name, value)
            buffers[name] = value
        for name in self._names:
            binding.bind_output(name, self.device, self.device_id)
        run_options = None
        if self.cuda_graph:
            run_options = self._ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(next(self._graph_ids)))
        return _Bound(binding, buffers, run_options)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = tuple((name, a.shape, a.dtype.str) for name, a in inputs.items())
        bound = self._sets.get(key)
        if bound is None:
            bound = self._sets[key] = self._bind(inputs)
            if len(self._sets) > self.capacity:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(key)
        for name, array in inputs.items():
            bound.inputs[name].update_inplace(np.ascontiguousarray(array))
        self._session.run_with_iobinding(bound.binding, bound.run_options)
        if bound.outputs is None:  # keep ONNX Runtime's first outputs bound from now on
            bound.outputs = list(bound.binding.get_outputs())
            for name, value in zip(self._names, bound.outputs, strict=True):
                bound.binding.bind_ortvalue_output(name, value)
        # A host buffer's numpy() is a view of the bound buffer: copy it before the next run.
        host = [v.numpy() for v in bound.outputs]
        if self.device == "cpu":
            host = [a.copy() for a in host]
        return dict(zip(self._names, host, strict=True))


@dataclass
class _Slot:
    session: Any
    report: SessionReport
    binder: BoundRunner | None = None


class ModelRuntime:
    """A pool of sessions over one model file, one per instance; `run` may be called from any
    thread. Each session walks the providers itself and has its own report, IO binding and
    CUDA graph (`sessions`)."""

    def __init__(
        self,
        path: Path,
        options: RuntimeOptions,
        instances: int = 1,
        ort: ModuleType | None = None,
        probe: Callable[[str], str | None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.options = options
        self._ort = ort or _onnxruntime()
        self._probe = probe or (lambda provider: probe_provider_library(self._ort, provider))
        self.threads = intra_op_threads(options.intra_op_threads, instances)
        self.available = list(self._ort.get_available_providers())
        self._order = select_providers(options.providers, self.available)
        offered = ", ".join(self.available)
        self._unoffered = [
            (p, f"not offered by this onnxruntime build (it offers {offered})")
            for p in unoffered(options.providers, self.available)
        ]
        if any(p in GPU_PROVIDERS for p in self._order):
            prepare_gpu_libraries(self._ort)
        self._profiles = self._trt_profiles() if TENSORRT in self._order else {}
        slots = [self._open(i) for i in range(max(1, instances))]
        self.sessions = [s.report for s in slots]
        first = slots[0].session
        self.inputs = {i.name: i for i in first.get_inputs()}
        self.outputs = {o.name: o for o in first.get_outputs()}
        self.output_names = list(self.outputs)
        self._shrink = self._ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.provider = ",".join(dict.fromkeys(r.provider for r in self.sessions))
        self.on_gpu = any(r.provider in GPU_PROVIDERS for r in self.sessions)
        #: The GPUs that sessions really run on (Triton's instance_group `gpus`).
        self.gpus = sorted({r.device_id for r in self.sessions if r.device_id is not None})
        self.io_binding = all(r.io_binding for r in self.sessions)
        self.fallback_reason = self._pool_reason()
        self._slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in slots:
            self._slots.put(slot)

    # -- sessions ------------------------------------------------------------------------------
    def _session_options(self) -> Any:
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the core that the event loop needs between batches.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
        return so

    def _new_session(self, providers: list[tuple[str, dict[str, str]]]) -> Any:
        """One session, ONNX Runtime's own fallback off: an error raises instead of retrying."""
        return self._ort.InferenceSession(
            str(self.path),
            sess_options=self._session_options(),
            providers=providers,
            enable_fallback=0,
        )

    def _trt_profiles(self) -> dict[str, str]:
        meta = self._ort.SessionOptions()
        meta.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        reader = self._ort.InferenceSession(str(self.path), meta, providers=[CPU])
        return trt_profiles(reader.get_inputs(), self.options.max_batch_size, GPU_WARM_UP_LENGTHS)

    def _open(self, instance: int) -> _Slot:
        """Walk the providers for one instance; check what the session really got."""
        device = self.options.device_for(instance)
        failures = list(self._unoffered)
        chain, graph, graph_note = list(self._order), self.options.enable_cuda_graph, ""
        if TENSORRT in chain:
            trt_cache_dir(self.options).mkdir(parents=True, exist_ok=True)
        while True:
            opts = replace(self.options, enable_cuda_graph=graph)
            asked = {p: provider_options(p, opts, device, self._profiles) for p in chain}
            try:
                session = self._new_session(list(asked.items()))
                break
            except Exception as exc:
                if chain == [CPU]:
                    raise
                why = ort_error_text(exc)
                if graph and _refuses_graph_capture(why):
                    graph, graph_note = False, f"not eligible: {why}"
                    continue
                failures.append((chain[0], why))
                chain = chain[1:]
        used = (list(session.get_providers()) or [CPU])[0]
        skipped = chain[: chain.index(used)] if used in chain else chain[:-1]
        failures += [(p, self._probe(p) or self._silent(p)) for p in skipped]
        on_gpu = used in GPU_PROVIDERS
        report = SessionReport(instance, device if on_gpu else None, used, failures)
        self._check(session, report, asked.get(used, {}))
        if on_gpu:
            report.cuda_graph = "on" if graph else graph_note or "off"
        binder = None
        if on_gpu and (self.options.io_binding or graph):
            binder = BoundRunner(self._ort, session, "cuda", device, cuda_graph=graph)
            report.io_binding = True
        self._log(report)
        return _Slot(session, report, binder)

    @staticmethod
    def _silent(provider: str) -> str:
        return f"onnxruntime did not register {provider} and raised nothing (see its own log)"

    def _check(self, session: Any, report: SessionReport, asked: dict[str, str]) -> None:
        """Options in effect (`get_provider_options()`) and node placement."""
        in_effect = {
            p: {k: str(v) for k, v in o.items()} for p, o in session.get_provider_options().items()
        }
        report.provider_options = in_effect
        own = in_effect.get(report.provider, {})
        report.option_mismatches = {
            k: (v, own[k]) for k, v in asked.items() if k in own and own[k] != v
        }
        nodes = placement(session)
        report.nodes = {p: len(ops) for p, ops in nodes.items()}
        if report.provider in GPU_PROVIDERS:
            report.cpu_compute_nodes = sorted(
                {op for op in nodes.get(CPU, []) if op in COMPUTE_OPS}
            )

    def _log(self, report: SessionReport) -> None:
        where = f"{self.path} instance {report.instance}"
        if report.fallback_reason:
            log.warning("%s runs on %s: %s", where, report.provider, report.fallback_reason)
        else:
            log.info("%s runs on %s (nodes %s)", where, report.provider, report.nodes or "?")
        if report.cpu_compute_nodes:
            log.warning(
                "%s: compute nodes %s run on %s beside %s (no kernel for them there)",
                where, report.cpu_compute_nodes, CPU, report.provider,
            )  # fmt: skip
        for key, (want, got) in report.option_mismatches.items():
            log.warning("%s: %s option %s=%s not in effect (%s)", where, report.provider, key,
                        want, got)  # fmt: skip
        if report.cuda_graph.startswith("not eligible"):
            log.warning("%s: CUDA graph %s", where, report.cuda_graph)

    def _pool_reason(self) -> str | None:
        reasons = [r.fallback_reason for r in self.sessions]
        if not any(reasons):
            return None
        if len(set(reasons)) == 1:
            return reasons[0]
        return "; ".join(f"instance {r.instance}: {r.fallback_reason}"
                         for r in self.sessions if r.fallback_reason)  # fmt: skip

    @property
    def not_ready_reason(self) -> str | None:
        """Why this runtime must not serve (require_gpu with a session off the GPU), or None."""
        if not self.options.require_gpu:
            return None
        off = [r for r in self.sessions if r.provider not in GPU_PROVIDERS]
        if not off:
            return None
        why = self.fallback_reason or (
            f"this onnxruntime offers no GPU provider (it offers {', '.join(self.available)}): "
            "install the gpu extra"
        )
        who = "the model runs" if len(self.sessions) == 1 else (
            f"{len(off)} of {len(self.sessions)} instances run"
        )  # fmt: skip
        return f"require_gpu is set but {who} on {CPU} ({why})"

    def report(self) -> dict[str, Any]:
        """The pool for model metadata: provider, fallback reason, and every session's report."""
        return {
            "provider": self.provider,
            "fallback_reason": self.fallback_reason,
            "io_binding": self.io_binding,
            "sessions": [r.as_dict() for r in self.sessions],
        }

    # -- running ------------------------------------------------------------------------------
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch on a free session; returns every output by name.

        ModelRunError when ONNX Runtime refuses the input (the caller's fault); anything else
        propagates as it is (ours).
        """
        slot = self._slots.get()
        try:
            return self._run(slot, inputs)
        except Exception as exc:
            raise run_error(exc) from exc
        finally:
            self._slots.put(slot)

    def _run(self, slot: _Slot, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if slot.binder is not None:
            return slot.binder.run(inputs)
        options = None
        if sum(a.size for a in inputs.values()) >= SHRINK_ELEMENTS:
            options = self._shrink  # a large batch: give its arena growth back afterwards
        outputs = slot.session.run(self.output_names, inputs, options)
        return dict(zip(self.output_names, outputs, strict=True))

    def warm_up_sizes(self, max_batch_size: int) -> tuple[int, ...]:
        """Batch sizes to warm before ready: on a GPU every size the batcher can form (each new
        shape costs a cuDNN search, a CUDA graph capture or a TensorRT engine), else 1 and the
        largest."""
        top = max(1, max_batch_size)
        return tuple(range(1, top + 1)) if self.on_gpu else tuple(sorted({1, top}))

    def warm_up_lengths(self) -> tuple[int, ...]:
        """Lengths to give dynamic non-batch axes during warm-up (several on a GPU)."""
        return GPU_WARM_UP_LENGTHS if self.on_gpu else CPU_WARM_UP_LENGTHS

    def warm_up(self, examples: Sequence[dict[str, np.ndarray]]) -> None:
        """Run each example on every session (a CUDA graph session until its graph is captured),
        so that allocation and searches happen before the model reports ready."""
        held = [self._slots.get() for _ in self.sessions]
        try:
            for slot in held:
                runs = CUDA_GRAPH_WARM_RUNS if slot.report.cuda_graph == "on" else 1
                for example in examples:
                    for _ in range(runs):
                        self._run(slot, example)
        finally:
            for slot in held:
                self._slots.put(slot)
