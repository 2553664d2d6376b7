"""REST prediction routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from frontend import predict
from frontend.errors import request_id
from frontend.jsonresp import JSONResponse
from frontend.schemas import ErrorResponse, PredictResponse
from ipc.errors import ModelNotFound

router = APIRouter(tags=["predict"])

_PARAMS = (  # also accepted in the query string (a raw image body has no other place for them)
    ("confidence_threshold", {"type": "number", "minimum": 0, "maximum": 1}),
    ("max_detections", {"type": "integer", "minimum": 1, "maximum": 1000}),
    ("timeout_s", {"type": "number", "exclusiveMinimum": 0}),
)
_IMAGE_BODY = {
    "parameters": [{"name": n, "in": "query", "required": False, "schema": schema} for n, schema in _PARAMS],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                        "max_detections": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictJSON"}},
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in predict.RAW_TYPES},
        },
    },
}
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 422, 503, 504)}


async def _predict(request: Request, name: str, version: int | None) -> Response:
    state = request.app.state
    info = state.client.resolve(name, version)
    upload = await predict.read_upload(request, state.settings)
    result = await predict.run(state.client, state.settings, info, upload, request_id(request))
    state.observe_decode(result.timings.decode_ms / 1000)
    return JSONResponse(result.model_dump(mode="json", exclude_none=True))


@router.post("/api/v1/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY)
async def predict_default(request: Request) -> Response:
    """Detect (or classify) with the default model."""
    return await _predict(request, request.app.state.settings.default_model, None)


@router.post(
    "/api/v1/models/{name}/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY
)
async def predict_model(request: Request, name: str) -> Response:
    """Predict with the latest version of a named model."""
    return await _predict(request, name, None)


@router.post(
    "/api/v1/models/{name}/versions/{version}/predict",
    response_model=PredictResponse,
    responses=_ERRORS,
    openapi_extra=_IMAGE_BODY,
)
async def predict_version(request: Request, name: str, version: int) -> Response:
    """Predict with one version of a named model."""
    if version < 1:
        raise ModelNotFound(f"model {name!r} has no version {version}")
    return await _predict(request, name, version)
