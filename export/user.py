"""A user's PyTorch module in, a verified model version out (`onnxserve export`,
`export_to_repository`): the build's pipeline for modules the project does not ship.

1. Inputs declared as `export.inputs.InputSpec` (named dynamic axes, a batch axis).
2. `torch.onnx.export` (the legacy exporter, as the build) traces the module with those dynamic
   axes; `onnx.checker` runs its full check.
3. Parity of ONNX Runtime against PyTorch on `export.inputs.parity_plan`'s batches (the user's
   inputs, or random ones at batch sizes 1, 3, 17 and lengths 3, 8, 21 of the other dynamic
   axes): every float output within `atol + rtol * |PyTorch|`, integer outputs equal. A failure
   refuses the version (ParityError names the output and by how much).
4. Variants (`optimized`, `int8`, `fp16`) with their drift from the FP32 graph on the parity
   batches (`max_rel_diff`: the largest difference relative to each output's largest magnitude,
   or for integer outputs the share of values that differ), each refused past its tolerance.
5. `export.publish`: a new version folder (max + 1) renamed into place, `config.json` written or
   updated (tensors from the graph, OIP datatypes, -1 for dynamic dims; parity; history; other
   fields as the previous config had them), and `samples.npz` with the parity inputs (`inputs`
   for a single input, else one key per input name) and the graph's outputs under their names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from export.inputs import (
    BATCH_SIZES,
    LENGTHS,
    InputSpec,
    SpecError,
    as_arrays,
    batch_axis,
    input_specs,
    parity_plan,
)
from export.onnx_export import OPSET, check_io, torch_export
from export.publish import merge_config, publish_version, save_samples, version_entry
from export.variants import KINDS, Tolerance, make_variants
from export.verify import (
    ATOL,
    Run,
    check_parity,
    difference,
    flatten_outputs,
    ort_predict,
    ort_session,
)
from service.autocomplete import batchable, graph_tensors
from service.model_config import (
    CONFIG_FILE,
    MODEL_FILE,
    Batching,
    ModelConfig,
    Normalization,
    Task,
    TensorSpec,
    Variant,
    Version,
    describe_errors,
    read_config_doc,
)
from service.postprocess import TASK_OUTPUTS

log = logging.getLogger(__name__)

RTOL = 1e-4
DRIFT = "max_rel_diff"
DRIFT_METRICS = (DRIFT, "max_abs_diff")
VARIANT_TOLERANCE = 0.05


@dataclass(frozen=True)
class ExportResult:
    """A published version: where it is, its config, parity record and variants."""

    name: str
    version: int
    path: Path
    config: ModelConfig
    parity: dict[str, Any]
    variants: list[Variant] = field(default_factory=list)


def export_to_repository(
    module: nn.Module,
    example_inputs: Any = None,
    name: str = "",
    *,
    repository: Path | str = Path("model_repository"),
    inputs: Sequence[str | InputSpec] | None = None,
    outputs: Sequence[str] | None = None,
    parity_inputs: Mapping[str, np.ndarray] | np.ndarray | Path | str | None = None,
    task: Task | None = None,
    labels: Sequence[str] | None = None,
    threshold: float | None = None,
    normalization: tuple[float, float] | None = None,
    description: str | None = None,
    max_batch_size: int | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    lengths: Sequence[int] = LENGTHS,
    variants: Sequence[str] = KINDS,
    variant_tolerance: float = VARIANT_TOLERANCE,
    variant_metric: str = DRIFT,
    opset: int = OPSET,
    seed: int = 0,
) -> ExportResult:
    """Export `module` into `<repository>/<name>/<version>/` through the build's pipeline (see the
    module doc) and return what was published.

    `example_inputs` (an array or tensor, a tuple of them in argument order, or a dict by input
    name) is traced and checked too. Without `inputs` the inputs are named after `forward`'s
    parameters and typed like the examples, with a dynamic first (batch) axis; `inputs` declares
    them instead (strings as `--input` takes them, or InputSpec). `parity_inputs` (a dict by
    input name, an array for a single input, or an `.npz` path) replaces the random inputs.
    `outputs` names the outputs (default: the task's output, `output`, or `output_0`, ...).

    Raises SpecError for a bad request, ExportError if the module does not export, ParityError
    if ONNX Runtime disagrees with PyTorch; in each case nothing is published.
    """
    if variant_metric not in DRIFT_METRICS:
        raise SpecError(f"variant metric {variant_metric!r}: choose from {list(DRIFT_METRICS)}")
    unknown = sorted(set(variants) - set(KINDS))
    if unknown:
        raise SpecError(f"variants {unknown}: choose from {list(KINDS)}")
    module.eval()
    examples = as_arrays(example_inputs)
    specs = input_specs(module, inputs, examples)
    _check_name(name, specs)
    axis = batch_axis(specs)
    plan = parity_plan(specs, given=parity_inputs, examples=examples, batch_sizes=batch_sizes,
                       lengths=lengths, seed=seed)  # fmt: skip
    batches, trace = plan.batches, plan.trace
    output_names, ranks = _outputs(module, trace, outputs, specs, task)
    model_dir = Path(repository) / name
    previous = read_config_doc(model_dir / CONFIG_FILE)
    chunk = 256 if axis else None

    def make(folder: Path, version: int) -> tuple[list[TensorSpec], Version]:
        path = folder / MODEL_FILE
        axes = {s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)} for s in specs}
        if axis:
            axes |= {n: {0: axis} for n, rank in zip(output_names, ranks, strict=True) if rank}
        log.info("%s: exporting with opset %d, dynamic axes %s", name, opset, axes)
        model = torch_export(
            module, path, list(trace.values()), list(trace), output_names, axes, opset
        )
        session = ort_session(path)
        found = [
            TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape)  # type: ignore[arg-type]
            for t in graph_tensors("output", session.get_outputs())
        ]
        check_io(model, [s.tensor_spec() for s in specs], found)
        log.info("%s: parity over %d batches (atol %g, rtol %g)", name, len(batches), atol, rtol)
        argmax = [TASK_OUTPUTS["classification"]] if task == "classification" else []
        parity = check_parity(
            module, session, batches, output_names, atol=atol, rtol=rtol, argmax=argmax,
            batch_size=chunk,
        )  # fmt: skip
        fp32 = ort_predict(session, chunk)
        made = make_variants(
            path,
            _drift(batches, [fp32(x) for x in batches]),
            Tolerance(variant_metric, variant_tolerance, higher_is_better=False),
            variants,
            baseline=0.0,
            keep_fp32=None,
            batch_size=chunk,
            details=[m for m in DRIFT_METRICS if m != variant_metric],
        )
        save_samples(folder, _by_key(plan.samples), fp32(plan.samples))
        entry = version_entry(path, version, opset, parity=parity | plan.source, variants=made)
        return found, entry

    def configure(made: tuple[list[TensorSpec], Version]) -> ModelConfig:
        found, entry = made
        fields = _config_fields(
            name, specs, found, previous, task=task, labels=labels, threshold=threshold,
            normalization=normalization, description=description, max_batch_size=max_batch_size,
        )  # fmt: skip
        try:
            return merge_config(previous, fields, entry)
        except ValidationError as exc:
            raise SpecError(f"{CONFIG_FILE} of {name!r}: {describe_errors(exc)}") from None

    history = [
        v["version"]
        for v in (previous or {}).get("versions") or []
        if isinstance(v, dict) and isinstance(v.get("version"), int)
    ]
    published = publish_version(model_dir, history, make, configure)
    entry = published.made[1]
    return ExportResult(name, published.version, published.path, published.config, entry.parity,
                        entry.variants)  # fmt: skip


def _check_name(name: str, specs: Sequence[InputSpec]) -> None:
    """SpecError unless `name` is a valid model name (the config's own rule)."""
    if not specs:
        raise SpecError("declare at least one input")
    try:
        tensors = [s.tensor_spec() for s in specs]
        ModelConfig(name=name, inputs=tensors, outputs=tensors)
    except ValidationError as exc:
        problems = [e["msg"].removeprefix("Value error, ") for e in exc.errors()]
        raise SpecError(f"model name {name!r}: {'; '.join(problems)}") from None


def _outputs(
    module: nn.Module,
    trace: dict[str, np.ndarray],
    outputs: Sequence[str] | None,
    specs: Sequence[InputSpec],
    task: str | None,
) -> tuple[list[str], list[int]]:
    """The output names (given, or the task's, `output`, `output_0`...) and ranks, from one
    forward pass on the trace inputs."""
    args = [torch.from_numpy(v) for v in trace.values()]
    try:
        with torch.inference_mode():
            result = flatten_outputs(module(*args))
    except Exception as exc:
        shapes = {k: list(v.shape) for k, v in trace.items()}
        raise SpecError(
            f"the module's forward fails on inputs of the declared shapes {shapes}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    count = len(result)
    if outputs:
        names = list(outputs)
        if len(names) != count:
            raise SpecError(f"the module returns {count} tensors; outputs named {names}")
    elif task and count == 1:
        names = [TASK_OUTPUTS[task]]
    else:
        names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    if task and TASK_OUTPUTS[task] not in names:
        raise SpecError(
            f"task {task!r} reads an output named {TASK_OUTPUTS[task]!r}; outputs are {names} "
            f"(name them with --output)"
        )
    taken = {"inputs", "targets"} if len(specs) == 1 else {s.name for s in specs}
    clash = sorted(set(names) & ({s.name for s in specs} | taken))
    if clash or len(set(names)) != len(names):
        raise SpecError(f"output names {names} must be unique and differ from {sorted(taken)}")
    return names, [t.dim() for t in result]


def _drift(
    batches: Sequence[dict[str, np.ndarray]], reference: Sequence[dict[str, np.ndarray]]
) -> Callable[[Run], dict[str, float]]:
    """An `evaluate` for variants: how far a graph's outputs drift from the FP32 graph's on the
    parity batches (`max_rel_diff`, `max_abs_diff`; see the module doc)."""

    def evaluate(run: Run) -> dict[str, float]:
        worst_abs = worst_rel = 0.0
        for x, want in zip(batches, reference, strict=True):
            got = run(x)
            for name, expected in want.items():
                if np.issubdtype(expected.dtype, np.floating):
                    diff = difference(got[name].astype(np.float64), expected.astype(np.float64))
                    top = float(diff.max(initial=0.0))
                    scale = float(np.nan_to_num(np.abs(expected)).max(initial=0.0))
                    worst_abs = max(worst_abs, top)
                    worst_rel = max(worst_rel, top / scale if scale else top)
                elif expected.size:
                    worst_rel = max(worst_rel, float(np.mean(got[name] != expected)))
        return {"max_rel_diff": worst_rel, "max_abs_diff": worst_abs}

    return evaluate


def _by_key(samples: dict[str, np.ndarray]) -> np.ndarray | dict[str, np.ndarray]:
    """`samples.npz`'s inputs: the array itself for a single input (key `inputs`)."""
    return next(iter(samples.values())) if len(samples) == 1 else samples


def _config_fields(
    name: str,
    specs: Sequence[InputSpec],
    found: Sequence[TensorSpec],
    previous: Mapping[str, Any] | None,
    *,
    task: str | None,
    labels: Sequence[str] | None,
    threshold: float | None,
    normalization: tuple[float, float] | None,
    description: str | None,
    max_batch_size: int | None,
) -> dict[str, Any]:
    """What this version defines in `config.json`: tensors from the graph, the task fields given
    (others stay as the previous config had them), batching fitted to the graph."""
    inputs = [s.tensor_spec() for s in specs]
    fields: dict[str, Any] = {
        "name": name,
        "inputs": [t.model_dump() for t in inputs],
        "outputs": [t.model_dump() for t in found],
    }
    if task is not None:
        fields["task"] = task
    if labels is not None:
        fields["labels"] = list(labels)
    if threshold is not None:
        fields["threshold"] = threshold
    if normalization is not None:
        mean, std = normalization
        fields["normalization"] = Normalization(mean=mean, std=std).model_dump()
    if description is not None:
        fields["description"] = description
    knobs = dict((previous or {}).get("batching") or {})
    if not batchable(inputs, found):  # type: ignore[arg-type]  # it reads `.shape` only
        fields["batching"] = knobs | {"max_batch_size": 0}
    elif max_batch_size is not None:
        fields["batching"] = knobs | {"max_batch_size": max_batch_size}
    elif not knobs.get("max_batch_size"):
        fields["batching"] = knobs | {"max_batch_size": Batching().max_batch_size}
    return fields
