"""Scoring through a running server: Open Inference Protocol v2, over HTTP or gRPC.

`http://host:port`: each batch goes as a JSON header plus the raw input bytes
(`Inference-Header-Content-Length`) over httpx, every output asked for as binary data.
`grpc://host:port`: each batch is Triton's ModelInfer with raw_input_contents over one grpc.aio
channel (the model's task and batching come from its ModelConfig, as the server writes it).
Several requests are in flight at once. A busy server (503 / UNAVAILABLE, 504 /
DEADLINE_EXCEEDED, a full queue's RESOURCE_EXHAUSTED with its retry hint) is retried after its
hint (a bounded number of times); a 400 / INVALID_ARGUMENT means the model refused the rows (they
are then sent one by one); the answers go through the same postprocessing, part files and
manifest as in-process scoring.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from service.codec import decode_response, encode_request
from service.model_config import Batching, ModelConfig
from service.scoring import ScoringError
from service.scoring.engine import Arrays, BadInput, Infer, Progress, run
from service.scoring.plan import prepare
from service.scoring.writer import Summary

log = logging.getLogger(__name__)
RETRIES = 8
MAX_WAIT_S = 30.0


class RemoteError(RuntimeError):
    """The server failed a request in a way retrying did not fix."""


def config_from_metadata(meta: dict[str, Any]) -> ModelConfig:
    """The parts of a model's config that scoring needs, from its v2 metadata: tensors, task
    (none: a plain tensor model), whether it has a batch axis, and the task's constants."""
    params = meta.get("parameters") or {}
    batching = params.get("batching") or {}
    try:
        return ModelConfig(
            name=meta["name"],
            task=params.get("task"),
            inputs=meta["inputs"],
            outputs=meta["outputs"],
            labels=params.get("labels"),
            threshold=params.get("threshold"),
            normalization=params.get("normalization"),
            batching=Batching(max_batch_size=batching.get("max_batch_size", 1)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ScoringError(
            f"the server's metadata for '{meta.get('name')}' is unusable: {exc}"
        ) from None


def _error(response: Any) -> str:
    try:
        return str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def remote_infer(client: Any, url: str, outputs: list[str]) -> Infer:
    """`infer` over HTTP: 503 retried after Retry-After, 400 raised as BadInput."""
    import httpx

    async def infer(inputs: Arrays) -> Arrays:
        body, header_length = encode_request(inputs, outputs)
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(header_length),
        }
        for attempt in range(RETRIES + 1):
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.TransportError as exc:
                if attempt == RETRIES:
                    raise RemoteError(f"{url}: {exc!r}") from exc
                await asyncio.sleep(min(MAX_WAIT_S, 0.1 * 2**attempt))
                continue
            if response.status_code == 200:
                return decode_response(
                    response.content, response.headers.get("inference-header-content-length")
                )
            if response.status_code == 400:
                raise BadInput(_error(response))
            if response.status_code not in (503, 504) or attempt == RETRIES:
                raise RemoteError(f"{url}: {response.status_code} {_error(response)}")
            wait = response.headers.get("retry-after", "")
            delay = float(wait) if wait.replace(".", "", 1).isdigit() else 0.1 * 2**attempt
            log.info("server busy (%s); retrying in %.1f s", response.status_code, delay)
            await asyncio.sleep(min(MAX_WAIT_S, delay))
        raise AssertionError("unreachable")

    return infer


# -- gRPC --------------------------------------------------------------------------------------
GRPC_SCHEME = "grpc://"


def metadata_from_grpc(meta: Any, config: Any) -> dict[str, Any]:
    """A ModelMetadataResponse and a ModelConfig as the REST metadata `config_from_metadata`
    reads: the task's constants come from the config's parameters, where the server writes
    strings as they are and other values as JSON (service/triton.py)."""
    params: dict[str, Any] = {"batching": {"max_batch_size": config.max_batch_size}}
    for key in ("task", "labels", "threshold", "normalization"):
        if key in config.parameters:
            text = config.parameters[key].string_value
            params[key] = text if key == "task" else json.loads(text)

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
        "parameters": params,
    }


def grpc_infer(call: Any, target: str, model: str, version: str, outputs: list[str]) -> Infer:
    """`infer` over gRPC (`call`: ModelInfer on a grpc.aio channel): a busy server retried after
    its hint, INVALID_ARGUMENT raised as BadInput."""
    import grpc

    from service.grpc.status import retry_after_s
    from service.grpc.tensors import infer_outputs, infer_request

    busy = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

    async def infer(inputs: Arrays) -> Arrays:
        request = infer_request(model, inputs, outputs, version)
        for attempt in range(RETRIES + 1):
            try:
                return infer_outputs(await call(request, timeout=120))
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
                hint = retry_after_s(exc.trailing_metadata())
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadInput(details)
            queue_full = code == grpc.StatusCode.RESOURCE_EXHAUSTED and hint is not None
            if not (code in busy or queue_full) or attempt == RETRIES:
                raise RemoteError(f"{target}: {code.name} {details}")
            delay = hint if hint is not None else 0.1 * 2**attempt
            log.info("server busy (%s); retrying in %.1f s", code.name, delay)
            await asyncio.sleep(min(MAX_WAIT_S, delay))
        raise AssertionError("unreachable")

    return infer


async def _score_grpc(url: str, model: str, version: str | None, **job: Any) -> Summary:
    import grpc

    from service.grpc import messages as pb

    target = url.removeprefix(GRPC_SCHEME).rstrip("/")
    unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=unlimited) as channel:

        def method(rpc: str) -> Any:
            return channel.unary_unary(
                pb.method_path(rpc),
                request_serializer=pb.message(f"{rpc}Request").SerializeToString,
                response_deserializer=pb.message(f"{rpc}Response").FromString,
            )

        asked = pb.ModelMetadataRequest(name=model, version=version or "")
        try:
            meta = await method("ModelMetadata")(asked, timeout=30)
            asked_config = pb.ModelConfigRequest(name=model, version=version or "")
            config = await method("ModelConfig")(asked_config, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise ScoringError(
                f"{url}: model '{model}': {exc.code().name} {exc.details()}"
            ) from None
        doc = metadata_from_grpc(meta, config.config)
        chosen = str(version or max(doc["versions"], key=int))
        outputs = [o["name"] for o in doc["outputs"]]
        infer = grpc_infer(method("ModelInfer"), target, model, chosen, outputs)
        return await _run_plan(doc, chosen, infer, **job)


# -- both ------------------------------------------------------------------------------------
async def _run_plan(
    meta: dict[str, Any],
    version: str,
    infer: Infer,
    *,
    input_path: Path,
    output_path: Path,
    batch_size: int,
    chunk_rows: int,
    columns: list[str] | None,
    concurrency: int,
    progress: Progress | None,
) -> Summary:
    config = config_from_metadata(meta)
    plan = prepare(config, int(version), input_path, output_path, engine="remote",
                   batch_size=batch_size, chunk_rows=chunk_rows, columns=columns)  # fmt: skip
    return await run(plan, infer, concurrency=concurrency, progress=progress)


async def score(
    url: str,
    model: str,
    version: str | None,
    input_path: Path,
    output_path: Path,
    *,
    batch_size: int,
    chunk_rows: int,
    columns: list[str] | None = None,
    concurrency: int = 4,
    progress: Progress | None = None,
) -> Summary:
    """Score a file through the server at `url` (http://host:port or grpc://host:port)."""
    job: dict[str, Any] = dict(
        input_path=input_path, output_path=output_path, batch_size=batch_size,
        chunk_rows=chunk_rows, columns=columns, concurrency=concurrency, progress=progress,
    )  # fmt: skip
    if url.startswith(GRPC_SCHEME):
        return await _score_grpc(url, model, version, **job)
    import httpx

    base = url.rstrip("/")
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        try:
            response = await client.get(path)
        except httpx.TransportError as exc:
            raise ScoringError(f"cannot reach the server at {base}: {exc!r}") from None
        if response.status_code != 200:
            raise ScoringError(f"{base}: model '{model}': {_error(response)}")
        meta = response.json()
        chosen = str(version or max(meta["versions"], key=int))
        infer_url = f"/v2/models/{model}/versions/{chosen}/infer"
        infer = remote_infer(client, infer_url, [o["name"] for o in meta["outputs"]])
        return await _run_plan(meta, chosen, infer, **job)
