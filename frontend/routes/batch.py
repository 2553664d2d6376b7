"""``POST /api/v1/predict/batch``: up to 32 images in one request, answered in order.

Every image goes to the engine at once (so the batcher can run them together); a bad image gets
its error in its place and the request is still a 200. A worker lets batch requests hold at most
half of its ring slots at a time: the rest of a batch waits for a slot instead of failing with
``overload``, and single requests and streams keep the other half.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from loguru import logger
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import Response

from frontend import predict
from frontend.body import read_limited
from frontend.errors import request_id
from frontend.jsonresp import JSONResponse
from frontend.predict import Params, Upload
from frontend.schemas import ErrorResponse, ModelRef
from frontend.schemas_batch import (
    MAX_BATCH_IMAGES,
    BatchEnvelope,
    BatchItemError,
    BatchItemResult,
    BatchJSON,
    BatchJSONItem,
    BatchResponse,
)
from frontend.settings import Settings
from ipc.errors import (
    BadInput,
    InternalError,
    InvalidParameter,
    ModelNotFound,
    PayloadTooLarge,
    RingserveError,
    UnsupportedMedia,
)

router = APIRouter(tags=["predict"])


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``$defs`` inlined, so it can sit inside ``openapi_extra``."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)  # type: ignore[no-any-return]


_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                            "maxItems": MAX_BATCH_IMAGES,
                            "description": "repeat the field once per image",
                        },
                        "confidence_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                        "max_detections": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
                    },
                }
            },
            "application/json": {"schema": _inline_refs(BatchJSON.model_json_schema())},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 415, 422, 503, 504)
}


@dataclass(frozen=True)
class Item:
    """One image of the batch, or why it cannot run."""

    upload: Upload | None = None
    error: RingserveError | None = None


async def read_batch(request: Request, settings: Settings) -> list[Item]:
    """The images of a multipart (repeated field ``images``) or JSON (``{images: [...]}``) body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        what = f"unsupported Content-Type {ctype!r}" if ctype else "a Content-Type is required"
        raise UnsupportedMedia(f"{what} (multipart/form-data or application/json)")
    query = predict.checked_query(request)
    body = await read_limited(request, settings.max_body_bytes)
    if ctype == "multipart/form-data":
        return await _read_multipart(request, body, query, settings)
    return _read_json(body, predict.parse_params(query))


async def _read_multipart(request: Request, body: bytes, query: dict[str, str], settings: Settings) -> list[Item]:
    request._body = body  # let Starlette parse what we read under the limit
    try:
        form = await request.form(max_files=MAX_BATCH_IMAGES, max_fields=16, max_part_size=settings.max_body_bytes)
    except HTTPException as exc:  # Starlette's wrapping of python-multipart's errors
        if str(exc.detail).startswith("Too many files"):
            raise PayloadTooLarge(f"a batch holds at most {MAX_BATCH_IMAGES} images") from None
        raise BadInput(f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # python-multipart raises several types
        raise BadInput(f"malformed multipart body: {exc}") from None
    try:
        images = form.getlist("images")
        if not images:
            raise InvalidParameter("multipart field 'images' (one file per image, repeated) is required")
        if len(images) > MAX_BATCH_IMAGES:
            raise PayloadTooLarge(f"{len(images)} images; a batch holds at most {MAX_BATCH_IMAGES}")
        fields = {k: v for k, v in form.multi_items() if k != "images"}
        unknown = set(fields) - set(Params.model_fields)
        if unknown:
            raise InvalidParameter(f"unknown form fields: {sorted(unknown)}")
        texts = {k: v for k, v in fields.items() if isinstance(v, str)}
        if len(texts) < len(fields):
            raise InvalidParameter("only the field 'images' may hold files")
        params = predict.parse_params({**query, **texts})
        items = []
        for i, image in enumerate(images):
            if isinstance(image, UploadFile):
                items.append(Item(Upload(await image.read(), params)))
            else:
                items.append(Item(error=InvalidParameter(f"images[{i}] is a text field, not a file")))
        return items
    finally:
        await form.close()


def _read_json(body: bytes, defaults: Params) -> list[Item]:
    try:
        envelope = BatchEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidParameter(_detail(exc)) from None  # type: ignore[arg-type]
    if len(envelope.images) > MAX_BATCH_IMAGES:
        raise PayloadTooLarge(f"{len(envelope.images)} images; a batch holds at most {MAX_BATCH_IMAGES}")
    items = []
    for raw in envelope.images:
        try:
            entry = BatchJSONItem.model_validate(raw)
            data = predict.b64decode(entry.image_b64)
        except ValidationError as exc:
            items.append(Item(error=InvalidParameter(_detail(exc))))  # type: ignore[arg-type]
            continue
        except RingserveError as exc:
            items.append(Item(error=exc))
            continue
        given = entry.model_dump(exclude={"image_b64"}, exclude_none=True)
        params = defaults.model_copy(update=given)  # validated by BatchJSONItem
        items.append(Item(Upload(data, params)))
    return items


def _detail(exc: ValidationError) -> list[dict[str, object]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]


def _gate(app: FastAPI, settings: Settings) -> asyncio.Semaphore:
    """The worker's limit on ring slots held by batch requests together (half the ring)."""
    gate: asyncio.Semaphore | None = getattr(app.state, "batch_gate", None)
    if gate is None:
        gate = app.state.batch_gate = asyncio.Semaphore(max(1, settings.ring_slots // 2))
    return gate


async def _predict_batch(request: Request, name: str, version: int | None) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    info = state.client.resolve(name, version)
    items = await read_batch(request, settings)
    rid = request_id(request)
    gate = _gate(request.app, settings)

    async def one(index: int, item: Item) -> BatchItemResult | BatchItemError:
        if item.upload is None:
            assert item.error is not None
            return BatchItemError(index=index, error=item.error.reason, detail=item.error.detail)
        try:
            async with gate:
                r = await predict.run(state.client, settings, info, item.upload, f"{rid}.{index}")
        except RingserveError as exc:
            return BatchItemError(index=index, error=exc.reason, detail=exc.detail)
        except Exception:  # one image's bug must not lose the other answers
            logger.bind(request_id=rid).exception("batch image {} failed", index)
            return BatchItemError(index=index, error=InternalError.reason, detail="internal server error")
        answer = r.model_dump(mode="json", exclude_none=True, exclude={"request_id", "model"})
        return BatchItemResult.model_validate({"index": index, **answer})

    results = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
    _observe(state, results)
    failed = sum(isinstance(r, BatchItemError) for r in results)
    if failed:
        logger.bind(request_id=rid).info("batch of {}: {} images failed", len(results), failed)
    response = BatchResponse(request_id=rid, model=ModelRef(name=info.name, version=info.version), results=results)
    return JSONResponse(response.model_dump(mode="json", exclude_none=True))


def _observe(state: Any, results: list[BatchItemResult | BatchItemError]) -> None:
    """Per-image metrics, when the app has them (errors by reason, decode time)."""
    count_error = getattr(state, "count_error", None)
    observe_decode = getattr(state, "observe_decode", None)
    for r in results:
        if isinstance(r, BatchItemError):
            if count_error is not None:
                count_error(r.error)
        elif observe_decode is not None:
            observe_decode(r.timings.decode_ms / 1000)


@router.post("/api/v1/predict/batch", response_model=BatchResponse, responses=_ERRORS, openapi_extra=_BATCH_BODY)
async def predict_batch_default(request: Request) -> Response:
    """Up to 32 images with the default model, results (or per-image errors) in request order."""
    return await _predict_batch(request, request.app.state.settings.default_model, None)


@router.post(
    "/api/v1/models/{name}/predict/batch",
    response_model=BatchResponse,
    responses=_ERRORS,
    openapi_extra=_BATCH_BODY,
)
async def predict_batch_model(request: Request, name: str) -> Response:
    """Up to 32 images with the latest version of a named model."""
    return await _predict_batch(request, name, None)


@router.post(
    "/api/v1/models/{name}/versions/{version}/predict/batch",
    response_model=BatchResponse,
    responses=_ERRORS,
    openapi_extra=_BATCH_BODY,
)
async def predict_batch_version(request: Request, name: str, version: int) -> Response:
    """Up to 32 images with one version of a named model."""
    if version < 1:
        raise ModelNotFound(f"model {name!r} has no version {version}")
    return await _predict_batch(request, name, version)
