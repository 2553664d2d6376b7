"""DeepStack's HTTP API, so that NVRs and home automation use the box unchanged.

Frigate's ``deepstack`` detector, Blue Iris and Agent DVR (DeepStack or CodeProject.AI), Home
Assistant's DeepStack integration: they post a multipart form to ``/v1/vision/...``. Served here:
``/v1/vision/detection`` (the default detector), ``/v1/vision/custom/{model}`` (any detector of the
repository) and ``/v1/vision/scene`` (the classifier named by ``RINGSERVE_DEEPSTACK_SCENE_MODEL``,
else the first classifier served). Every other path under ``/v1/`` (face, register, backup, ...)
answers 404 in DeepStack's shape. A thin adapter: the per-image work is the one REST uses.

The API key is checked here, not in the middleware: DeepStack sends it in the body.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from frontend import deepstack_io as ds
from frontend.errors import request_id
from frontend.jsonresp import JSONResponse
from frontend.params import Params
from frontend.service import ImageRequest, ImageResult, ImageService
from ipc.errors import BadInput, EngineUnavailable, ModelNotFound, RingserveError
from ipc.messages import ModelInfo

DETECTORS = ("ssd", "yolo")
SERVED = ("/v1/vision/detection", "/v1/vision/scene")
_CUSTOM = "/v1/vision/custom/"


class DeepStackRoute(APIRoute):
    """Every error of these routes is answered in DeepStack's shape, not REST's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RingserveError as exc:
                return ds.error_response(request, exc)
            except ClientDisconnect:
                return ds.error_response(request, BadInput("the client disconnected"))
            except Exception:
                return ds.internal_error(request)

        return handle


router = APIRouter(tags=["deepstack"], route_class=DeepStackRoute)

_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "min_confidence": {"type": "number", "minimum": 0, "maximum": 1},
                        "api_key": {"type": "string"},
                    },
                }
            }
        },
    }
}
_SCENE_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}, "api_key": {"type": "string"}},
                }
            }
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ds.DSError} for code in (400, 401, 403, 404, 408, 413, 415, 500, 503, 504)
}


async def _run(request: Request, info: ModelInfo, form: ds.DSForm, accepted: float, **params: Any) -> ImageResult:
    if form.image is None:
        raise BadInput(ds.NO_IMAGE)
    req = ImageRequest(info.name, info.version, Params(**params), request_id(request), accepted, image=form.image)
    service: ImageService = request.app.state.service
    return await service.predict(req)


async def _detect(request: Request, info: ModelInfo, accepted: float) -> Response:
    form = await ds.read_form(request, request.app.state.settings)
    confidence = ds.min_confidence(form.min_confidence) if form.image is not None else None
    result = await _run(request, info, form, accepted, confidence_threshold=confidence)
    width, height = result.width, result.height
    predictions = [
        {
            "label": d.label,
            "confidence": d.confidence,
            "x_min": _clamp(d.bbox[0], width),
            "y_min": _clamp(d.bbox[1], height),
            "x_max": _clamp(d.bbox[2], width),
            "y_max": _clamp(d.bbox[3], height),
        }
        for d in result.detections  # by confidence, highest first: Frigate stops at the first one under its threshold
    ]
    t = result.timings
    body = {
        "success": True,
        "predictions": predictions,
        "count": len(predictions),
        "inferenceMs": round(t.inference_ms),
        "processMs": round(t.total_ms),
    }
    return JSONResponse(body)


def _clamp(value: float, limit: int) -> int:
    return min(max(round(value), 0), limit)


def _resolve(request: Request, name: str, tasks: tuple[str, ...]) -> ModelInfo | None:
    """The latest version of ``name`` when it is served with one of ``tasks``, else None."""
    try:
        info = request.app.state.client.resolve(name, None)
    except ModelNotFound:
        return None
    return info if info.task in tasks else None


@router.post("/v1/vision/detection", response_model=ds.DSDetectionResponse, responses=_ERRORS, openapi_extra=_FORM)
async def detection(request: Request) -> Response:
    """Objects on the image, with the default detector (DeepStack's object detection)."""
    accepted = time.monotonic()
    info = _resolve(request, request.app.state.settings.default_model, DETECTORS)
    if info is None:
        await ds.read_form(request, request.app.state.settings)  # the key first, as DeepStack
        raise ds.NotActivated("Detection endpoint not activated")
    return await _detect(request, info, accepted)


@router.post("/v1/vision/custom/{model}", response_model=ds.DSDetectionResponse, responses=_ERRORS, openapi_extra=_FORM)
async def custom(request: Request, model: str) -> Response:
    """Objects on the image, with any detector of the model repository (DeepStack's custom models)."""
    accepted = time.monotonic()
    info = _resolve(request, model, DETECTORS)
    if info is None:
        await ds.read_form(request, request.app.state.settings)
        raise ds.NotServed(f"no custom detector named {model!r} is served")
    return await _detect(request, info, accepted)


@router.post("/v1/vision/scene", response_model=ds.DSSceneResponse, responses=_ERRORS, openapi_extra=_SCENE_FORM)
async def scene(request: Request) -> Response:
    """The image's class, with the scene classifier (DeepStack's scene recognition)."""
    accepted = time.monotonic()
    form = await ds.read_form(request, request.app.state.settings)
    info = _scene_model(request)
    if info is None:
        raise ds.NotActivated("Scene endpoint not activated")
    result = await _run(request, info, form, accepted, max_detections=1)
    if not result.classes:
        return JSONResponse({"success": True, "label": "", "confidence": 0.0})
    top = result.classes[0]
    return JSONResponse({"success": True, "label": top.label, "confidence": top.confidence})


def _scene_model(request: Request) -> ModelInfo | None:
    client = request.app.state.client
    if not client.is_ready:
        raise EngineUnavailable("the engine is not connected")
    name = request.app.state.settings.deepstack_scene_model
    if name:
        return _resolve(request, name, ("classify",))
    for candidate in sorted(client.latest):
        info = _resolve(request, candidate, ("classify",))
        if info is not None:
            return info
    return None


@router.api_route(
    "/v1/{path:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,
)
async def not_served(request: Request, path: str) -> Response:
    """DeepStack's other routes (face, register, backup, ...): 404 in its shape; 405 on ours."""
    full = "/v1/" + path
    if full in SERVED or (full.startswith(_CUSTOM) and "/" not in full[len(_CUSTOM) :] and full != _CUSTOM):
        response = JSONResponse(
            {"success": False, "error": f"{request.method} is not allowed on {full}; use POST"},
            status_code=405,
            headers={"Allow": "POST"},
        )
        return response
    raise ds.NotServed(
        f"{full} is not served by this box; it serves /v1/vision/detection, /v1/vision/custom/{{model}}"
        " and /v1/vision/scene"
    )
