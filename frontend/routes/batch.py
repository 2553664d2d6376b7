"""``POST /api/v1/predict/batch``: up to 32 images in one request, answered in order.

Every image goes to the engine at once (so the batcher can run them together); a bad image gets
its error in its place and the request is still a 200. A worker lets batch requests hold at most
half of its ring slots at a time (the service's ``predict_batch``): the rest of a batch waits for
a slot instead of failing with ``overload``, and single requests and streams keep the other half.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from loguru import logger
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.responses import Response

from frontend import predict
from frontend.body import read_limited
from frontend.errors import request_id
from frontend.jsonresp import JSONResponse
from frontend.openapi import image_body
from frontend.params import Params, b64decode, invalid, merge, parse_params
from frontend.routes.model_routes import add_model_routes
from frontend.schemas import ModelRef
from frontend.schemas_batch import (
    MAX_BATCH_IMAGES,
    BatchEnvelope,
    BatchItemError,
    BatchItemResult,
    BatchJSON,
    BatchJSONItem,
    BatchResponse,
)
from frontend.service import ImageRequest, ImageResult, ImageService
from frontend.settings import Settings
from ipc.errors import InvalidParameter, PayloadTooLarge, RingserveError, UnsupportedMedia

router = APIRouter(tags=["predict"])

_BATCH_BODY = image_body("images", BatchJSON, max_files=MAX_BATCH_IMAGES)
Item = tuple[bytes, Params] | RingserveError  # one image of the batch, or why it cannot run


async def read_batch(request: Request, settings: Settings) -> list[Item]:
    """The images of a multipart (repeated field ``images``) or JSON (``{images: [...]}``) body."""
    ctype = predict.content_type(request)
    if ctype not in ("multipart/form-data", "application/json"):
        what = f"unsupported Content-Type {ctype!r}" if ctype else "a Content-Type is required"
        raise UnsupportedMedia(f"{what} (multipart/form-data or application/json)")
    query = predict.checked_query(request)
    body = await read_limited(request, settings.max_body_bytes)
    if ctype == "multipart/form-data":
        return await _read_multipart(request, body, query, settings)
    return _read_json(body, parse_params(query))


async def _read_multipart(request: Request, body: bytes, query: dict[str, str], settings: Settings) -> list[Item]:
    form = await predict.read_form(request, body, settings, "images", MAX_BATCH_IMAGES)
    try:
        images = form.getlist("images")
        if not images:
            raise InvalidParameter("multipart field 'images' (one file per image, repeated) is required")
        params = predict.form_params(form, "images", query)
        items: list[Item] = []
        for i, image in enumerate(images):
            if isinstance(image, UploadFile):
                items.append((await image.read(), params))
            else:
                items.append(InvalidParameter(f"images[{i}] is a text field, not a file"))
        return items
    finally:
        await form.close()


def _read_json(body: bytes, defaults: Params) -> list[Item]:
    try:
        envelope = BatchEnvelope.model_validate_json(body)
    except ValidationError as exc:
        raise invalid(exc) from None
    if len(envelope.images) > MAX_BATCH_IMAGES:
        raise PayloadTooLarge(f"at most {MAX_BATCH_IMAGES} file(s) in field 'images' per request")
    items: list[Item] = []
    for raw in envelope.images:
        try:
            entry = BatchJSONItem.model_validate(raw)
            items.append((b64decode(entry.image_b64), merge(defaults, entry)))
        except ValidationError as exc:
            items.append(invalid(exc))
        except RingserveError as exc:
            items.append(exc)
    return items


async def _predict_batch(request: Request, name: str, version: int | None) -> Response:
    service: ImageService = request.app.state.service
    info = service.model(name, version)  # 404 / 503 before the body is read
    items = await read_batch(request, request.app.state.settings)
    rid, accepted = request_id(request), time.monotonic()
    reqs = {
        # ``version``, not info.version: "latest" is resolved when each image goes to the engine, so
        # a version swap while the body is read or the images decode is not a 404 (as REST single).
        i: ImageRequest(name, version, item[1], f"{rid}.{i}", accepted, image=item[0])
        for i, item in enumerate(items)
        if not isinstance(item, RingserveError)
    }
    answers = dict(zip(reqs, await service.predict_batch(list(reqs.values())), strict=True))
    results = [_render(i, answers.get(i, item)) for i, item in enumerate(items)]
    _count_errors(request.app.state, results)
    failed = sum(isinstance(r, BatchItemError) for r in results)
    if failed:
        logger.bind(request_id=rid).info("batch of {}: {} images failed", len(results), failed)
    ran = next((a for a in answers.values() if isinstance(a, ImageResult)), None)
    model = ModelRef(name=info.name, version=ran.version if ran else info.version)
    response = BatchResponse(request_id=rid, model=model, results=results)
    return JSONResponse(response.model_dump(mode="json", exclude_none=True))


def _render(index: int, answer: object) -> BatchItemResult | BatchItemError:
    if isinstance(answer, ImageResult):
        body = answer.response().model_dump(mode="json", exclude_none=True, exclude={"request_id", "model"})
        return BatchItemResult.model_validate({"index": index, **body})
    assert isinstance(answer, RingserveError)
    return BatchItemError(index=index, error=answer.reason, detail=answer.detail)


def _count_errors(state: Any, results: list[BatchItemResult | BatchItemError]) -> None:
    count_error = getattr(state, "count_error", None)
    for r in results:
        if isinstance(r, BatchItemError) and count_error is not None:
            count_error(r.error)


add_model_routes(
    router,
    "predict/batch",
    _predict_batch,
    response_model=BatchResponse,
    openapi_extra=_BATCH_BODY,
    what="Up to 32 images, results (or per-image errors) in request order,",
)
