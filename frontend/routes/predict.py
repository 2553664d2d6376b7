"""REST prediction routes: parse the body into an ImageRequest, render the service's result."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from starlette.responses import Response

from frontend import predict
from frontend.errors import request_id
from frontend.jsonresp import JSONResponse
from frontend.openapi import ERRORS, image_body
from frontend.schemas import PredictJSON, PredictResponse
from frontend.service import ImageRequest, ImageService
from ipc.errors import ModelNotFound

router = APIRouter(tags=["predict"])

_IMAGE_BODY = image_body("image", PredictJSON, raw_types=predict.RAW_TYPES)


async def _predict(request: Request, name: str, version: int | None) -> Response:
    service: ImageService = request.app.state.service
    info = service.model(name, version)  # 404 / 503 before the body is read
    upload = await predict.read_upload(request, request.app.state.settings)
    req = ImageRequest(name, info.version, upload.params, request_id(request), time.monotonic(), image=upload.data)
    result = await service.predict(req)
    return JSONResponse(result.response().model_dump(mode="json", exclude_none=True))


@router.post("/api/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=_IMAGE_BODY)
async def predict_default(request: Request) -> Response:
    """Detect (or classify) with the default model."""
    return await _predict(request, request.app.state.settings.default_model, None)


@router.post(
    "/api/v1/models/{name}/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=_IMAGE_BODY
)
async def predict_model(request: Request, name: str) -> Response:
    """Predict with the latest version of a named model."""
    return await _predict(request, name, None)


@router.post(
    "/api/v1/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    responses=ERRORS,
    openapi_extra=_IMAGE_BODY,
)
async def predict_version(request: Request, name: str, version: int) -> Response:
    """Predict with one version of a named model."""
    if version < 1:
        raise ModelNotFound(f"model {name!r} has no version {version}")
    return await _predict(request, name, version)
