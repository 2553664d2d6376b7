"""REST prediction routes: parse the body into an ImageRequest, render the service's result."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from frontend import predict
from frontend.errors import request_id
from frontend.jsonresp import JSONResponse
from frontend.openapi import image_body
from frontend.routes.model_routes import add_model_routes
from frontend.schemas import PredictJSON, PredictResponse
from frontend.service import ImageRequest, ImageService

router = APIRouter(tags=["predict"])

_IMAGE_BODY = image_body("image", PredictJSON, raw_types=predict.RAW_TYPES)


async def _predict(request: Request, name: str, version: int | None) -> Response:
    service: ImageService = request.app.state.service
    service.model(name, version)  # 404 / 503 before the body is read
    upload = await predict.read_upload(request, request.app.state.settings)
    # ``version``, not info.version: "latest" is resolved again when the image goes to the engine, so a
    # version swap while the body is read never answers 404 (engine/lifecycle.py).
    req = ImageRequest(name, version, upload.params, request_id(request), time.monotonic(), image=upload.data)
    result = await service.predict(req)
    return JSONResponse(result.response().model_dump(mode="json", exclude_none=True))


add_model_routes(
    router,
    "predict",
    _predict,
    response_model=PredictResponse,
    openapi_extra=_IMAGE_BODY,
    what="Detect (or classify) one image",
)


def route(path: str) -> APIRoute:
    """The POST route of ``path`` (frontend/fastpath.py labels its metrics with it)."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.path == path and "POST" in (r.methods or ()))
