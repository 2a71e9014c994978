"""Request bodies drawn from a model's real held-out samples, and checks of the answers.

Pure Python + NumPy (no Locust, no HTTP client), so the locustfile, the runner and the tests share
one implementation. A model is described by its v2 metadata (`GET /v2/models/{m}`); its inputs
come from `<repository>/<model>/<latest version>/samples.npz` (key `inputs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.codec import NP_TYPES, encode_request

#: The ways a request can be sent: v2 JSON tensors, v2 binary tensors, v1 `instances`.
PROTOCOLS = ("v2-json", "v2-binary", "v1")
HEADER_LENGTH = "inference-header-content-length"
#: Fields every v1 prediction carries, by the model's task (see service/postprocess.py).
V1_FIELDS = {
    "classification": {"label", "class_index", "probabilities"},
    "anomaly": {"score", "is_anomaly"},
    "forecast": {"forecast"},
}
#: Upper bound on the bytes one pool of pre-encoded bodies may hold.
POOL_BYTES = 16 * 1024 * 1024


def latest_version_dir(repository: Path, model: str) -> Path:
    """`<repository>/<model>/<highest numeric version>`; FileNotFoundError says what is missing."""
    folder = Path(repository) / model
    found = folder.iterdir() if folder.is_dir() else ()
    versions = [int(p.name) for p in found if p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(
            f"no versions of model '{model}' under {folder}: point --repository (or "
            "LOADTEST_REPOSITORY) at a model repository built by `onnxserve build`"
        )
    return folder / str(max(versions))


def load_samples(repository: Path, model: str) -> np.ndarray:
    """The real held-out inputs stored beside the model (`samples.npz`, key `inputs`)."""
    path = latest_version_dir(repository, model) / "samples.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rebuild the repository with `onnxserve build`")
    with np.load(path) as data:
        if "inputs" not in data.files:
            raise ValueError(f"{path} has no 'inputs' array (has {data.files})")
        return data["inputs"]


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`queue;dur=1.2, compute;dur=0.3, total;dur=1.9` -> {"queue": 1.2, ...} (milliseconds)."""
    timings: dict[str, float] = {}
    for metric in (header or "").split(","):
        name, _, params = metric.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    timings[name] = float(value)
                except ValueError:
                    pass
    return timings


def parse_mix(text: str, models: tuple[str, ...] | list[str]) -> dict[str, float]:
    """`cnn:6,autoencoder:3,lstm:1` -> {model: weight > 0}; ValueError names what is wrong."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, _, weight = part.partition(":")
        if model not in models:
            raise ValueError(f"--mix: unknown model {model!r}; choose from {', '.join(models)}")
        try:
            weights[model] = float(weight or 1)
        except ValueError:
            raise ValueError(f"--mix: weight {weight!r} of {model} is not a number") from None
    if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"--mix needs positive weights, got {text!r}")
    return {m: w for m, w in weights.items() if w > 0}


@dataclass(frozen=True, slots=True)
class Payload:
    """One ready-to-send request."""

    path: str
    body: bytes
    headers: dict[str, str]
    rows: int


@dataclass
class ModelTraffic:
    """Requests for one served model, built from its metadata and its held-out samples."""

    metadata: dict[str, Any]
    samples: np.ndarray
    _pools: dict[tuple[str, int], list[Payload]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        inputs = self.metadata.get("inputs") or []
        if len(inputs) != 1:
            raise ValueError(f"model '{self.name}' has {len(inputs)} inputs; load tests need one")
        spec = inputs[0]
        dtype = NP_TYPES.get(spec["datatype"])
        if dtype is None:
            raise ValueError(f"input '{spec['name']}' has unsupported datatype {spec['datatype']}")
        shape = list(spec["shape"])
        x = np.asarray(self.samples)
        fixed_ok = all(w in (-1, g) for w, g in zip(shape[1:], x.shape[1:], strict=False))
        if x.ndim != len(shape) or not fixed_ok or len(x) == 0:
            raise ValueError(
                f"samples of '{self.name}' have shape {list(x.shape)}; the server's metadata "
                f"says input '{spec['name']}' is {shape}: is the repository the one it serves?"
            )
        self.samples = np.ascontiguousarray(x, dtype=dtype)

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def input(self) -> dict[str, Any]:
        return self.metadata["inputs"][0]

    @property
    def task(self) -> str | None:
        return (self.metadata.get("parameters") or {}).get("task")

    def encode(self, protocol: str, x: np.ndarray) -> Payload:
        """One request carrying the rows `x` in the given protocol."""
        spec = self.input
        if protocol == "v1":
            body = orjson.dumps({"instances": x}, option=orjson.OPT_SERIALIZE_NUMPY)
            headers = {"Content-Type": "application/json"}
            return Payload(f"/v1/models/{self.name}:predict", body, headers, len(x))
        path = f"/v2/models/{self.name}/infer"
        if protocol == "v2-json":
            body, _ = encode_request({spec["name"]: x}, binary=False, binary_output=False)
            return Payload(path, body, {"Content-Type": "application/json"}, len(x))
        if protocol == "v2-binary":
            body, head = encode_request({spec["name"]: x})
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(head),
            }
            return Payload(path, body, headers, len(x))
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")

    def pool(self, protocol: str, rows: int, rng: np.random.Generator, size: int = 32):
        """Up to `size` pre-encoded requests of `rows` random sample rows each (cached).

        Rows are drawn without replacement within a request when there are enough samples.
        Pre-encoding keeps the load generator's CPU on sending, not on JSON encoding.
        """
        if rows < 1:
            raise ValueError("rows per request must be at least 1")
        key = (protocol, rows)
        if key not in self._pools:
            n = len(self.samples)
            pool: list[Payload] = []
            for _ in range(size):
                index = rng.choice(n, size=rows, replace=rows > n)
                pool.append(self.encode(protocol, self.samples[index]))
                if sum(len(p.body) for p in pool) > POOL_BYTES:
                    break
            self._pools[key] = pool
        return self._pools[key]

    def check(
        self,
        protocol: str,
        rows: int,
        status: int,
        content: bytes,
        header_length: str | None = None,
    ) -> str | None:
        """None when the answer is right for a request of `rows` rows, else what is wrong.

        Right means: HTTP 200; v2: every output the metadata lists, with its datatype, `rows`
        rows, its fixed dimensions and as many values (or bytes) as the shape says; v1: one
        prediction per row carrying the task's fields. `header_length` is the answer's
        Inference-Header-Content-Length header (binary outputs).
        """
        if status != 200:
            text = (content or b"")[:200].decode("utf-8", "replace")
            return f"HTTP {status}: {text}"
        try:
            if protocol == "v1":
                return self._check_v1(rows, content)
            return self._check_v2(rows, header_length, content)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return f"malformed answer: {type(exc).__name__}: {exc}"

    def _check_v1(self, rows: int, content: bytes) -> str | None:
        predictions = orjson.loads(content).get("predictions")
        if not isinstance(predictions, list) or len(predictions) != rows:
            got = len(predictions) if isinstance(predictions, list) else predictions
            return f"v1: expected {rows} predictions, got {got}"
        want = V1_FIELDS.get(self.task or "", set())
        for p in predictions:
            if not isinstance(p, dict) or not want <= set(p):
                return f"v1: a prediction lacks {sorted(want)}: {str(p)[:120]}"
        return None

    def _check_v2(self, rows: int, n: str | None, content: bytes) -> str | None:
        head = orjson.loads(content[: int(n)] if n else content)
        blob_size = len(content) - int(n) if n else 0
        got = {t["name"]: t for t in head.get("outputs") or []}
        specs = {o["name"]: o for o in self.metadata["outputs"]}
        if set(got) != set(specs):
            return f"v2: outputs {sorted(got)}, metadata lists {sorted(specs)}"
        binary_total = 0
        for name, spec in specs.items():
            tensor, shape, want = got[name], got[name]["shape"], spec["shape"]
            if tensor["datatype"] != spec["datatype"]:
                got_type, want_type = tensor["datatype"], spec["datatype"]
                return f"v2: output '{name}' is {got_type}, metadata says {want_type}"
            dims_ok = all(w in (-1, g) for w, g in zip(want[1:], shape[1:], strict=False))
            if len(shape) != len(want) or shape[0] != rows or not dims_ok:
                return f"v2: output '{name}' has shape {shape}; expected {want} with {rows} rows"
            count = math.prod(shape)
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                binary_total += size
                if size != count * NP_TYPES[spec["datatype"]].itemsize:
                    return f"v2: output '{name}' of shape {shape} has {size} bytes"
            elif len(tensor.get("data") or []) != count:
                return f"v2: output '{name}' of shape {shape} has {len(tensor['data'])} values"
        if binary_total != blob_size:
            return f"v2: {blob_size} bytes of binary data, the header accounts for {binary_total}"
        return None
