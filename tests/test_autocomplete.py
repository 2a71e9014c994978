"""Config auto-complete against a graph: inferred, completed, or refused naming the field."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from service.autocomplete import GraphTensor, complete_config, graph_tensors
from service.model_config import ConfigError

pytestmark = pytest.mark.unit

IMAGE = [GraphTensor("image", "FP32", [-1, 1, 28, 28])]
PROBS = [GraphTensor("probs", "FP32", [-1, 10]), GraphTensor("label", "INT64", [-1])]


@dataclass
class Arg:  # what onnxruntime's NodeArg tells
    name: str
    type: str
    shape: list


def test_graph_types_and_dims_become_protocol_terms():
    args = [Arg("s", "tensor(string)", [None]), Arg("x", "tensor(float16)", ["batch", 3, "t"])]
    assert graph_tensors("input", args) == [
        GraphTensor("s", "BYTES", [-1]),
        GraphTensor("x", "FP16", [-1, 3, -1]),
    ]


def test_a_zipmap_output_is_refused_with_a_hint():
    with pytest.raises(ConfigError, match="zipmap"):
        graph_tensors("output", [Arg("p", "seq(map(string,tensor(float)))", [])])


def test_no_config_is_batchable_from_the_server_default():
    config = complete_config("m", None, IMAGE, PROBS, default_max_batch_size=16)
    assert config.name == "m" and config.task is None and config.batching.max_batch_size == 16
    assert [o.name for o in config.outputs] == ["probs", "label"]


def test_a_fixed_first_axis_means_no_batching():
    fixed = [GraphTensor("x", "FP32", [2, 3])]
    config = complete_config("m", None, fixed, fixed[:1], default_max_batch_size=16)
    assert config.batching.max_batch_size == 0 and not config.batchable
    with pytest.raises(ConfigError, match=r"batching.max_batch_size: config says 4.*'x'"):
        complete_config("m", {"batching": {"max_batch_size": 4}}, fixed, fixed, 16)


def test_a_partial_config_is_completed():
    doc = {
        "task": "classification",
        "labels": [str(i) for i in range(10)],
        "outputs": [{"name": "probs", "description": "softmax"}],
        "batching": {"max_queue_delay_ms": 1},
    }
    config = complete_config("m", doc, IMAGE, PROBS, default_max_batch_size=8)
    assert config.outputs[0].description == "softmax" and config.outputs[0].shape == [-1, 10]
    assert [o.name for o in config.outputs] == ["probs", "label"]
    assert config.batching.max_queue_delay_ms == 1 and config.batching.max_batch_size == 8


@pytest.mark.parametrize(
    ("doc", "field", "values"),
    [
        ({"name": "other"}, "name", ("other", "m")),
        ({"inputs": [{"name": "img"}]}, "inputs[0].name", ("img", "image")),
        (
            {"inputs": [{"name": "image", "datatype": "FP16"}]},
            "inputs[0].datatype",
            ("FP16", "FP32"),
        ),
        ({"inputs": [{"name": "image", "shape": [-1, 28, 28]}]}, "inputs[0].shape", ("rank 4",)),
        ({"outputs": [{"name": "probs", "shape": [-1, 9]}]}, "outputs[0].shape", ("9", "10")),
    ],
)
def test_a_contradicting_config_is_refused_naming_the_field(doc, field, values):
    with pytest.raises(ConfigError) as caught:
        complete_config("m", doc, IMAGE, PROBS, default_max_batch_size=8)
    message = str(caught.value)
    assert message.startswith(field) and all(v in message for v in values), message
