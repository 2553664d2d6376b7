"""The V2 endpoints: health, metadata, configuration, inference, statistics, shared memory."""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from frontend.body import read_limited
from frontend.client import EngineClient
from frontend.errors import request_id
from frontend.settings import Settings
from frontend.v2 import classification, codec, infer, inputs, models, outputs, schemas, stats
from frontend.v2.errors import ERRORS, V2Error, V2Route, bad
from frontend.v2.settings import V2Settings
from frontend.v2.state import V2State
from ipc.messages import ModelInfo


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status, media_type="application/json")


def _client(request: Request) -> EngineClient:
    client: EngineClient = request.app.state.client
    return client


def _model(request: Request) -> tuple[EngineClient, ModelInfo]:
    client = _client(request)
    p = request.path_params
    return client, models.resolve(client, p["model"], p.get("version", ""))


class V2Api:
    def __init__(self, state: V2State) -> None:
        self.state = state

    # ----------------------------------------------------------------- server
    async def server_metadata(self, request: Request) -> Response:
        return _json({"name": "ringserve", "version": self.state.version, "extensions": self.state.extensions()})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        client = _client(request)
        # Triton answers readiness with 200 or 400 (the V2 protocol: "4xx indicates false").
        return Response(status_code=200 if client.is_ready and client.models else 400)

    # ----------------------------------------------------------------- models
    async def model_metadata(self, request: Request) -> Response:
        client, info = _model(request)
        return _json(models.metadata(client, info, versioned="version" in request.path_params))

    async def model_ready(self, request: Request) -> Response:
        client, info = _model(request)
        if not models.is_ready(client, info):
            raise V2Error(400, f"model '{info.name}' version {info.version} is not ready")
        return Response(status_code=200)

    async def model_config(self, request: Request) -> Response:
        client, info = _model(request)
        return _json(models.config(client, info))

    async def model_stats(self, request: Request) -> Response:
        client = _client(request)
        p = request.path_params
        if "model" not in p:
            keys = sorted(models.known(client))
        elif "version" in p:
            info = models.resolve(client, p["model"], p["version"])
            keys = [(info.name, info.version)]
        else:
            models.resolve(client, p["model"], "")
            keys = [(p["model"], v) for v in models.versions(client, p["model"])]
        totals = stats.read_totals(self.state.stats.path.parent)
        return _json({"model_stats": [stats.model_stat(n, v, totals.get((n, v))) for n, v in keys]})

    # ----------------------------------------------------------------- inference
    async def infer(self, request: Request) -> Response:
        client, info = _model(request)
        started = time.perf_counter_ns()
        try:
            return await self._infer(request, client, info, started)
        except Exception:
            self.state.stats.failure(info.name, info.version, time.perf_counter_ns() - started)
            raise

    async def _infer(self, request: Request, client: EngineClient, info: ModelInfo, started: int) -> Response:
        settings, shm = self.state.settings, self.state.shm
        body = await read_limited(request, settings.max_body_bytes)
        body = codec.decompress(body, request.headers.get("content-encoding", ""), settings.max_body_bytes)
        header, binary = codec.split(body, request.headers.get("inference-header-content-length"))
        req: schemas.InferRequest = schemas.parse(schemas.InferRequest, header, "inference request")
        accepted = time.monotonic()
        opts = infer.options(req.parameters, settings)
        binary_default = schemas.bool_param(req.parameters, "binary_data_output", False)
        counts = classification.requested(req.outputs)
        wanted, raw = outputs.check_requested(info, req.outputs)
        outputs.check_regions(req.outputs, shm)
        images = inputs.read(req, binary, info, shm)
        service = request.app.state.service
        outcome = await infer.run(service, info, images, request_id(request), opts, raw=raw, accepted=accepted)
        building = time.perf_counter_ns()
        tensors = classification.apply(info, outputs.build(info, outcome, wanted), counts)
        head: dict[str, Any] = {"model_name": info.name, "model_version": str(info.version)}
        if req.id:
            head["id"] = req.id
        payload, header_length = outputs.encode(head, tensors, req.outputs, binary_default, shm)
        done = time.perf_counter_ns()
        self.state.stats.success(info.name, info.version, outcome.sample(done - started, done - building))
        if header_length is None:
            return Response(payload, media_type="application/json")
        return Response(
            payload,
            headers={"Inference-Header-Content-Length": str(header_length)},
            media_type="application/octet-stream",
        )

    # ----------------------------------------------------------------- shared memory
    async def shm_status(self, request: Request) -> Response:
        return _json(self.state.shm.status(request.path_params.get("region", "")))

    async def shm_register(self, request: Request) -> Response:
        body = await read_limited(request, 64 * 1024)
        r: schemas.RegisterRequest = schemas.parse(schemas.RegisterRequest, body, "register request")
        self.state.shm.register(request.path_params["region"], r.key, r.offset, r.byte_size)
        return Response(status_code=200)

    async def shm_unregister(self, request: Request) -> Response:
        self.state.shm.unregister(request.path_params.get("region", ""))
        return Response(status_code=200)

    async def unsupported(self, request: Request) -> Response:
        raise bad(f"{request.method} {request.url.path} is not supported by ringserve")


def make_router(settings: Settings) -> APIRouter:
    """The V2 router of one worker; its settings are read here, at the app factory."""
    api = V2Api(V2State(settings, V2Settings()))
    router = APIRouter(route_class=V2Route, tags=["v2"])
    get, post = ["GET"], ["POST"]
    model = "/v2/models/{model}"
    version = "/v2/models/{model}/versions/{version}"
    table: list[tuple[str, Any, list[str]]] = [
        ("/v2", api.server_metadata, get),
        ("/v2/health/live", api.live, get),
        ("/v2/health/ready", api.ready, get),
        ("/v2/models/stats", api.model_stats, get),  # before {model}, which would match "stats"
        (f"{model}/stats", api.model_stats, get),
        (f"{version}/stats", api.model_stats, get),
        (model, api.model_metadata, get),
        (version, api.model_metadata, get),
        (f"{model}/ready", api.model_ready, get),
        (f"{version}/ready", api.model_ready, get),
        (f"{model}/config", api.model_config, get),
        (f"{version}/config", api.model_config, get),
        (f"{model}/infer", api.infer, post),
        (f"{version}/infer", api.infer, post),
        ("/v2/systemsharedmemory/status", api.shm_status, get),
        ("/v2/systemsharedmemory/region/{region}/status", api.shm_status, get),
        ("/v2/systemsharedmemory/region/{region}/register", api.shm_register, post),
        ("/v2/systemsharedmemory/unregister", api.shm_unregister, post),
        ("/v2/systemsharedmemory/region/{region}/unregister", api.shm_unregister, post),
    ]
    for path, endpoint, methods in table:
        router.add_api_route(path, endpoint, methods=methods, response_class=Response, responses=ERRORS)
    # Last: any other /v2 path or method answers a V2 error, not the REST shape.
    router.add_api_route(
        "/v2/{rest:path}", api.unsupported, methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False
    )
    return router
