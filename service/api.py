"""HTTP routes: server, model, repository, inference (v2 and v1) and metrics routers."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service import __version__, triton
from service.errors import Forbidden
from service.fastlane import answer_infer
from service.metrics import CONTENT_TYPE, Metrics
from service.repository import LoadedModel, Repository
from service.schemas import (
    ErrorBody,
    IndexEntry,
    IndexRequest,
    InferRequestBody,
    InferResponseBody,
    LoadResult,
    ModelMetadata,
    ModelReadiness,
    PredictRequestBody,
    PredictResponseBody,
    Readiness,
    ServerMetadata,
    TensorMetadata,
)
from service.stats import merge_triton, triton_entries
from service.workerstate import Follower

EXTENSIONS = [
    "model_repository",
    "binary_tensor_data",
    "model_configuration",
    "statistics",
    "server_timing",
]


def get_repository(request: Request) -> Repository:
    return request.app.state.repository


def get_follower(request: Request) -> Follower | None:
    """A worker's view of the other workers (`--workers`); None in a single process."""
    return getattr(request.app.state, "follower", None)


RepositoryDep = Annotated[Repository, Depends(get_repository)]
FollowerDep = Annotated[Follower | None, Depends(get_follower)]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 403, 404, 413, 503, 504)
}

server = APIRouter(prefix="/v2", tags=["server"])
models = APIRouter(prefix="/v2/models", tags=["models"], responses=ERRORS)
repository = APIRouter(prefix="/v2/repository", tags=["repository"], responses=ERRORS)
v1 = APIRouter(prefix="/v1", tags=["v1"], responses=ERRORS)
metrics = APIRouter(tags=["metrics"])


# -- server ----------------------------------------------------------------------------------
@server.get("", response_model=ServerMetadata)
def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="onnxserve", version=__version__, extensions=EXTENSIONS)


@server.get("/health/live", response_model=Readiness)
def live() -> Readiness:
    return Readiness(ready=True)


@server.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}})
def ready(repo: RepositoryDep, follower: FollowerDep) -> Any:
    """Ready when every model that should serve does (and, with --workers, in every worker)."""
    others = follower.problems() if follower is not None else []
    if repo.all_ready() and not others:
        return Readiness(ready=True)
    problems = [] if repo.all_ready() else repo.problems()
    body = Readiness(ready=False, error="; ".join(problems + others) or "models are loading")
    return JSONResponse(body.model_dump(), status_code=503)


# -- models ----------------------------------------------------------------------------------
def metadata_of(repo: Repository, model: LoadedModel) -> ModelMetadata:
    config = model.config
    params: dict[str, Any] = {
        "provider": model.runtime.provider,
        "intra_op_threads": model.runtime.threads,
        "io_binding": model.runtime.io_binding,
        "instance_count": model.instances,
        "model_file": model.model_file,
        "batching": model.batching.model_dump(),
    }
    if model.runtime.fallback_reason:
        params["fallback_reason"] = model.runtime.fallback_reason
    params["sessions"] = [s.as_dict() for s in model.runtime.sessions]
    if model.runtime.on_gpu:
        params["gpus"] = model.runtime.gpus
    for extra in ("task", "labels", "threshold", "normalization"):
        value = getattr(config, extra)
        if value is not None:
            params[extra] = value.model_dump() if hasattr(value, "model_dump") else value

    def tensors(specs: list) -> list[TensorMetadata]:
        return [TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]

    return ModelMetadata(
        name=config.name,
        versions=[str(v) for v in sorted(repo.loaded.get(config.name, {}))],
        platform=config.platform,
        inputs=tensors(config.inputs),
        outputs=tensors(config.outputs),
        parameters=params,
    )


def stats_of(
    repo: Repository,
    name: str | None,
    version: str | None,
    others: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Triton's statistics of the chosen loaded versions, on the event loop (where they are
    counted); `others`: the other workers' entries (`--workers`), added in."""
    if name is None:
        chosen = repo.models()
    elif version is None:
        repo.get(name)  # 404 / 503 with the reason
        chosen = list(repo.loaded[name].values())
    else:
        chosen = [repo.get(name, version)]
    chosen.sort(key=lambda m: (m.name, m.version))
    entries = triton_entries(chosen)
    if not others:
        return {"model_stats": entries}
    by_version: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in others:
        by_version.setdefault((entry["name"], entry["version"]), []).append(entry)
    merged = [merge_triton([e, *by_version.get((e["name"], e["version"]), [])]) for e in entries]
    return {"model_stats": merged}


async def others_stats(follower: Follower | None) -> list[dict[str, Any]] | None:
    """With `--workers`, the other workers' statistics entries, their files read off the loop."""
    return None if follower is None else await asyncio.to_thread(follower.others_stats)


@models.get("/stats", summary="Statistics of every loaded model (Triton's statistics extension)")
async def all_stats(repo: RepositoryDep, follower: FollowerDep) -> dict[str, Any]:
    return stats_of(repo, None, None, await others_stats(follower))


@models.get("/{model}", response_model=ModelMetadata)
def model_metadata(model: str, repo: RepositoryDep) -> ModelMetadata:
    return metadata_of(repo, repo.get(model))


@models.get("/{model}/versions/{version}", response_model=ModelMetadata)
def version_metadata(model: str, version: str, repo: RepositoryDep) -> ModelMetadata:
    return metadata_of(repo, repo.get(model, version))


def _readiness(repo: Repository, model: str, version: str | None) -> ModelReadiness:
    loaded = repo.get(model, version)  # raises 404 / 503 with the reason
    return ModelReadiness(name=model, version=str(loaded.version), ready=True)


@models.get("/{model}/ready", response_model=ModelReadiness)
def model_ready(model: str, repo: RepositoryDep) -> ModelReadiness:
    return _readiness(repo, model, None)


@models.get("/{model}/versions/{version}/ready", response_model=ModelReadiness)
def version_ready(model: str, version: str, repo: RepositoryDep) -> ModelReadiness:
    return _readiness(repo, model, version)


@models.get("/{model}/config", summary="Triton's model configuration (JSON)")
def model_config(model: str, repo: RepositoryDep) -> dict[str, Any]:
    loaded = repo.get(model)
    return triton.model_config(loaded, repo.policy(loaded.config.version_policy))


@models.get("/{model}/versions/{version}/config", summary="Triton's model configuration (JSON)")
def version_config(model: str, version: str, repo: RepositoryDep) -> dict[str, Any]:
    loaded = repo.get(model, version)
    return triton.model_config(loaded, repo.policy(loaded.config.version_policy))


@models.get("/{model}/stats", summary="Statistics of a model's loaded versions")
async def model_stats(model: str, repo: RepositoryDep, follower: FollowerDep) -> dict[str, Any]:
    return stats_of(repo, model, None, await others_stats(follower))


@models.get("/{model}/versions/{version}/stats", summary="Statistics of one version")
async def version_stats(
    model: str, version: str, repo: RepositoryDep, follower: FollowerDep
) -> dict[str, Any]:
    return stats_of(repo, model, version, await others_stats(follower))


# -- inference (served by the fast lane when it is on; same code path) ------------------------
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {
            "application/json": {"schema": InferRequestBody.model_json_schema()},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header + binary tensors (Inference-Header-Content-Length).",
            },
        },
        "required": True,
    }
}


async def _infer(request: Request, kind: str, model: str, version: str | None) -> Response:
    answer = await answer_infer(
        request.app.state.dataplane, kind, model, version,
        {k.lower(): v for k, v in request.headers.items()}, request.receive,
    )  # fmt: skip
    return Response(answer.body, status_code=answer.status, headers=answer.headers)


@models.post(
    "/{model}/infer", response_model=InferResponseBody, openapi_extra=_INFER_DOC,
    summary="Run inference (Open Inference Protocol v2, JSON or binary tensors)",
)  # fmt: skip
async def infer(model: str, request: Request) -> Response:
    return await _infer(request, "v2", model, None)


@models.post(
    "/{model}/versions/{version}/infer", response_model=InferResponseBody,
    openapi_extra=_INFER_DOC, summary="Run inference on one version",
)  # fmt: skip
async def infer_version(model: str, version: str, request: Request) -> Response:
    return await _infer(request, "v2", model, version)


_PREDICT_DOC: dict[str, Any] = {
    "requestBody": {
        "content": {"application/json": {"schema": PredictRequestBody.model_json_schema()}},
        "required": True,
    }
}


@v1.post("/models/{model}:predict", response_model=PredictResponseBody, openapi_extra=_PREDICT_DOC)
async def predict(model: str, request: Request) -> Response:
    """Task-level predictions: labels and probabilities, anomaly flags, or forecasts."""
    return await _infer(request, "v1", model, None)


@v1.post(
    "/models/{model}/versions/{version}:predict", response_model=PredictResponseBody,
    openapi_extra=_PREDICT_DOC,
)  # fmt: skip
async def predict_version(model: str, version: str, request: Request) -> Response:
    """Task-level predictions from one version."""
    return await _infer(request, "v1", model, version)


# -- repository extension --------------------------------------------------------------------
@repository.post("/index", response_model=list[IndexEntry])
def repository_index(repo: RepositoryDep, body: IndexRequest | None = None) -> list[IndexEntry]:
    entries = [IndexEntry(**e) for e in repo.index()]
    if body is not None and body.ready is not None:
        entries = [e for e in entries if (e.state == "READY") == body.ready]
    return entries


def check_model_control(repo: Repository) -> None:
    """The load/unload API works in explicit mode only (as Triton's)."""
    mode = repo.settings.model_control_mode
    if mode == "none":
        raise Forbidden(
            "model control is disabled (--model-control-mode none): start the server with "
            "--model-control-mode explicit to load and unload models through this API, or poll "
            "to follow the repository's files"
        )
    if mode == "poll":
        raise Forbidden(
            "the repository is polled (--model-control-mode poll): add, change or remove model "
            "files instead, or start the server with --model-control-mode explicit"
        )


@repository.post("/models/{model}/load", response_model=LoadResult)
async def load_model(model: str, repo: RepositoryDep, follower: FollowerDep) -> LoadResult:
    check_model_control(repo)
    loaded = await (follower.load(model) if follower is not None else repo.load(model))
    state = "READY" if all(m.ready for m in loaded) else "UNAVAILABLE"
    return LoadResult(name=model, versions=[str(m.version) for m in loaded], state=state)


@repository.post("/models/{model}/unload", response_model=LoadResult)
async def unload_model(model: str, repo: RepositoryDep, follower: FollowerDep) -> LoadResult:
    check_model_control(repo)
    await (follower.unload(model) if follower is not None else repo.unload(model))
    return LoadResult(name=model, versions=[], state="UNLOADED")


# -- metrics ---------------------------------------------------------------------------------
@metrics.get("/metrics", response_class=Response)
def prometheus(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)


ROUTERS = (server, models, repository, v1, metrics)
