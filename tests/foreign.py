"""ONNX models that onnxserve did not train, built here the ways users get theirs: graphs written
with `onnx.helper`, and a scikit-learn pipeline converted with skl2onnx. Test support only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def two_inputs(path: Path) -> Path:
    """x FP32 [N,3] and k INT64 [N,1] -> y = x * k (FP32 [N,3]), k_next = k + 1 (INT64 [N,1])."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "kf"], ["y"]),
            helper.make_node("Add", ["k", "one"], ["k_next"]),
        ],
        "two_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("k", TensorProto.INT64, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("k_next", TensorProto.INT64, ["batch", 1]),
        ],
        [numpy_helper.from_array(np.array([1], np.int64), "one")],
    )
    return _save(graph, path)


def fixed_shape(path: Path) -> Path:
    """No batch axis: x FP32 [2,3] -> y = relu(x) FP32 [2,3]."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
    )
    return _save(graph, path)


def half(path: Path) -> Path:
    """FP16: x [N,4] -> y = x * x + 1 (FP16 [N,4])."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Add", ["sq", "c"], ["y"])],
        "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [None, 4])],
        [numpy_helper.from_array(np.array(1, np.float16), "c")],
    )
    return _save(graph, path)


def ragged(path: Path) -> Path:
    """A dynamic non-batch axis: x FP32 [N,T,2] -> y = sum over T (FP32 [N,2])."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return _save(graph, path)


def iris_pipeline(path: Path) -> Path:
    """scikit-learn scaler + logistic regression on iris with string labels, via skl2onnx
    (`zipmap` off: a label tensor of strings and a probability matrix)."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_iris()
    x = data.data.astype(np.float32)
    y = np.asarray(data.target_names)[data.target]
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y)
    model = to_onnx(
        pipeline, x[:1], options={id(pipeline.steps[-1][1]): {"zipmap": False}}, target_opset=OPSET
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def iris_inputs(rows: int = 12) -> np.ndarray:
    from sklearn.datasets import load_iris

    return load_iris().data.astype(np.float32)[::7][:rows]
