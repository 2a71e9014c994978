"""Triton's own Python client against our server, unmodified: JSON and binary tensors."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import samples
from tests.test_server import reference

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def test_server_and_model_readiness_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cnn")
    meta = client.get_model_metadata("cnn")
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "label"}
    assert client.get_server_metadata()["name"] == "onnxserve"


@pytest.mark.parametrize("binary", [True, False])
def test_cnn_infer_equals_in_process_onnxruntime(client, repository, binary):
    x = samples(repository, "cnn")[:16].astype(np.float32)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary),
        httpclient.InferRequestedOutput("label", binary_data=not binary),
    ]
    result = client.infer("cnn", [inp], outputs=outs, request_id="t-1")
    want = reference(repository, "cnn", x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), want["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), want["label"])
    assert result.get_response()["id"] == "t-1"


def test_lstm_and_autoencoder_through_the_client(client, repository):
    w = samples(repository, "lstm")[:7, :52].astype(np.float32)
    inp = httpclient.InferInput("series", list(w.shape), "FP32")
    inp.set_data_from_numpy(w)
    got = client.infer("lstm", [inp]).as_numpy("forecast")
    np.testing.assert_allclose(got, reference(repository, "lstm", w)["forecast"], rtol=1e-5)

    x = samples(repository, "autoencoder")[:4].astype(np.float32)
    inp = httpclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("autoencoder", [inp], outputs=[httpclient.InferRequestedOutput("score")])
    assert result.as_numpy("reconstruction") is None
    np.testing.assert_allclose(
        result.as_numpy("score"), reference(repository, "autoencoder", x)["score"], rtol=1e-5
    )


def test_client_sees_our_errors(client):
    inp = httpclient.InferInput("image", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.infer("nope", [inp])
