"""The FastAPI app factory (``uvicorn frontend.app:create_app --factory``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from frontend import errors
from frontend.client import EngineClient
from frontend.jsonresp import JSONResponse
from frontend.middleware import RequestContext
from frontend.routes import health, models, predict
from frontend.settings import Settings
from ipc import logs
from ipc.ring import remove_orphans


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logs.configure("worker", json=settings.log_json, level=settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        remove_orphans()  # segments of workers that died without unlinking theirs
        client = EngineClient(settings.run_dir, settings.ring_slots, settings.heartbeat_timeout_s)
        app.state.client = client
        await client.start()
        try:
            yield
        finally:
            await client.close()

    app = FastAPI(
        title="ringserve",
        version=_version(),
        description="Image inference appliance: detections and classes over REST.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(RequestContext, api_key=settings.api_key)
    errors.install(app)
    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ringserve")
    except PackageNotFoundError:
        return "0.0.0"
