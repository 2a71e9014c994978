"""Scoring through a running server: Open Inference Protocol v2 with binary tensors over httpx.

Each batch goes as a JSON header plus the raw input bytes (`Inference-Header-Content-Length`),
with every output asked for as binary data; several requests are in flight at once. A 503 is
retried after its `Retry-After` (a bounded number of times), a 400 means the model refused the
rows (they are then sent one by one), and the answers go through the same postprocessing, part
files and manifest as in-process scoring.
"""

from __future__ import annotations

import asyncio
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
    """Score a file through the server at `url` (http://host:port)."""
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
        config = config_from_metadata(meta)
        chosen = int(version or max(meta["versions"], key=int))
        plan = prepare(config, chosen, input_path, output_path, engine="remote",
                       batch_size=batch_size, chunk_rows=chunk_rows, columns=columns)  # fmt: skip
        infer_url = f"/v2/models/{model}/versions/{chosen}/infer"
        infer = remote_infer(client, infer_url, [o.name for o in config.outputs])
        return await run(plan, infer, concurrency=concurrency, progress=progress)
