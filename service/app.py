"""The application factory: `create_app(settings)` wires repository, dataplane, routes and lane."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api import ROUTERS
from service.config import Settings, get_settings
from service.dataplane import DataPlane
from service.errors import install_error_handlers
from service.fastlane import FastLane
from service.metrics import Metrics
from service.repository import Repository


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load when it starts (lifespan) and drain when it stops."""
    settings = settings or get_settings()
    metrics = Metrics()
    repository = Repository(settings, metrics)
    dataplane = DataPlane(repository)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await repository.load_all()
        yield
        await repository.close()

    app = FastAPI(
        title="onnxserve",
        version=__version__,
        summary="ONNX models over the Open Inference Protocol v2, with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repository = repository
    app.state.dataplane = dataplane
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    if settings.fast_lane:
        app.add_middleware(FastLane, dataplane=dataplane, max_body=settings.max_body_bytes)
    return app
