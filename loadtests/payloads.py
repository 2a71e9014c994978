"""Requests for any served model, and checks of the answers: one implementation for the Locust
users, the runner, the benchmark and the tests.

Pure Python + NumPy (no Locust, no HTTP client). A model is described by its v2 metadata
(`GET /v2/models/{m}`). Its inputs are real held-out samples when the repository ships them
(`<repository>/<model>/<latest version>/samples.npz`: key `inputs` for a one-input model, else
one array per input name), otherwise random data of each input's datatype and shape (see
`random_inputs`). A batchable model (metadata `parameters.batching.max_batch_size` > 0) gets
`rows` rows per request; a model without a batch axis gets one whole tensor per input.
"""

from __future__ import annotations

import math
import re
import string
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service.codec import NP_TYPES, encode_request
from service.grpc import messages as grpc_messages
from service.grpc.tensors import infer_request
from service.model_config import SAMPLES_FILE, latest_version_dir

#: The ways a request can be sent: v2 JSON tensors, v2 binary tensors, v1 `instances` (HTTP),
#: and gRPC's ModelInfer with raw tensors (`mixed` draws from the HTTP ones only).
V2_JSON, V2_BINARY, V1, GRPC = "v2-json", "v2-binary", "v1", "grpc"
HTTP_PROTOCOLS = (V2_JSON, V2_BINARY, V1)
PROTOCOLS = (*HTTP_PROTOCOLS, GRPC)
#: gRPC's status code value for success (loadtests report gRPC answers by this number).
GRPC_OK = 0
HEADER_LENGTH = "inference-header-content-length"
#: Where request inputs come from: samples.npz if there is one, else random (auto), or forced.
INPUT_SOURCES = ("auto", "samples", "random")
#: Fields every v1 prediction carries, by the model's task (see service/postprocess.py); a
#: model without a task answers each row's outputs, keyed by output name.
V1_FIELDS = {
    "classification": {"label", "class_index", "probabilities"},
    "anomaly": {"score", "is_anomaly"},
    "forecast": {"forecast"},
}
#: Upper bound on the bytes one pool of pre-encoded bodies may hold.
POOL_BYTES = 16 * 1024 * 1024
#: Random inputs: how many distinct rows (or whole tensors) to draw requests from, the range of
#: integer values ([0, INT_HIGH): safe as indices and counts) and the length of random strings.
RANDOM_ROWS = 64
INT_HIGH = 8
STRING_LENGTHS = (1, 12)


@dataclass(frozen=True, slots=True)
class Payload:
    """One ready-to-send request: path, body, headers, and how many rows it carries. For gRPC
    the path is the method's (`/inference.GRPCInferenceService/ModelInfer`) and the body the
    serialized ModelInferRequest."""

    path: str
    body: bytes
    headers: dict[str, str]
    rows: int = 1


def _json_ready(array: np.ndarray) -> Any:
    """orjson serialises numeric arrays itself; strings (BYTES) go as lists."""
    return array.tolist() if array.dtype.kind == "O" else array


def _instances(inputs: Mapping[str, np.ndarray]) -> list[Any] | np.ndarray:
    """v1 instances: the rows of the only input, or one dict of rows per instance."""
    if len(inputs) == 1:
        return _json_ready(next(iter(inputs.values())))
    rows = len(next(iter(inputs.values())))
    lists = {name: _json_ready(a) for name, a in inputs.items()}
    return [{name: lists[name][i] for name in lists} for i in range(rows)]


def make_payload(
    model: str, protocol: str, inputs: Mapping[str, np.ndarray], rows: int | None = None
) -> Payload:
    """The request carrying `inputs` in one protocol (v2 asks for every output, binary or JSON
    as the inputs go). `rows` defaults to the length of the first input's first axis."""
    count = rows if rows is not None else len(next(iter(inputs.values())))
    if protocol == V1:
        body = orjson.dumps({"instances": _instances(inputs)}, option=orjson.OPT_SERIALIZE_NUMPY)
        headers = {"Content-Type": "application/json"}
        return Payload(f"/v1/models/{model}:predict", body, headers, count)
    path = f"/v2/models/{model}/infer"
    if protocol == V2_JSON:
        body, _ = encode_request(dict(inputs), binary=False, binary_output=False)
        return Payload(path, body, {"Content-Type": "application/json"}, count)
    if protocol == V2_BINARY:
        body, head = encode_request(dict(inputs))
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(head),
        }
        return Payload(path, body, headers, count)
    if protocol == GRPC:
        body = infer_request(model, inputs).SerializeToString()
        return Payload(grpc_messages.method_path("ModelInfer"), body, {}, count)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


# -- where inputs come from ---------------------------------------------------------------------
def samples_path(repository: Path, model: str) -> Path:
    """The latest version's samples file; FileNotFoundError says what is missing."""
    folder = Path(repository) / model
    try:
        path = latest_version_dir(folder) / SAMPLES_FILE
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no versions of model '{model}' under {folder}: point --repository (or "
            "LOADTEST_REPOSITORY) at a model repository built by `onnxserve build`, or use "
            "--inputs random"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: rebuild the repository with `onnxserve build`, or use "
            "--inputs random"
        )
    return path


def load_samples(path: Path, inputs: list[str]) -> dict[str, np.ndarray]:
    """A samples file's arrays for these inputs: `inputs` for a one-input model, else one array
    named after each input (ValueError names what is missing)."""
    with np.load(path) as data:
        if len(inputs) == 1 and "inputs" in data.files:
            return {inputs[0]: data["inputs"]}
        missing = [name for name in inputs if name not in data.files]
        if missing:
            raise ValueError(
                f"{path} has no array for input {missing[0]!r} (has {data.files}); a one-input "
                "model's samples are under 'inputs', a model with several under their names"
            )
        return {name: data[name] for name in inputs}


def parse_shapes(text: str | list[str] | None) -> dict[str, list[int]]:
    """`--shape` values, perf_analyzer's form: `NAME:D1,D2,...` without the batch axis (a model
    without a batch axis: its whole shape), several separated by `;` or given repeatedly."""
    parts = text if isinstance(text, list) else [text or ""]
    shapes: dict[str, list[int]] = {}
    for part in (p.strip() for chunk in parts for p in chunk.split(";")):
        if not part:
            continue
        name, sep, dims = part.rpartition(":")
        try:
            shape = [int(d) for d in dims.split(",") if d.strip()]
        except ValueError:
            shape = []
        if not sep or not name or not shape or min(shape) < 1:
            raise ValueError(f"--shape {part!r}: expected NAME:D1,D2,... with positive sizes")
        shapes[name] = shape
    return shapes


def is_batched(metadata: Mapping[str, Any]) -> bool:
    """Whether the model has a batch axis (Triton's max_batch_size > 0); True when unsaid."""
    batching = (metadata.get("parameters") or {}).get("batching") or {}
    return int(batching.get("max_batch_size", 1)) > 0


def request_shape(spec: Mapping[str, Any], batched: bool, given: list[int] | None) -> list[int]:
    """An input's shape in a request without the batch axis, its dynamic axes from `given`."""
    shape = list(spec["shape"][1:] if batched else spec["shape"])
    if given is not None:
        fits = len(given) == len(shape) and all(
            d in (-1, g) for d, g in zip(shape, given, strict=True)
        )
        if not fits:
            axis = " (without the batch axis)" if batched else ""
            raise ValueError(
                f"--shape {spec['name']}:{','.join(map(str, given))} does not fit its shape "
                f"{spec['shape']}{axis}"
            )
        return list(given)
    if -1 in shape:
        example = ",".join("52" if d == -1 else str(d) for d in shape)
        raise ValueError(
            f"input '{spec['name']}' has dynamic axes {spec['shape']}: give their sizes, e.g. "
            f"--shape {spec['name']}:{example}" + (" (without the batch axis)" if batched else "")
        )
    return shape


def random_array(datatype: str, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    """Random values of an OIP datatype: floats in [0, 1), integers in [0, INT_HIGH), random
    booleans, and short random ASCII strings for BYTES."""
    if datatype == "BYTES":
        letters = string.ascii_letters + string.digits
        lengths = rng.integers(*STRING_LENGTHS, size=math.prod(shape), endpoint=True)
        text = "".join(rng.choice(list(letters), size=int(lengths.sum())))
        ends = np.cumsum(lengths)
        words = [text[end - n : end] for n, end in zip(lengths, ends, strict=True)]
        return np.array(words, dtype=object).reshape(shape)
    dtype = NP_TYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return rng.integers(0, INT_HIGH, size=shape).astype(dtype)
    return rng.random(shape).astype(dtype)


def random_inputs(
    metadata: Mapping[str, Any],
    shapes: Mapping[str, list[int]] | None = None,
    count: int = RANDOM_ROWS,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """`count` random rows per input (or whole tensors, stacked, for a model without a batch
    axis), shaped from the metadata; dynamic axes need `shapes` (ValueError says how; sizes for
    other models' inputs are ignored: see `unknown_shapes`)."""
    shapes = dict(shapes or {})
    specs = metadata.get("inputs") or []
    rng, batched = np.random.default_rng(seed), is_batched(metadata)
    return {
        s["name"]: random_array(
            s["datatype"], [count, *request_shape(s, batched, shapes.get(s["name"]))], rng
        )
        for s in specs
    }


def unknown_shapes(shapes: Mapping[str, list[int]], metadata: list[Mapping[str, Any]]) -> None:
    """ValueError if `--shape` names an input that none of these models has (a typo)."""
    names = {s["name"] for m in metadata for s in m.get("inputs") or []}
    unknown = sorted(set(shapes) - names)
    if unknown:
        raise ValueError(
            f"--shape names no input {unknown[0]!r} (inputs: {', '.join(sorted(names))})"
        )


def traffic_for(
    metadata: dict[str, Any],
    repository: Path,
    source: str = "auto",
    shapes: Mapping[str, list[int]] | None = None,
) -> ModelTraffic:
    """The traffic for a served model: its samples (`samples`, or `auto` when the repository has
    them) or random inputs (`random`, or `auto` without samples)."""
    if source not in INPUT_SOURCES:
        raise ValueError(f"unknown input source {source!r}; choose from {INPUT_SOURCES}")
    names = [s["name"] for s in metadata.get("inputs") or []]
    if source != "random":
        try:
            path = samples_path(repository, str(metadata["name"]))
        except FileNotFoundError:
            if source == "samples":
                raise
        else:
            return ModelTraffic(metadata, load_samples(path, names), f"samples: {path}")
    return ModelTraffic(metadata, random_inputs(metadata, shapes), "random (from the metadata)")


# -- small parsers ------------------------------------------------------------------------------
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


def grpc_target(host: str, given: str = "") -> str:
    """HOST:PORT of the gRPC port: `given` (a `grpc://` prefix is dropped), else the HTTP host's
    name with Triton's default gRPC port."""
    if given:
        return given.removeprefix("grpc://").rstrip("/")
    name = urllib.parse.urlsplit(host).hostname or "127.0.0.1"
    return f"[{name}]:8001" if ":" in name else f"{name}:8001"


_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def parse_mix(text: str, models: tuple[str, ...] | list[str] | None = None) -> dict[str, float]:
    """`cnn:6,autoencoder:3,lstm:1` -> {model: weight > 0}; ValueError names what is wrong.

    With `models`, only those names are allowed; without, any valid model name."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, _, weight = part.partition(":")
        if (models is not None and model not in models) or not _MODEL_NAME.match(model):
            known = f"; choose from {', '.join(models)}" if models is not None else ""
            raise ValueError(f"--mix: unknown model {model!r}{known}")
        try:
            weights[model] = float(weight or 1)
        except ValueError:
            raise ValueError(f"--mix: weight {weight!r} of {model} is not a number") from None
    if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"--mix needs positive weights, got {text!r}")
    return {m: w for m, w in weights.items() if w > 0}


# -- one model's traffic -----------------------------------------------------------------------
@dataclass
class ModelTraffic:
    """Requests for one served model, built from its metadata and a bank of input rows.

    `samples` holds, per input, rows on the first axis (for a model without a batch axis: whole
    tensors, stacked); every input has as many. A one-input model may pass one array.
    """

    metadata: dict[str, Any]
    samples: dict[str, np.ndarray] | np.ndarray
    source: str = "samples"
    _pools: dict[tuple[str, int], list[Payload]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        specs = self.metadata.get("inputs") or []
        if not specs:
            raise ValueError(f"model '{self.name}' lists no inputs")
        if isinstance(self.samples, np.ndarray):
            if len(specs) != 1:
                raise ValueError(f"model '{self.name}' has {len(specs)} inputs: give one each")
            self.samples = {specs[0]["name"]: self.samples}
        self.batched = is_batched(self.metadata)
        bank: dict[str, np.ndarray] = {}
        for spec in specs:
            bank[spec["name"]] = self._fitted(spec, self.samples.get(spec["name"]))
        if len({len(x) for x in bank.values()}) != 1:
            counts = {k: len(v) for k, v in bank.items()}
            raise ValueError(f"inputs of '{self.name}' have different numbers of rows: {counts}")
        self.samples = bank

    def _fitted(self, spec: dict[str, Any], x: np.ndarray | None) -> np.ndarray:
        name, datatype = spec["name"], spec["datatype"]
        if x is None:
            raise ValueError(f"no samples for input '{name}' of '{self.name}'")
        dtype = NP_TYPES.get(datatype)
        if dtype is None:
            raise ValueError(f"input '{name}' has unsupported datatype {datatype}")
        want = list(spec["shape"][1:] if self.batched else spec["shape"])
        x = np.asarray(x)
        fits = x.ndim == len(want) + 1 and all(
            w in (-1, g) for w, g in zip(want, x.shape[1:], strict=True)
        )
        if not fits or len(x) == 0:
            per = "rows" if self.batched else "whole tensors"
            raise ValueError(
                f"samples of '{self.name}' have shape {list(x.shape)}; the server's metadata "
                f"says input '{name}' is {spec['shape']} ({per} stacked on the first axis): "
                "is the repository the one it serves?"
            )
        if dtype.kind == "O":
            words = [v.decode() if isinstance(v, bytes) else str(v) for v in x.ravel()]
            return np.array(words, dtype=object).reshape(x.shape)
        return np.ascontiguousarray(x, dtype=dtype)

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def input(self) -> dict[str, Any]:
        """The first input's metadata."""
        return self.metadata["inputs"][0]

    @property
    def task(self) -> str | None:
        return (self.metadata.get("parameters") or {}).get("task")

    @property
    def protocols(self) -> tuple[str, ...]:
        """The HTTP protocols this model can be sent (what `mixed` draws from): v1 `instances`
        are rows, so it needs a batch axis."""
        return HTTP_PROTOCOLS if self.batched else (V2_JSON, V2_BINARY)

    def can_send(self, protocol: str, rows: int) -> None:
        """ValueError, saying why, if requests of `rows` rows cannot go in `protocol` ("mixed":
        any HTTP protocol the model takes)."""
        if protocol != "mixed" and protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
        if protocol not in (*self.protocols, GRPC, "mixed"):
            raise ValueError(
                f"model '{self.name}' has no batch axis: v1 `instances` need one; use "
                f"{' or '.join(self.protocols)}"
            )
        if rows < 1:
            raise ValueError("rows per request must be at least 1")
        if rows > 1 and not self.batched:
            raise ValueError(f"model '{self.name}' has no batch axis: one row per request")

    def encode(self, protocol: str, x: Mapping[str, np.ndarray] | np.ndarray) -> Payload:
        """One request carrying the rows `x` (per input; an array for a one-input model)."""
        inputs = x if isinstance(x, Mapping) else {self.input["name"]: x}
        self.can_send(protocol, 1)
        return make_payload(self.name, protocol, inputs, self._rows(inputs))

    def _rows(self, inputs: Mapping[str, np.ndarray]) -> int:
        return len(next(iter(inputs.values()))) if self.batched else 1

    def pool(self, protocol: str, rows: int, rng: np.random.Generator, size: int = 32):
        """Up to `size` pre-encoded requests of `rows` random sample rows each (cached).

        Rows are drawn without replacement within a request when there are enough samples.
        Pre-encoding keeps the load generator's CPU on sending, not on JSON encoding.
        """
        self.can_send(protocol, rows)
        key = (protocol, rows)
        if key not in self._pools:
            n = len(next(iter(self.samples.values())))
            pool: list[Payload] = []
            for _ in range(size):
                if self.batched:
                    index = rng.choice(n, size=rows, replace=rows > n)
                    chosen = {k: v[index] for k, v in self.samples.items()}
                else:
                    i = int(rng.integers(n))
                    chosen = {k: v[i] for k, v in self.samples.items()}
                pool.append(self.encode(protocol, chosen))
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

        Right means: HTTP 200 (gRPC: status GRPC_OK); v2 and gRPC: every output the metadata
        lists, with its datatype, `rows` rows (a model without a batch axis: its whole shape),
        its fixed dimensions and as many values (or bytes) as the shape says; v1: one
        prediction per row carrying the task's fields (no task: every output).
        `header_length` is the answer's Inference-Header-Content-Length header (binary
        outputs). For gRPC, `status` is the status code's number and `content` the serialized
        ModelInferResponse (on failure: the status details).
        """
        ok = GRPC_OK if protocol == GRPC else 200
        if status != ok:
            text = (content or b"")[:200].decode("utf-8", "replace")
            return f"{'gRPC status' if protocol == GRPC else 'HTTP'} {status}: {text}"
        try:
            if protocol == V1:
                return self._check_v1(rows, content)
            if protocol == GRPC:
                return self._check_grpc(rows, content)
            return self._check_v2(rows, header_length, content)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            return f"malformed answer: {type(exc).__name__}: {exc}"

    def _check_v1(self, rows: int, content: bytes) -> str | None:
        predictions = orjson.loads(content).get("predictions")
        if not isinstance(predictions, list) or len(predictions) != rows:
            got = len(predictions) if isinstance(predictions, list) else predictions
            return f"v1: expected {rows} predictions, got {got}"
        if self.task is None:
            want = {o["name"] for o in self.metadata["outputs"]}
        else:
            want = V1_FIELDS.get(self.task, set())
        for p in predictions:
            if not isinstance(p, dict) or not want <= set(p):
                return f"v1: a prediction lacks {sorted(want)}: {str(p)[:120]}"
        return None

    def _check_v2(self, rows: int, n: str | None, content: bytes) -> str | None:
        head = orjson.loads(content[: int(n)] if n else content)
        blob_size = len(content) - int(n) if n else 0
        return self._check_tensors("v2", rows, head.get("outputs") or [], blob_size)

    def _check_grpc(self, rows: int, content: bytes) -> str | None:
        """A ModelInferResponse: its tensors as v2 JSON heads (raw sizes as binary_data_size,
        typed contents as data) checked by the same rules."""
        try:
            answer = grpc_messages.ModelInferResponse.FromString(content)
        except Exception as exc:  # protobuf's DecodeError
            raise ValueError(f"not a ModelInferResponse: {exc}") from None
        raw = answer.raw_output_contents
        tensors: list[dict[str, Any]] = []
        for i, t in enumerate(answer.outputs):
            tensor = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            if raw:
                tensor["parameters"] = {"binary_data_size": len(raw[i]) if i < len(raw) else 0}
            else:
                field = t.contents.ListFields()
                tensor["data"] = list(field[0][1]) if field else []
            tensors.append(tensor)
        return self._check_tensors("gRPC", rows, tensors, sum(len(r) for r in raw))

    def _check_tensors(
        self, what: str, rows: int, tensors: list[dict[str, Any]], blob_size: int
    ) -> str | None:
        got = {t["name"]: t for t in tensors}
        specs = {o["name"]: o for o in self.metadata["outputs"]}
        if set(got) != set(specs):
            return f"{what}: outputs {sorted(got)}, metadata lists {sorted(specs)}"
        binary_total = 0
        for name, spec in specs.items():
            tensor, shape, want = got[name], got[name]["shape"], spec["shape"]
            if tensor["datatype"] != spec["datatype"]:
                got_type, want_type = tensor["datatype"], spec["datatype"]
                return f"{what}: output '{name}' is {got_type}, metadata says {want_type}"
            fixed = want[1:] if self.batched else want
            dims_ok = len(shape) == len(want) and all(
                w in (-1, g) for w, g in zip(fixed, shape[len(want) - len(fixed) :], strict=True)
            )
            if not dims_ok or (self.batched and shape[0] != rows):
                expected = f"{want} with {rows} rows" if self.batched else f"{want}"
                return f"{what}: output '{name}' has shape {shape}; expected {expected}"
            count = math.prod(shape)
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                binary_total += size
                itemsize = NP_TYPES[spec["datatype"]].itemsize
                if spec["datatype"] != "BYTES" and size != count * itemsize:
                    return f"{what}: output '{name}' of shape {shape} has {size} bytes"
            elif len(tensor.get("data") or []) != count:
                return f"{what}: output '{name}' of shape {shape} has {len(tensor['data'])} values"
        if binary_total != blob_size:
            return (
                f"{what}: {blob_size} bytes of binary data, the outputs account for {binary_total}"
            )
        return None
