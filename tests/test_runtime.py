"""Provider walk, per-session checks, GPU options, IO binding and warm-up, without a GPU.

`StandIn` is an `onnxruntime` module that behaves as the real onnxruntime-gpu 1.31.1 wheel was
measured to behave (docs/gpu.md, "What ONNX Runtime does when a provider fails"): TensorRT
without its libraries makes session creation raise, and with ONNX Runtime's fallback on (its
default) the Python layer prints, retries with CUDA and CPU and *no options*, and does not raise;
CUDA without its libraries is skipped by the C++ layer without raising, fallback on or off; a bad
device id raises. A working GPU provider is a real CPU session that reports that provider, its
options as ONNX Runtime formats them, and node placement. Every session runs a real ONNX file.
"""

from __future__ import annotations

import ctypes
import logging
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.config import BatchingOverride, Settings
from service.runtime import (
    CPU,
    CUDA,
    CUDA_GRAPH_WARM_RUNS,
    GPU_WARM_UP_LENGTHS,
    TENSORRT,
    BoundRunner,
    ModelRuntime,
    RuntimeOptions,
    intra_op_threads,
    ort_error_text,
    probe_provider_library,
    provider_options,
    select_providers,
    trt_profiles,
    unoffered,
)

pytestmark = pytest.mark.unit

# What onnxruntime-gpu 1.31.1 said on a machine without TensorRT, CUDA or a GPU (captured).
TRT_MISSING = (
    "/onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void onnxruntime::"
    "python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const onnxruntime::"
    "ProviderOptions&) Please install TensorRT libraries as mentioned in the GPU requirements "
    "page, make sure they're in the PATH or LD_LIBRARY_PATH, and that your GPU is supported."
)
BAD_DEVICE = (
    "/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:129 std::conditional_t<THRW, "
    "void, onnxruntime::common::Status> onnxruntime::CudaCall(ERRTYPE, const char*, const char*, "
    "SUCCTYPE, const char*, const char*, int) [with ERRTYPE = cudaError; bool THRW = true; "
    "SUCCTYPE = cudaError; std::conditional_t<THRW, void, common::Status> = void] CUDA failure "
    "101: invalid device ordinal ; GPU=0 ; hostname=h ; expr=cudaSetDevice(info_.device_id);"
)
GRAPH_REFUSED = (
    "This session cannot use the graph capture feature as requested by the user as all compute "
    "graph nodes have not been partitioned to the CUDAExecutionProvider"
)
# CUDA provider options as onnxruntime reports them (every option, as strings).
CUDA_REPORTED = {
    "device_id": "0", "gpu_mem_limit": "18446744073709551615",
    "arena_extend_strategy": "kNextPowerOfTwo", "cudnn_conv_algo_search": "EXHAUSTIVE",
    "do_copy_in_default_stream": "1", "use_tf32": "1", "enable_cuda_graph": "0",
}  # fmt: skip


class _Value:
    """A device OrtValue: numpy() copies to the host, as a CUDA OrtValue's does."""

    def __init__(self, real):
        self.real = real

    def numpy(self):
        return self.real.numpy().copy()

    def update_inplace(self, array):
        self.real.update_inplace(array)


class _Binding:
    def __init__(self, real):
        self.real = real

    def bind_ortvalue_input(self, name, value):
        self.real.bind_ortvalue_input(name, value.real)

    def bind_ortvalue_output(self, name, value):
        self.real.bind_ortvalue_output(name, value.real)

    def bind_output(self, name, device, device_id=0):
        assert device == "cuda"
        self.real.bind_output(name, "cpu", 0)

    def get_outputs(self):
        return [_Value(v) for v in self.real.get_outputs()]


class _Session:
    """A real CPU session that reports a GPU provider, its options and node placement."""

    def __init__(self, real, providers, options, cpu_ops):
        self._real, self._providers, self._options, self._cpu_ops = (
            real,
            providers,
            options,
            cpu_ops,
        )
        self.runs = []

    def get_providers(self):
        return list(self._providers)

    def get_provider_options(self):
        return self._options

    def get_provider_graph_assignment_info(self):
        moved = []
        for sub in self._real.get_provider_graph_assignment_info():
            for node in sub.get_nodes():
                ep = CPU if node.op_type in self._cpu_ops else self._providers[0]
                moved.append(types.SimpleNamespace(ep_name=ep, get_nodes=lambda n=node: [n]))
        return moved

    def io_binding(self):
        return _Binding(self._real.io_binding())

    def run_with_iobinding(self, binding, run_options=None):
        graph = run_options.get_run_config_entry("gpu_graph_id") if run_options else None
        self.runs.append(graph)
        self._real.run_with_iobinding(binding.real, run_options)

    def __getattr__(self, name):
        return getattr(self._real, name)


class StandIn(types.SimpleNamespace):
    """`onnxruntime` offering `available`; see the module docstring for the failure kinds."""

    def __init__(
        self,
        tmp_path,
        available,
        *,
        raising=None,
        dropped=(),
        devices=1,
        refuse_graph=False,
        cpu_ops=(),
        pinned=None,
    ):
        capi = tmp_path / "capi"
        capi.mkdir(exist_ok=True)
        for lib in ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so"):
            (capi / lib).write_bytes(b"not a shared object")  # the real loader refuses it
        (capi / "__init__.py").write_text("")
        super().__init__(
            SessionOptions=ort.SessionOptions,
            GraphOptimizationLevel=ort.GraphOptimizationLevel,
            RunOptions=ort.RunOptions,
            OrtValue=types.SimpleNamespace(ortvalue_from_shape_and_type=self._value),
            capi=types.SimpleNamespace(__file__=str(capi / "__init__.py")),
        )
        self.available, self.raising, self.dropped = list(available), raising or {}, set(dropped)
        self.devices, self.refuse_graph, self.cpu_ops = devices, refuse_graph, set(cpu_ops)
        self.pinned = pinned or {}
        self.created, self.values, self.printed = [], [], []

    def get_available_providers(self):
        return list(self.available)

    def _value(self, shape, dtype, device="cpu", device_id=0):
        self.values.append((tuple(shape), device, device_id))
        return _Value(ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0))

    def InferenceSession(self, path, sess_options=None, providers=None, **kwargs):  # noqa: N802
        fallback = int(kwargs.get("enable_fallback", 1)) == 1
        asked = [p if isinstance(p, tuple) else (p, {}) for p in providers]
        names = [name for name, _ in asked]
        self.created.append({"providers": asked, "fallback": fallback})
        try:
            return self._create(path, sess_options, asked)
        except RuntimeError as exc:
            if not fallback:
                raise
            retry = [CUDA, CPU] if TENSORRT in names and CUDA in names else [CPU]
            self.printed.append(f"EP Error {exc} when using {names}; falling back to {retry}")
            self.created.append({"providers": [(p, {}) for p in retry], "fallback": fallback})
            return self._create(path, sess_options, [(p, {}) for p in retry])

    def _create(self, path, sess_options, asked):
        kept = []
        for name, options in asked:
            if name in self.raising:
                raise RuntimeError(self.raising[name])
            if name in self.dropped:  # the C++ layer logs an error and carries on
                continue
            if name == CUDA:
                if int(options.get("device_id", 0)) >= self.devices:
                    raise RuntimeError(BAD_DEVICE)
                if self.refuse_graph and options.get("enable_cuda_graph") == "1":
                    raise RuntimeError(GRAPH_REFUSED)
            kept.append((name, options))
        if CPU not in [name for name, _ in kept]:
            kept.append((CPU, {}))  # onnxruntime always registers the CPU provider last
        real = ort.InferenceSession(str(path), sess_options=sess_options, providers=[CPU])
        if kept[0][0] == CPU:
            return real
        reported = {CPU: {}}
        for name, options in kept:
            if name == CUDA:
                reported[CUDA] = {**CUDA_REPORTED, **options, **self.pinned}
            elif name != CPU:
                reported[name] = dict(options)
        return _Session(real, [n for n, _ in kept], reported, self.cpu_ops)


def _save(tmp_path_factory, name, nodes, inputs, outputs, initializers):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp(name) / "model.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def double_model(tmp_path_factory):
    """y = 2x and s = sum(x) over a dynamic batch: a real ONNX file."""
    return _save(
        tmp_path_factory,
        "double",
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"]),
        ],
        [
            helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ],
    )


@pytest.fixture(scope="module")
def matmul_model(tmp_path_factory):
    """y = relu(x @ w) over a dynamic batch and a dynamic time axis."""
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    return _save(
        tmp_path_factory,
        "matmul",
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 2], w.ravel().tolist())],
    )


X = np.arange(15, dtype=np.float32).reshape(5, 3)


# -- choices -----------------------------------------------------------------------------------
def test_default_order_is_cuda_then_cpu_and_tensorrt_only_when_asked():
    assert select_providers(None, [CPU]) == [CPU]
    assert select_providers(None, [TENSORRT, CUDA, CPU]) == [CUDA, CPU]
    assert select_providers([TENSORRT, CUDA, CPU], [TENSORRT, CUDA, CPU]) == [TENSORRT, CUDA, CPU]
    assert select_providers([CUDA, TENSORRT], [TENSORRT, CUDA, CPU]) == [CUDA, TENSORRT, CPU]
    assert select_providers([CPU, CUDA], [CUDA, CPU]) == [CUDA, CPU]
    assert select_providers([TENSORRT], [CPU]) == [CPU]
    assert unoffered([TENSORRT, CPU], [CUDA, CPU]) == [TENSORRT] and unoffered(None, [CPU]) == []


def test_cuda_options_in_onnxruntime_format_tf32_off_by_default():
    assert provider_options(CUDA, RuntimeOptions(device_id=1)) == {
        "device_id": "1", "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kNextPowerOfTwo", "use_tf32": "0", "enable_cuda_graph": "0",
    }  # fmt: skip
    opts = RuntimeOptions(gpu_mem_limit=2**30, use_tf32=True, enable_cuda_graph=True)
    got = provider_options(CUDA, opts, device_id=3)
    assert got["device_id"] == "3" and got["gpu_mem_limit"] == str(2**30)
    assert got["use_tf32"] == "1" and got["enable_cuda_graph"] == "1"
    assert provider_options(CPU, opts) == {}


def test_tensorrt_options_keep_engines_and_timing_caches_with_profiles(tmp_path):
    meta = [types.SimpleNamespace(name="series", shape=["N", "T", 1])]
    profiles = trt_profiles(meta, 64, (8, 32, 128))
    assert profiles == {
        "trt_profile_min_shapes": "series:1x1x1",
        "trt_profile_opt_shapes": "series:64x32x1",
        "trt_profile_max_shapes": "series:64x128x1",
    }
    assert trt_profiles(meta, 0, (8,)) == {}
    assert trt_profiles([types.SimpleNamespace(name="x", shape=[2, 3])], 8, (8,)) == {}
    opts = provider_options(TENSORRT, RuntimeOptions(trt_engine_cache_path=tmp_path), 1, profiles)
    assert opts["trt_engine_cache_enable"] == opts["trt_timing_cache_enable"] == "1"
    assert opts["trt_engine_cache_path"] == opts["trt_timing_cache_path"] == str(tmp_path)
    assert opts["trt_profile_max_shapes"] == "series:64x128x1" and opts["device_id"] == "1"


def test_options_carry_every_gpu_setting_and_place_instances_round_robin(tmp_path):
    settings = Settings(
        providers=[CUDA, CPU], require_gpu=True, device_id=2, gpu_mem_limit=1 << 30,
        arena_extend_strategy="kSameAsRequested", use_tf32=True, enable_cuda_graph=True,
        io_binding=True, cudnn_conv_algo_search="DEFAULT", trt_engine_cache_path=tmp_path,
    )  # fmt: skip
    opts = RuntimeOptions.from_settings(settings, BatchingOverride(device_ids=[1, 3]))
    assert opts.providers == (CUDA, CPU) and opts.require_gpu and opts.io_binding
    assert (opts.gpu_mem_limit, opts.arena_extend_strategy) == (1 << 30, "kSameAsRequested")
    assert opts.use_tf32 and opts.enable_cuda_graph and opts.cudnn_conv_algo_search == "DEFAULT"
    assert opts.trt_engine_cache_path == tmp_path
    assert [opts.device_for(i) for i in range(4)] == [1, 3, 1, 3]
    plain = RuntimeOptions.from_settings(Settings(device_id=2), BatchingOverride())
    assert plain.device_for(5) == 2 and not plain.use_tf32 and not plain.io_binding
    assert (
        RuntimeOptions.from_settings(Settings(), BatchingOverride(max_batch_size=8)).max_batch_size
        == 8
    )


def test_onnxruntime_errors_lose_their_source_location():
    assert ort_error_text(RuntimeError(TRT_MISSING)).startswith("Please install TensorRT")
    assert ort_error_text(RuntimeError(BAD_DEVICE)).startswith("CUDA failure 101: invalid device")
    assert ort_error_text(RuntimeError("plain\n  words")) == "plain words"
    assert ort_error_text(RuntimeError()) == "RuntimeError"


def test_threads_never_oversubscribe_the_cores():
    assert intra_op_threads(0, instances=1, cores=8) == 8
    assert intra_op_threads(0, instances=3, cores=8) == 2
    assert intra_op_threads(0, instances=4, cores=2) == 1
    assert intra_op_threads(6, instances=2, cores=8) == 4


# -- the stand-in is faithful --------------------------------------------------------------------
def test_stand_in_falls_back_inside_the_constructor_like_onnxruntime(tmp_path, double_model):
    """Why the runtime turns the fallback off: with it on nothing raises and options vanish."""
    fake = StandIn(tmp_path, [TENSORRT, CUDA, CPU], raising={TENSORRT: TRT_MISSING}, dropped={CUDA})
    asked = [(TENSORRT, {}), (CUDA, {"device_id": "0"}), (CPU, {})]
    session = fake.InferenceSession(double_model, providers=asked)
    assert session.get_providers() == [CPU] and "Please install TensorRT" in fake.printed[0]
    assert fake.created[-1]["providers"] == [(CUDA, {}), (CPU, {})]  # options dropped
    with pytest.raises(RuntimeError, match="TensorRT"):
        fake.InferenceSession(double_model, providers=asked, enable_fallback=0)
    alone = fake.InferenceSession(double_model, providers=[(CUDA, {})], enable_fallback=0)
    assert alone.get_providers() == [CPU]  # a CUDA provider without libraries: no error at all


# -- the walk ----------------------------------------------------------------------------------
def test_cpu_build_runs_on_cpu_without_a_reason(tmp_path, double_model):
    fake = StandIn(tmp_path, ["AzureExecutionProvider", CPU])
    fake.preload_dlls = lambda: pytest.fail("no GPU provider to prepare for")
    rt = ModelRuntime(double_model, RuntimeOptions(), ort=fake)
    assert rt.provider == CPU and rt.fallback_reason is None and rt.not_ready_reason is None
    assert fake.created == [{"providers": [(CPU, {})], "fallback": False}]
    np.testing.assert_array_equal(rt.run({"x": X})["y"], 2 * X)
    needs = ModelRuntime(double_model, RuntimeOptions(require_gpu=True), ort=fake)
    assert "offers no GPU provider" in needs.not_ready_reason
    assert "AzureExecutionProvider" in needs.not_ready_reason
    asked = ModelRuntime(double_model, RuntimeOptions(providers=(CUDA, CPU)), ort=fake)
    assert asked.fallback_reason.startswith(f"{CUDA}: not offered by this onnxruntime build")


def test_missing_cuda_libraries_are_named_and_nothing_is_retried(tmp_path, double_model, caplog):
    fake = StandIn(tmp_path, [TENSORRT, CUDA, CPU], dropped={CUDA})
    rt = ModelRuntime(double_model, RuntimeOptions(cudnn_conv_algo_search="DEFAULT"), ort=fake)
    assert rt.provider == CPU
    (only,) = fake.created
    assert only["fallback"] is False and [p for p, _ in only["providers"]] == [CUDA, CPU]
    assert only["providers"][0][1]["cudnn_conv_algo_search"] == "DEFAULT"
    # The reason is what the system loader says about the provider's library.
    assert rt.fallback_reason.startswith(f"{CUDA}: ")
    assert "libonnxruntime_providers_cuda.so" in rt.fallback_reason
    assert rt.fallback_reason in caplog.text
    assert rt.sessions[0].failures[0][0] == CUDA


def test_tensorrt_only_when_asked_and_every_reason_kept(tmp_path, double_model):
    fake = StandIn(tmp_path, [TENSORRT, CUDA, CPU], raising={TENSORRT: TRT_MISSING}, dropped={CUDA})
    opts = RuntimeOptions(providers=(TENSORRT, CUDA, CPU), trt_engine_cache_path=tmp_path / "trt")
    rt = ModelRuntime(double_model, opts, ort=fake, probe=lambda p: f"{p} library: boom")
    walked = [[p for p, _ in c["providers"]] for c in fake.created if not c["fallback"]]
    assert walked[-2:] == [[TENSORRT, CUDA, CPU], [CUDA, CPU]]
    assert rt.fallback_reason == (
        f"{TENSORRT}: Please install TensorRT libraries as mentioned in the GPU requirements "
        "page, make sure they're in the PATH or LD_LIBRARY_PATH, and that your GPU is "
        f"supported.; {CUDA}: {CUDA} library: boom"
    )
    assert (tmp_path / "trt").is_dir()
    trt_options = fake.created[-2]["providers"][0][1]
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "trt")


def test_every_session_is_checked_and_binds_only_if_on_the_gpu(tmp_path, double_model):
    """A bad device id for the second instance: it alone runs on the CPU, unbound."""
    fake = StandIn(tmp_path, [CUDA, CPU], devices=1)
    opts = RuntimeOptions(device_ids=(0, 1), io_binding=True, require_gpu=True)
    rt = ModelRuntime(double_model, opts, instances=2, ort=fake)
    first, second = rt.sessions
    assert (first.provider, first.device_id, first.io_binding) == (CUDA, 0, True)
    assert (second.provider, second.device_id, second.io_binding) == (CPU, None, False)
    assert "CUDA failure 101: invalid device ordinal" in second.fallback_reason
    assert rt.provider == f"{CUDA},{CPU}" and not rt.io_binding and rt.gpus == [0]
    assert rt.fallback_reason.startswith("instance 1: ")
    assert rt.not_ready_reason.startswith("require_gpu is set but 1 of 2 instances run on CPU")
    for _ in range(4):  # both sessions answer the same
        np.testing.assert_allclose(rt.run({"x": X})["s"], X.sum(axis=1))
    report = rt.report()
    assert [s["provider"] for s in report["sessions"]] == [CUDA, CPU]


def test_options_in_effect_and_node_placement_are_checked(tmp_path, matmul_model, caplog):
    fake = StandIn(tmp_path, [CUDA, CPU], cpu_ops={"MatMul"}, pinned={"use_tf32": "1"})
    with caplog.at_level(logging.INFO, logger="service.runtime"):
        rt = ModelRuntime(matmul_model, RuntimeOptions(), ort=fake)
    (report,) = rt.sessions
    assert report.provider == CUDA and report.fallback_reason is None
    assert report.provider_options[CUDA]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert report.option_mismatches == {"use_tf32": ("0", "1")}
    assert report.nodes == {CPU: 1, CUDA: 1} and report.cpu_compute_nodes == ["MatMul"]
    assert "compute nodes ['MatMul'] run on CPUExecutionProvider" in caplog.text
    assert "option use_tf32=0 not in effect" in caplog.text
    assert rt.report()["sessions"][0]["option_mismatches"] == {
        "use_tf32": {"asked": "0", "in_effect": "1"}
    }


def test_cuda_graph_where_allowed_else_reported_and_served_without(tmp_path, matmul_model):
    refusing = StandIn(tmp_path, [CUDA, CPU], refuse_graph=True)
    rt = ModelRuntime(matmul_model, RuntimeOptions(enable_cuda_graph=True), ort=refusing)
    (report,) = rt.sessions
    assert report.provider == CUDA and report.cuda_graph.startswith("not eligible: This session")
    assert not report.io_binding and report.fallback_reason is None

    fake = StandIn(tmp_path, [CUDA, CPU])
    rt = ModelRuntime(matmul_model, RuntimeOptions(enable_cuda_graph=True), ort=fake)
    assert rt.sessions[0].cuda_graph == "on" and rt.io_binding
    x = np.ones((2, 4, 3), np.float32)
    rt.warm_up([{"x": x}, {"x": np.ones((3, 4, 3), np.float32)}])
    session = rt._slots.get()
    rt._slots.put(session)
    assert session.session.runs == ["0"] * CUDA_GRAPH_WARM_RUNS + ["1"] * CUDA_GRAPH_WARM_RUNS
    np.testing.assert_allclose(
        rt.run({"x": x})["y"], np.maximum(x @ np.arange(6.0).reshape(3, 2), 0)
    )


def test_gpu_libraries_are_preloaded_once_and_quietly(tmp_path, double_model, capsys, caplog):
    fake = StandIn(tmp_path, [CUDA, CPU], dropped={CUDA})
    calls = []

    def preload():
        calls.append(1)
        print("Failed to load libcublasLt.so.13: cannot open shared object file")

    fake.preload_dlls = preload
    with caplog.at_level(logging.INFO, logger="service.runtime"):
        ModelRuntime(double_model, RuntimeOptions(), instances=2, ort=fake)
        ModelRuntime(double_model, RuntimeOptions(), ort=fake)
    assert calls == [1] and capsys.readouterr().out == ""
    assert "preload_dlls(): Failed to load libcublasLt.so.13" in caplog.text


def test_provider_library_probe_reports_the_loader_error(tmp_path, monkeypatch):
    fake = StandIn(tmp_path, [CUDA, CPU])
    assert "libonnxruntime_providers_cuda.so" in probe_provider_library(fake, CUDA)
    assert probe_provider_library(fake, CPU) is None
    (tmp_path / "capi" / "libonnxruntime_providers_tensorrt.so").unlink()
    assert probe_provider_library(fake, TENSORRT).endswith("is missing")

    def loader(error):
        def load(path, mode=0):
            raise OSError(error)

        return load

    monkeypatch.setattr(ctypes, "CDLL", loader("libcuda.so.1: cannot open shared object file"))
    assert "comes with the NVIDIA driver" in probe_provider_library(fake, CUDA)
    monkeypatch.setattr(ctypes, "CDLL", loader("undefined symbol: Provider_GetHost"))
    assert (
        probe_provider_library(fake, CUDA) is None
    )  # not a verdict: leave it to the fallback text


# -- IO binding, warm-up ---------------------------------------------------------------------------
def test_bound_runner_reuses_buffers_per_shape_and_hands_out_copies(double_model):
    session = ort.InferenceSession(str(double_model), providers=[CPU])
    runner = BoundRunner(ort, session, "cpu", 0, capacity=2)
    first = runner.run({"x": X})
    again = runner.run({"x": X + 1})
    np.testing.assert_array_equal(first["y"], 2 * X)  # not overwritten by the second run
    np.testing.assert_array_equal(again["y"], 2 * (X + 1))
    assert len(runner._sets) == 1
    for rows in (1, 2, 3):
        np.testing.assert_array_equal(runner.run({"x": X[:rows]})["s"], X[:rows].sum(axis=1))
    assert len(runner._sets) == 2  # least recently used shapes dropped


def test_io_binding_on_the_gpu_gives_the_plain_answer(tmp_path, matmul_model):
    fake = StandIn(tmp_path, [CUDA, CPU])
    plain = ModelRuntime(matmul_model, RuntimeOptions(), ort=fake)
    bound = ModelRuntime(matmul_model, RuntimeOptions(io_binding=True, device_id=0), ort=fake)
    assert not plain.io_binding and bound.io_binding
    rng = np.random.default_rng(0)
    for rows in (1, 7, 7, 3):
        x = rng.normal(size=(rows, 5, 3)).astype(np.float32)
        np.testing.assert_allclose(bound.run({"x": x})["y"], plain.run({"x": x})["y"], rtol=1e-6)
    assert {(d, i) for _, d, i in fake.values} == {("cuda", 0)}


def test_warm_up_sizes_and_lengths_follow_the_provider(tmp_path, double_model):
    cpu = ModelRuntime(double_model, RuntimeOptions(), ort=StandIn(tmp_path, [CPU]))
    assert cpu.warm_up_sizes(32) == (1, 32) and cpu.warm_up_sizes(0) == (1,)
    assert cpu.warm_up_lengths() == (8,)
    gpu = ModelRuntime(double_model, RuntimeOptions(), ort=StandIn(tmp_path, [CUDA, CPU]))
    assert gpu.warm_up_sizes(5) == (1, 2, 3, 4, 5)
    assert gpu.warm_up_lengths() == GPU_WARM_UP_LENGTHS and len(GPU_WARM_UP_LENGTHS) > 1


def test_instances_each_get_a_session_and_warm_up_runs_on_all(double_model):
    rt = ModelRuntime(double_model, RuntimeOptions(), instances=3)
    assert len(rt.sessions) == 3 and rt._slots.qsize() == 3
    rt.warm_up([{"x": np.zeros((1, 3), np.float32)}, {"x": np.zeros((8, 3), np.float32)}])
    assert rt._slots.qsize() == 3
