"""`inference.GRPCInferenceService` (Triton's gRPC API) over the same dataplane as REST.

Every RPC answers what its REST twin answers, through the same functions: metadata, readiness,
Triton's model configuration and statistics, the repository index and model control (`api.py`,
`triton.py`), and inference through `DataPlane.admit` / `infer` / `succeeded` / `failed`, so the
batcher, limits, metrics and statistics are REST's. Keys come from the `authorization` metadata
(`Bearer <key>`) with REST's scopes: health RPCs need none, inference `infer`, model control
`admin`, the rest `read`. A call's deadline caps its time in the queue; a call the client cancels
is dropped before compute (its task is cancelled: the batcher drops what has not joined a
batch). Answers carry REST's Server-Timing as `server-timing` trailing metadata. Errors map to
gRPC codes in `service.grpc.status`. gRPC's standard health check (`grpc.health.v1.Health/
Check`, what Kubernetes' gRPC probes call) answers as ServerReady. The streaming, shared-memory,
trace and log RPCs are not offered (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol

import grpc
from google.protobuf import json_format

from service import triton
from service.api import (
    check_model_control,
    metadata_of,
    others_stats,
    server_metadata,
    stats_of,
)
from service.dataplane import OFFLOAD_BYTES, DataPlane, as_serve_error, server_timing
from service.errors import BadRequest, Cancelled, NotFound, Unavailable
from service.grpc import messages as pb
from service.grpc.status import status_of
from service.grpc.tensors import decode_request, encode_response, wants_raw
from service.repository import LoadedModel, Repository
from service.security import Caller, Guard, access
from service.validation import Bounds, check_decoded
from service.workerstate import Follower

log = logging.getLogger(__name__)


class Context(Protocol):
    """What an RPC uses of its call: grpc.aio's ServicerContext, or `h2server.Call`."""

    def invocation_metadata(self) -> Any: ...
    def time_remaining(self) -> float | None: ...
    def set_trailing_metadata(self, trailing: Any) -> None: ...
    async def abort(self, code: grpc.StatusCode, details: str, trailing: Any) -> NoReturn: ...
    def peer(self) -> str: ...


Handler = Callable[[Any, Context], Awaitable[Any]]
#: Trailing metadata with where the time went, as REST's Server-Timing header.
SERVER_TIMING = "server-timing"


def _authorization(context: Context) -> bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, bytes) else value.encode("latin-1")
    return None


class GRPCInferenceService:
    """The servicer: one coroutine per RPC, and `handler()` binding them to their messages."""

    def __init__(
        self,
        dataplane: DataPlane,
        guard: Guard,
        access_log: bool = False,
        follower: Callable[[], Follower | None] = lambda: None,
    ) -> None:
        self.dataplane = dataplane
        self.repository: Repository = dataplane.repository
        self.guard = guard
        self.access_log = access_log
        self.follower = follower  # with --workers: the other workers' state (as REST's routes)

    def rpcs(self) -> dict[str, tuple[Handler, Any, Any]]:
        """Every RPC offered, by HTTP/2 path: its coroutine (behind the key check of the scope
        it needs), its request class and its response class."""
        table: dict[str, tuple[Handler, str | None, Any, Any]] = {
            "ServerLive": (self.server_live, None, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, None, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, "read", pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (
                self.server_metadata, "read", pb.ServerMetadataRequest, pb.ServerMetadataResponse
            ),
            "ModelMetadata": (
                self.model_metadata, "read", pb.ModelMetadataRequest, pb.ModelMetadataResponse
            ),
            "ModelInfer": (self.model_infer, "infer", pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelConfig": (
                self.model_config, "read", pb.ModelConfigRequest, pb.ModelConfigResponse
            ),
            "ModelStatistics": (
                self.model_statistics, "read", pb.ModelStatisticsRequest,
                pb.ModelStatisticsResponse,
            ),
            "RepositoryIndex": (
                self.repository_index, "read", pb.RepositoryIndexRequest,
                pb.RepositoryIndexResponse,
            ),
            "RepositoryModelLoad": (
                self.repository_model_load, "admin", pb.RepositoryModelLoadRequest,
                pb.RepositoryModelLoadResponse,
            ),
            "RepositoryModelUnload": (
                self.repository_model_unload, "admin", pb.RepositoryModelUnloadRequest,
                pb.RepositoryModelUnloadResponse,
            ),
        }  # fmt: skip
        paths = {pb.method_path(rpc): entry for rpc, entry in table.items()}
        paths[pb.method_path("Check", pb.HEALTH)] = (
            self.health_check,
            None,
            pb.HealthCheckRequest,
            pb.HealthCheckResponse,
        )
        return {
            path: (self._guarded(path.rsplit("/", 1)[1], method, scope), request, response)
            for path, (method, scope, request, response) in paths.items()
        }

    def methods(self) -> dict[str, tuple[Handler, Any]]:
        """The RPCs by HTTP/2 path, with their request class: what `h2server` serves."""
        return {path: (call, request) for path, (call, request, _) in self.rpcs().items()}

    def handlers(self) -> tuple[grpc.GenericRpcHandler, ...]:
        """grpcio's generic handlers of the same RPCs, one per service."""
        services: dict[str, dict[str, Any]] = {}
        for path, (call, request, response) in self.rpcs().items():
            service, rpc = path.strip("/").split("/")
            services.setdefault(service, {})[rpc] = grpc.unary_unary_rpc_method_handler(
                call,
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
        return tuple(grpc.method_handlers_generic_handler(s, m) for s, m in services.items())

    def _guarded(self, rpc: str, method: Handler, scope: str | None) -> Handler:
        """`method` behind the key check, its errors answered as gRPC statuses."""

        async def call(request: Any, context: Context) -> Any:
            caller = None
            try:
                if scope is not None:
                    caller = self.guard.authenticate(_authorization(context), scope)
                response = await method(request, context)
            except Exception as exc:
                error = as_serve_error(exc)
            else:
                if self.access_log:
                    self._log(context, rpc, grpc.StatusCode.OK, caller)
                return response
            code, details, trailing = status_of(error)
            if self.access_log:
                self._log(context, rpc, code, caller)
            await context.abort(code, details, trailing)

        return call

    @staticmethod
    def _log(context: Context, rpc: str, code: grpc.StatusCode, caller: Caller | None) -> None:
        name = caller.name if caller is not None and caller.name else "-"
        access.info('%s "gRPC %s" %s key=%s', context.peer(), rpc, code.name, name)

    # -- health and metadata --------------------------------------------------------------
    async def server_live(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def health_check(self, request: Any, context: Context) -> Any:
        """gRPC's standard health check: SERVING when the server is ready (as ServerReady), for
        the server as a whole ("") or the inference service; another service is NOT_FOUND."""
        if request.service not in ("", pb.SERVICE):
            raise NotFound(f"unknown service '{request.service}' (health: '' or {pb.SERVICE})")
        ready = (await self.server_ready(request, context)).ready
        status = pb.HealthCheckResponse.SERVING if ready else pb.HealthCheckResponse.NOT_SERVING
        return pb.HealthCheckResponse(status=status)

    async def server_ready(self, request: Any, context: Context) -> Any:
        follower = self.follower()
        others = follower.problems() if follower is not None else []
        return pb.ServerReadyResponse(ready=self.repository.all_ready() and not others)

    async def model_ready(self, request: Any, context: Context) -> Any:
        """Ready or not; an unknown model or version is NOT_FOUND."""
        try:
            self.repository.get(request.name, request.version or None)
        except Unavailable:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: Any, context: Context) -> Any:
        meta = server_metadata()
        return pb.ServerMetadataResponse(
            name=meta.name, version=meta.version, extensions=meta.extensions
        )

    async def model_metadata(self, request: Any, context: Context) -> Any:
        model = self.repository.get(request.name, request.version or None)
        meta = metadata_of(self.repository, model)
        response = pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform
        )
        for specs, target in ((meta.inputs, response.inputs), (meta.outputs, response.outputs)):
            for t in specs:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return response

    async def model_config(self, request: Any, context: Context) -> Any:
        model = self.repository.get(request.name, request.version or None)
        doc = triton.model_config(model, self.repository.policy(model.config.version_policy))
        response = pb.ModelConfigResponse()
        json_format.ParseDict(doc, response.config)
        return response

    async def model_statistics(self, request: Any, context: Context) -> Any:
        name = request.name or None
        version = (request.version or None) if name else None
        doc = stats_of(self.repository, name, version, await others_stats(self.follower()))
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    # -- repository -----------------------------------------------------------------------
    async def repository_index(self, request: Any, context: Context) -> Any:
        """Every model on disk or loaded; `ready` keeps only the READY ones (Triton's)."""
        response = pb.RepositoryIndexResponse()
        for entry in self.repository.index():
            if request.ready and entry["state"] != "READY":
                continue
            response.models.add(
                name=entry["name"],
                version=entry.get("version", ""),
                state=entry["state"],
                reason=entry.get("reason", ""),
            )
        return response

    async def repository_model_load(self, request: Any, context: Context) -> Any:
        """Load (or reload) a model's versions from the repository; explicit mode only."""
        check_model_control(self.repository)
        if request.parameters:
            raise BadRequest(
                "load parameters (a config or files sent with the request) are not supported: "
                "put the files in the repository and load by name"
            )
        follower, name = self.follower(), request.model_name
        loaded = await (follower.load(name) if follower is not None else self.repository.load(name))
        not_ready = [m for m in loaded if not m.ready]
        if not_ready:
            reason = not_ready[0].not_ready_reason
            raise Unavailable(f"model '{request.model_name}' loaded but is not ready: {reason}")
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any, context: Context) -> Any:
        """Unload a model (its admitted requests finish first); explicit mode only."""
        check_model_control(self.repository)
        follower, name = self.follower(), request.model_name
        await (follower.unload(name) if follower is not None else self.repository.unload(name))
        return pb.RepositoryModelUnloadResponse()

    # -- inference ------------------------------------------------------------------------
    @staticmethod
    def _decode(model: LoadedModel, request: Any) -> Any:
        decoded = decode_request(request, Bounds(model.config, model.limits))
        check_decoded(model.config, decoded.inputs)
        return decoded

    async def model_infer(self, request: Any, context: Context) -> Any:
        """Admit, decode (bounds first), batch, answer; counted as REST counts."""
        name, version = request.model_name, request.model_version or None
        start = time.perf_counter()
        model = None
        try:
            model = self.dataplane.admit(name, version)
            if sum(len(raw) for raw in request.raw_input_contents) > OFFLOAD_BYTES:
                decoded = await asyncio.to_thread(self._decode, model, request)
            else:
                decoded = self._decode(model, request)
            remaining = context.time_remaining()
            deadline_ms = None if remaining is None else max(remaining, 0.0) * 1000
            # a call the client cancels cancels this task: the batcher drops it before compute
            result, wanted = await self.dataplane.infer(model, decoded, None, deadline_ms)
            response = encode_response(
                name,
                str(model.version),
                [(n, result.outputs[n]) for n, _ in wanted],
                decoded.id,
                self.dataplane.response_parameters(model, decoded, result),
                raw=wants_raw(request),
            )
        except asyncio.CancelledError:
            self.dataplane.failed(name, version, Cancelled("the call was cancelled"), model, start)
            raise
        except Exception as exc:
            raise self.dataplane.failed(name, version, exc, model, start) from None
        total = time.perf_counter() - start
        self.dataplane.succeeded(model, result, total)
        context.set_trailing_metadata(((SERVER_TIMING, server_timing(result, total)),))
        return response
