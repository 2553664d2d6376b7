"""The FastAPI app factory (``uvicorn frontend.app:create_app --factory``)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger

from frontend import errors
from frontend.client import EngineClient
from frontend.fastpath import PATH, PredictFastPath
from frontend.jsonresp import JSONResponse
from frontend.middleware import RequestContext
from frontend.routes import batch, console, deepstack, health, models, predict, stream
from frontend.service import ImageService
from frontend.settings import Settings
from frontend.state import install as install_state
from frontend.v2 import make_router as v2_router
from frontend.v2 import repository as v2_repository
from ipc import logs
from ipc.metrics_dir import compact, ensure_env
from ipc.shm import remove_orphans


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    logs.configure("worker", json=settings.log_json, level=settings.log_level)
    metrics_path = ensure_env(settings.run_dir)  # before prometheus_client is imported
    from frontend import metrics

    app = FastAPI(
        title="ringserve",
        version=_version(),
        description="Image inference appliance: detections and classes over REST.",
        lifespan=_lifespan(settings, metrics_path),
        default_response_class=JSONResponse,
    )
    app.state.settings = settings
    app.state.count_error = lambda reason: metrics.ERRORS.labels(reason).inc()
    app.state.observe_decode = metrics.DECODE.observe
    app.add_middleware(PredictFastPath, route=predict.route(PATH))  # innermost: inside the gate and key check
    install_state(app, settings)  # frontend/state/: inside RequestContext (after the key check)
    _middleware(app, settings)
    errors.install(app)
    for router in (
        predict.router,
        batch.router,
        stream.router,
        deepstack.router,
        models.router,
        health.router,
        v2_repository.make_router(),  # before the V2 router and its catch-all
        v2_router(settings),
        metrics.router,
        console.router,
    ):
        app.include_router(router)
    return app


def _lifespan(settings: Settings, metrics_path: Path) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    from frontend import metrics

    def ring_changed(in_use: int, slots: int) -> None:
        metrics.RING_IN_USE.set(in_use)
        metrics.RING_SLOTS.set(slots)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        remove_orphans()  # segments of workers that died without unlinking theirs
        try:
            compact(metrics_path)  # fold the metric files of dead processes
        except (OSError, ValueError) as exc:  # metrics must never stop a worker from serving
            logger.warning("could not fold old metric files: {}", exc)
        client = EngineClient(
            settings.run_dir,
            settings.ring_slots,
            settings.heartbeat_timeout_s,
            ring_changed,
            on_result=metrics.observe_queue_wait,
        )
        app.state.client = client
        app.state.service = ImageService(client, settings, observe_decode=metrics.DECODE.observe)
        await client.start()
        grpc_server = None
        try:
            if settings.grpc_port:  # RINGSERVE_GRPC_PORT; 0: grpc, protobuf and tritonclient are never imported
                from frontend.grpc import serve as serve_grpc

                grpc_server = await serve_grpc(settings, client, app.state.service)
            await app.state.shared.start(app)  # jobs, cache, prediction log around the service
            # What the worker built to start (the imports, FastAPI's routes, pydantic's schemas:
            # about 97,000 objects) lives as long as the worker. Frozen, a full collection no
            # longer walks it on the event loop: under load one took 111 ms, every request of the
            # worker waiting (Lite0, c=16; none during the same load frozen).
            gc.collect()
            gc.freeze()
            yield
        finally:
            await app.state.shared.stop()
            if grpc_server is not None:
                await grpc_server.close()
            app.state.service.close()
            await client.close()

    return lifespan


def _middleware(app: FastAPI, settings: Settings) -> None:
    from frontend import metrics

    def observe(route: str, method: str, status: int, seconds: float) -> None:
        metrics.REQUESTS.labels(route, method, str(status)).inc()
        metrics.DURATION.labels(route).observe(seconds)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(
        RequestContext,
        api_key=settings.api_key,
        observe=observe,
        allowed_origins=settings.cors_origins,
        allowed_hosts=settings.allowed_hosts,
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ringserve")
    except PackageNotFoundError:
        return "0.0.0"
