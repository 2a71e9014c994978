"""Provider choice, GPU fallback, require_gpu, thread sizing and IO binding, without a GPU.

A stand-in `onnxruntime` module reports GPU providers and fails (or silently ignores) them, while
every session that does get made is a real CPU session over a real ONNX file.
"""

import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    ModelRuntime,
    RuntimeOptions,
    intra_op_threads,
    provider_options,
    select_providers,
)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def double_model(tmp_path_factory):
    """y = 2x and s = sum(x) over a dynamic batch: a real ONNX file."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["y"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
        ],
        "double",
        [x],
        [y, s],
        initializer=[two, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    onnx.save(model, path)
    return path


def fake_ort(available, fail=(), ignore=()):
    """onnxruntime with `available` providers; those in `fail` raise, those in `ignore` are
    silently dropped (as onnxruntime does when CUDA libraries are missing)."""
    created = []

    def session(path, sess_options=None, providers=()):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        created.append(names)
        if names[0] in fail:
            raise RuntimeError(f"{names[0]}: libcudnn.so.9 not found")
        real = [p for p in names if p not in ignore and p not in (CUDA, TENSORRT)]
        return ort.InferenceSession(str(path), sess_options=sess_options, providers=real)

    module = types.SimpleNamespace(
        get_available_providers=lambda: list(available),
        InferenceSession=session,
        SessionOptions=ort.SessionOptions,
        GraphOptimizationLevel=ort.GraphOptimizationLevel,
    )
    module.created = created
    return module


def test_default_preference_is_tensorrt_cuda_cpu_filtered_by_availability():
    assert select_providers(None, [CPU]) == [CPU]
    assert select_providers(None, [CPU, CUDA]) == [CUDA, CPU]
    assert select_providers(None, [CPU, CUDA, TENSORRT]) == [TENSORRT, CUDA, CPU]


def test_requested_order_is_kept_and_cpu_is_always_the_last_resort():
    assert select_providers([CUDA, TENSORRT], [TENSORRT, CUDA, CPU]) == [CUDA, TENSORRT, CPU]
    assert select_providers([TENSORRT], [CPU]) == [CPU]
    assert select_providers([CPU, CUDA], [CUDA, CPU]) == [CUDA, CPU]


def test_cuda_options_default_to_heuristic_conv_search():
    opts = provider_options(CUDA, RuntimeOptions(device_id=1))
    assert opts == {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}
    assert provider_options(CPU, RuntimeOptions()) == {}


def test_threads_never_oversubscribe_the_cores():
    assert intra_op_threads(0, instances=1, cores=8) == 8
    assert intra_op_threads(0, instances=3, cores=8) == 2
    assert intra_op_threads(0, instances=4, cores=2) == 1
    assert intra_op_threads(6, instances=2, cores=8) == 4
    assert intra_op_threads(1, instances=1, cores=8) == 1


def test_cpu_only_machine_runs_on_cpu(double_model):
    rt = ModelRuntime(double_model, RuntimeOptions(), ort=fake_ort([CPU]))
    assert rt.provider == CPU and rt.fallback_reason is None and rt.not_ready_reason is None
    out = rt.run({"x": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(out["y"], np.full((2, 3), 2, np.float32))


def test_gpu_session_failure_falls_back_to_cpu_with_the_reason(double_model, caplog):
    fake = fake_ort([CUDA, CPU], fail={CUDA})
    rt = ModelRuntime(double_model, RuntimeOptions(), ort=fake)
    assert fake.created[0] == [CUDA, CPU] and fake.created[1] == [CPU]
    assert rt.provider == CPU
    assert "libcudnn" in rt.fallback_reason
    assert "falling back" in caplog.text
    assert rt.run({"x": np.ones((1, 3), np.float32)})["s"].tolist() == [3.0]


def test_silent_cpu_placement_is_noticed(double_model):
    rt = ModelRuntime(double_model, RuntimeOptions(), ort=fake_ort([CUDA, CPU], ignore={CUDA}))
    assert rt.provider == CPU
    assert "placed the model on CPUExecutionProvider" in rt.fallback_reason


def test_require_gpu_makes_a_cpu_fallback_not_ready(double_model):
    opts = RuntimeOptions(require_gpu=True)
    rt = ModelRuntime(double_model, opts, ort=fake_ort([CUDA, CPU], fail={CUDA}))
    assert rt.not_ready_reason is not None
    assert "require_gpu" in rt.not_ready_reason and "libcudnn" in rt.not_ready_reason
    cpu_only = ModelRuntime(double_model, opts, ort=fake_ort([CPU]))
    assert "no GPU provider" in cpu_only.not_ready_reason


def test_io_binding_path_gives_the_same_answer(double_model):
    rt = ModelRuntime(double_model, RuntimeOptions(), instances=2)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    plain = rt.run({"x": x})
    rt.io_binding = True  # the CUDA path's code, exercised on the CPU device
    bound = rt.run({"x": x})
    for name in ("y", "s"):
        np.testing.assert_allclose(bound[name], plain[name], rtol=1e-6)


def test_instances_each_get_a_session_and_warm_up_runs_on_all(double_model):
    rt = ModelRuntime(double_model, RuntimeOptions(), instances=3)
    assert rt._sessions.qsize() == 3
    rt.warm_up([{"x": np.zeros((1, 3), np.float32)}, {"x": np.zeros((8, 3), np.float32)}])
    assert rt._sessions.qsize() == 3
