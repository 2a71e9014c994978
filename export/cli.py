"""`onnxserve export`: a PyTorch module (a class in a .py file, or a TorchScript file) exported into
the repository as a new verified version (see `export.user`).

Exit status: 0 published; 1 refused (the module does not export, or ONNX Runtime disagrees with
PyTorch: the message names the output and by how much; nothing is published); 2 a bad request
(an --input or --module spec, a file that does not define the class, weights that do not fit...).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from export.inputs import BATCH_SIZES, LENGTHS, InputSpec, SpecError
from export.onnx_export import OPSET, ExportError
from export.user import (
    DRIFT_METRICS,
    RTOL,
    VARIANT_TOLERANCE,
    ExportResult,
    export_to_repository,
)
from export.variants import KINDS
from export.verify import ATOL, ParityError
from service.model_config import ConfigError

PROG = "onnxserve export"
log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def parser() -> argparse.ArgumentParser:
    """The `onnxserve export` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a PyTorch module into the model repository as a new version, after "
        "onnx.checker, parity of ONNX Runtime against PyTorch, and optimized/int8/fp16 variants.",
        epilog="Exit status: 0 published; 1 refused (export or parity failed, nothing "
        "published); 2 bad arguments.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--module", metavar="FILE.py:CLASS", help="an nn.Module class (or factory)")
    source.add_argument("--torchscript", metavar="FILE.pt", type=Path, help="a TorchScript file")
    p.add_argument("--weights", type=Path, help="a state_dict checkpoint to load (torch.save)")
    p.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for CLASS")
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="NAME:DTYPE:SHAPE[:LOW..HIGH]",
        help="one per forward argument, in order: e.g. x:FP32:-1,3,32,32 or "
        "seq:FP32:batch,time,4 (-1 or a name: a dynamic axis; a shared name: the same length; "
        "LOW..HIGH: the range of random parity values)",
    )
    p.add_argument("--output", action="extend", nargs="+", metavar="NAME", help="output names")
    p.add_argument("--name", required=True, help="the model's name in the repository")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--task", choices=["classification", "forecast", "anomaly"])
    p.add_argument("--labels", help="comma-separated class labels (with --task classification)")
    p.add_argument("--threshold", type=float, help="anomaly threshold (with --task anomaly)")
    p.add_argument("--normalization", metavar="MEAN,STD", help="with --task forecast")
    p.add_argument("--description")
    p.add_argument("--max-batch-size", type=int, help="batching knob (default 32 when batchable)")
    p.add_argument("--parity-inputs", type=Path, help=".npz of real inputs, one key per input")
    p.add_argument("--atol", type=float, default=ATOL, help="parity: absolute tolerance")
    p.add_argument("--rtol", type=float, default=RTOL, help="parity: tolerance relative to PyTorch")
    p.add_argument("--batch-sizes", type=_ints, default=list(BATCH_SIZES), metavar="1,3,17")
    p.add_argument("--lengths", type=_ints, default=list(LENGTHS), metavar="3,8,21",
                   help="lengths of the other dynamic axes for random parity inputs")  # fmt: skip
    p.add_argument("--variants", default=",".join(KINDS), help="comma-separated, or 'none'")
    p.add_argument("--variant-metric", choices=DRIFT_METRICS, default=DRIFT_METRICS[0])
    p.add_argument("--variant-tolerance", type=float, default=VARIANT_TOLERANCE,
                   help="largest drift from the FP32 graph a variant may show")  # fmt: skip
    p.add_argument("--opset", type=int, default=OPSET)
    p.add_argument("--seed", type=int, default=0, help="seed of the random parity inputs")
    return p


def load_module(spec: str, kwargs: dict[str, Any]) -> Any:
    """The module that `FILE.py:NAME` defines: NAME is an nn.Module class (built with `kwargs`),
    a function returning a module, or a module instance. SpecError says what is wrong."""
    from torch import nn

    path_text, sep, attr = spec.rpartition(":")
    if not sep or not path_text or not attr.isidentifier():
        raise SpecError(f"--module {spec!r}: expected path/to/file.py:ClassName")
    path = Path(path_text)
    if not path.is_file():
        raise SpecError(f"--module {spec!r}: no file {path}")
    name = f"onnxserve_user_{path.stem}"
    loader = importlib.util.spec_from_file_location(name, path)
    if loader is None or loader.loader is None:
        raise SpecError(f"--module {spec!r}: {path} is not a Python file")
    code = importlib.util.module_from_spec(loader)
    sys.modules[name] = code  # dataclasses and pickling look a class's module up here
    sys.path.insert(0, str(path.resolve().parent))  # its own sibling imports
    try:
        loader.loader.exec_module(code)
    except Exception as exc:
        raise SpecError(f"--module {spec!r}: {path} fails to import: {exc!r}") from None
    finally:
        sys.path.remove(str(path.resolve().parent))
    found = getattr(code, attr, None)
    if found is None:
        defined = sorted(
            k for k, v in vars(code).items() if isinstance(v, type) and issubclass(v, nn.Module)
        )
        raise SpecError(f"--module {spec!r}: {path} defines no {attr!r} (modules: {defined})")
    if isinstance(found, nn.Module):
        return found
    if not callable(found):
        raise SpecError(f"--module {spec!r}: {attr} is not a module class or factory")
    try:
        module = found(**kwargs)
    except Exception as exc:
        raise SpecError(f"--module {spec!r}: {attr}(**{kwargs}) failed: {exc!r}") from None
    if not isinstance(module, nn.Module):
        raise SpecError(f"--module {spec!r}: {attr}() returned {type(module).__name__}")
    return module


def load_torchscript(path: Path) -> Any:
    """A TorchScript module from `path` (on the CPU)."""
    import torch

    if not path.is_file():
        raise SpecError(f"--torchscript: no file {path}")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise SpecError(f"--torchscript {path}: not a TorchScript file ({exc})") from None


def load_weights(module: Any, path: Path) -> None:
    """Load a state dict saved with `torch.save` (bare, or under `state_dict`,
    `model_state_dict` or `model`) into `module`, strictly."""
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SpecError(f"--weights {path}: cannot read a state dict ({exc})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SpecError(f"--weights {path}: holds {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except Exception as exc:
        raise SpecError(f"--weights {path}: does not fit the module ({exc})") from None


def _summary(result: ExportResult) -> str:
    worst = result.parity["max_abs_diff"]
    lines = [
        f"{result.name} v{result.version} published to {result.path}",
        f"  parity over {result.parity['samples']} samples in {result.parity['batches']} "
        f"batches: max abs diff " + ", ".join(f"{k}={v:.3g}" for k, v in worst.items()),
    ]
    lines += [
        f"  {v.kind}: {'accepted' if v.accepted else 'refused'} ({v.reason})"
        for v in result.variants
    ]
    return "\n".join(lines)


def _pair(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise SpecError(f"--normalization {text!r}: expected MEAN,STD") from None
    return mean, std


def main(argv: list[str]) -> int:
    """Run `onnxserve export` with `argv` (without the program and command); the exit status."""
    args = parser().parse_args(argv)
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise SpecError(f"--kwargs {args.kwargs!r}: expected a JSON object")
        inputs = [InputSpec.parse(text) for text in args.input]
        if args.module:
            module = load_module(args.module, kwargs)
        else:
            module = load_torchscript(args.torchscript)
        if args.weights:
            load_weights(module, args.weights)
        variants = [] if args.variants == "none" else [v for v in args.variants.split(",") if v]
        result = export_to_repository(
            module,
            None,
            args.name,
            repository=args.repository,
            inputs=inputs,
            outputs=args.output,
            parity_inputs=args.parity_inputs,
            task=args.task,
            labels=args.labels.split(",") if args.labels else None,
            threshold=args.threshold,
            normalization=_pair(args.normalization),
            description=args.description,
            max_batch_size=args.max_batch_size,
            atol=args.atol,
            rtol=args.rtol,
            batch_sizes=args.batch_sizes,
            lengths=args.lengths,
            variants=variants,
            variant_tolerance=args.variant_tolerance,
            variant_metric=args.variant_metric,
            opset=args.opset,
            seed=args.seed,
        )
    except json.JSONDecodeError as exc:
        sys.stderr.write(f"{PROG}: error: --kwargs is not JSON ({exc})\n")
        return 2
    except (SpecError, ConfigError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except (ParityError, ExportError) as exc:
        sys.stderr.write(f"{PROG}: refused, nothing published: {exc}\n")
        return 1
    sys.stdout.write(_summary(result) + "\n")
    return 0
