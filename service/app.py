"""The application factory: `create_app(settings)` wires repository, dataplane, routes and lane."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from service import __version__, workerstate
from service.api import ROUTERS
from service.config import Settings, get_settings
from service.dataplane import DataPlane, error_answer
from service.errors import ServeError, install_error_handlers
from service.fastlane import DirectLane, FastLane
from service.jobs import JobManager
from service.jobs_api import router as jobs_router
from service.metrics import Metrics
from service.repository import Repository
from service.security import Guard, default_allowed_hosts, log_access, logged
from service.transport import send_answer


class OnnxServe(FastAPI):
    """FastAPI, with the security check and then the fast lane before any of FastAPI's
    per-request machinery."""

    fast_lane: FastLane | None = None
    direct_lane: DirectLane | None = None  # served by service.httpserver's protocol
    guard: Guard | None = None
    access_log = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.guard is not None:
            try:
                caller = self.guard.check(scope)
            except ServeError as exc:
                await send_answer(send, error_answer(exc))
                if self.access_log:
                    log_access(scope, exc.status, None)
                return
            scope.setdefault("state", {})["caller"] = caller
            if self.access_log:
                send = logged(scope, send, caller)
        if self.fast_lane is not None and await self.fast_lane.handle(scope, receive, send):
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load when it starts (lifespan) and drain when it stops."""
    settings = settings or get_settings()
    metrics = Metrics(saturation_target_s=settings.saturation_target_ms / 1000)
    repository = Repository(settings, metrics)
    dataplane = DataPlane(repository, settings.max_body_bytes)
    jobs = JobManager(settings, repository)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await repository.load_all()
        await jobs.resume()  # jobs live at the last stop go on from their manifests
        poller = None
        if settings.model_control_mode == "poll":
            poller = asyncio.create_task(repository.poll_forever(), name="repository-poll")
        grpc_server = None
        if settings.grpc_port:  # same loop, dataplane and guard as HTTP (service/grpc)
            from service.grpc import server as grpc_serving

            assert app.guard is not None
            grpc_server = await grpc_serving.start(settings, dataplane, app.guard, app.state)
        app.state.follower = await workerstate.follow(settings, repository)  # --workers only
        yield
        if grpc_server is not None:  # admitted calls finish before the batchers close
            await grpc_serving.stop(grpc_server, settings.graceful_timeout_s)
        if poller is not None:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        await jobs.stop()  # before the batchers close; live jobs stay live for the next start
        await workerstate.unfollow(app.state.follower)
        await repository.close()

    app = OnnxServe(
        title="onnxserve",
        version=__version__,
        summary="ONNX models over the Open Inference Protocol v2, with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    app.state.dataplane = dataplane
    app.state.jobs = jobs
    app.guard = Guard(
        settings.api_keys_file,
        settings.allowed_hosts or default_allowed_hosts(settings.host),
        settings.unsafe_anonymous_admin,
        list(settings.anonymous_scopes) if settings.anonymous_scopes is not None else None,
    )
    app.access_log = settings.access_log
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(jobs_router)
    if settings.fast_lane:
        app.fast_lane = FastLane(dataplane)
        app.direct_lane = DirectLane(dataplane, app.guard, settings.access_log)
    return app
