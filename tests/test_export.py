"""Export, parity and variants of briefly trained models on real held-out data."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import variants as variants_module
from export.fp16 import WRAPPER_NODES, to_fp16
from export.onnx_export import ExportError, check_io, export_onnx
from export.specs import PARITY_BATCHES, PARITY_WINDOWS, SPECS
from export.variants import Tolerance, make_variants
from export.verify import ParityError, check_parity, ort_predict, ort_session
from models.data import load_co2, load_digit_splits
from models.train import Trained

pytestmark = pytest.mark.integration


def _export(module: torch.nn.Module, name: str, path: Path) -> Path:
    spec = SPECS[name]
    example, _ = spec.samples()
    export_onnx(module, path, example[:2], spec.inputs, spec.outputs)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Trained, Path]]:
    """Each model briefly trained (quick mode, real data) and exported to ONNX."""
    root = tmp_path_factory.mktemp("export")
    result = {}
    for name, spec in SPECS.items():
        trained = spec.module.train(root / name, quick=True)
        result[name] = (trained, _export(trained.module, name, root / name / "model.onnx"))
    return result


def _parity(name: str, module: torch.nn.Module, path: Path) -> dict:
    """Parity exactly as the build runs it."""
    spec = SPECS[name]
    return check_parity(
        module, ort_session(path), spec.parity_batches(), spec.module.OUTPUTS, argmax=spec.argmax
    )


@pytest.mark.parametrize("name", ["cnn", "lstm", "autoencoder"])
def test_parity_over_the_held_out_set(exported: dict, name: str) -> None:
    trained, path = exported[name]
    report = _parity(name, trained.module, path)
    assert all(d <= 1e-4 for d in report["max_abs_diff"].values())
    onnx.checker.check_model(str(path), full_check=True)


def test_parity_covers_the_whole_held_out_set() -> None:
    assert sum(map(len, SPECS["cnn"].parity_batches())) == len(load_digit_splits().test.y)
    windows = len(load_co2().test_targets)
    batches = list(SPECS["lstm"].parity_batches())
    assert {b.shape[1] for b in batches} == set(PARITY_WINDOWS)
    assert {len(b) for b in batches} >= set(PARITY_BATCHES)
    assert sum(map(len, batches)) == windows * len(PARITY_WINDOWS) * len(PARITY_BATCHES)


@pytest.mark.parametrize(
    ("name", "parameter", "expect"),
    [
        ("cnn", "net.classifier.4.bias", "probabilities"),
        ("lstm", "lstm.weight_hh_l1", "forecast"),
        ("autoencoder", "net.net.11.bias", "reconstruction"),
    ],
)
def test_parity_fails_when_the_graph_is_wrong(
    exported: dict, name: str, parameter: str, expect: str
) -> None:
    trained, path = exported[name]
    broken = copy.deepcopy(trained.module)
    with torch.no_grad():
        broken.get_parameter(parameter).view(-1)[0] += 0.5  # one weight, after export
    with pytest.raises(ParityError, match=expect):
        _parity(name, broken, path)


def test_cnn_parity_catches_a_flipped_label(exported: dict) -> None:
    trained, path = exported["cnn"]
    broken = copy.deepcopy(trained.module)
    with torch.no_grad():
        broken.net.classifier[-1].bias[7] += 100.0
    with pytest.raises(ParityError, match=r"label: \d+ integer values differ") as info:
        _parity("cnn", broken, path)
    assert "probabilities: argmax differs" in str(info.value)


def test_graph_computes_its_post_processing(exported: dict) -> None:
    digits = load_digit_splits().test.x[:32].numpy()
    out = ort_predict(ort_session(exported["cnn"][1]))(digits)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out["label"], out["probabilities"].argmax(1))
    assert out["label"].dtype == np.int64
    out = ort_predict(ort_session(exported["autoencoder"][1]))(digits)
    mse = ((out["reconstruction"] - digits) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out["score"], mse, rtol=1e-5)
    # any window length >= 3; a flat series moves by the learned mean change only
    session = ort_session(exported["lstm"][1])
    for window in (3, 9, 300):
        series = np.full((5, window, 1), 350.0, dtype=np.float32)
        forecast = ort_predict(session)(series)["forecast"]
        assert forecast.shape == (5, 1)
        np.testing.assert_allclose(forecast, forecast[0, 0])
        assert abs(float(forecast[0, 0]) - 350.0) < 5.0


def test_export_rejects_a_graph_that_breaks_the_declared_io(exported: dict) -> None:
    spec = SPECS["cnn"]
    model = onnx.load(str(exported["cnn"][1]))
    check_io(model, spec.inputs, spec.outputs)
    wrong = [spec.outputs[0], spec.outputs[1].model_copy(update={"datatype": "INT32"})]
    with pytest.raises(ExportError, match="output 'label'"):
        check_io(model, spec.inputs, wrong)
    with pytest.raises(ExportError, match="input 'image'"):
        check_io(model, [spec.inputs[0].model_copy(update={"shape": [-1, 1, 32, 32]})], wrong)


def test_variants_within_tolerance_are_kept(exported: dict) -> None:
    trained, path = exported["cnn"]
    variants = make_variants(path, trained.evaluate, Tolerance("accuracy", 0.5))
    assert [v.kind for v in variants] == ["optimized", "int8", "fp16"]
    assert all(v.accepted and (path.parent / v.file).is_file() for v in variants)
    int8, fp16 = variants[1:]
    assert int8.size_bytes < path.stat().st_size / 2
    assert fp16.size_bytes < path.stat().st_size * 0.6  # FP16 weights
    assert "within tolerance" in int8.reason and int8.metric == "accuracy"


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_variant_breaking_the_tolerance_is_refused(exported: dict, kind: str) -> None:
    trained, path = exported["cnn"]
    # a tolerance no variant can meet: it would have to gain a whole point of accuracy
    (variant,) = make_variants(path, trained.evaluate, Tolerance("accuracy", -1.0), kinds=[kind])
    assert not variant.accepted
    assert (
        variant.reason.startswith("refused:")
        and "accuracy may drop by at most -1" in variant.reason
    )
    assert not (path.parent / variant.file).exists()
    assert variant.delta == pytest.approx(variant.value - trained.metrics["accuracy"])


def test_relative_tolerance_for_errors() -> None:
    rule = Tolerance("rmse", 0.05, higher_is_better=False, relative=True)
    assert rule.worsening(0.40, 0.41) == pytest.approx(0.025)
    assert rule.worsening(0.40, 0.43) > rule.max_worsening
    assert rule.describe() == "rmse may rise by at most 5%"


def test_variant_that_cannot_be_built_is_recorded_as_refused(
    exported: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained, path = exported["autoencoder"]

    def broken(source: Path, target: Path) -> None:
        target.write_bytes(b"half a file")
        raise RuntimeError("converter says no")

    monkeypatch.setitem(variants_module.BUILDERS, "int8", broken)
    (variant,) = make_variants(path, trained.evaluate, Tolerance("auroc", 0.5), kinds=["int8"])
    assert not variant.accepted and "converter says no" in variant.reason
    assert variant.reason.startswith("refused: could not build or run it")
    assert not (path.parent / variant.file).exists()


@pytest.mark.parametrize("name", ["cnn", "lstm", "autoencoder"])
def test_fp16_keeps_io_and_the_wrapper_in_fp32(exported: dict, name: str, tmp_path: Path) -> None:
    _, path = exported[name]
    kept = to_fp16(path, tmp_path / "model.fp16.onnx", WRAPPER_NODES)
    model = onnx.load(str(tmp_path / "model.fp16.onnx"))
    source = onnx.load(str(path))
    top_level = [
        n.name for n in source.graph.node if n.name.startswith("/") and n.name.count("/") == 1
    ]
    assert kept == top_level
    assert _types(model.graph.input) == _types(source.graph.input)
    assert _types(model.graph.output) == _types(source.graph.output)
    weights = [t for t in model.graph.initializer if np.prod(t.dims) > 16]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    # what the wrapper computes (softmax, differencing, de-standardisation, score) stays FP32
    inferred = onnx.shape_inference.infer_shapes(model).graph
    values = _types([*inferred.input, *inferred.value_info, *inferred.output])
    outputs = [o for n in model.graph.node if n.name in kept and n.op_type != "Constant"
               for o in n.output]  # fmt: skip
    assert outputs and all(values[o] != onnx.TensorProto.FLOAT16 for o in outputs)
    assert onnx.TensorProto.FLOAT in {values[o] for o in outputs}


def _types(values: list) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values}


def test_fp16_lstm_keeps_ppm_levels_exact(exported: dict, tmp_path: Path) -> None:
    """FP16 steps by 0.25 around 400 ppm: the converter's own casts at the graph's input and
    output would round the levels before the differencing and the forecast after it."""
    _, path = exported["lstm"]
    to_fp16(path, tmp_path / "model.fp16.onnx", WRAPPER_NODES)
    windows, _ = load_co2().test_windows(52)
    fp32 = ort_predict(ort_session(path))(windows)["forecast"]
    fp16 = ort_predict(ort_session(tmp_path / "model.fp16.onnx"))(windows)["forecast"]
    assert np.abs(fp16 - fp32).max() < 0.02  # ppm
