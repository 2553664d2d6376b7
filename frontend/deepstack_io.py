"""DeepStack's wire format: the multipart form in, ``{"success": ...}`` answers out.

DeepStack (and CodeProject.AI, which kept its API) take a multipart form with the file field
``image`` and the text fields ``min_confidence`` and ``api_key``, and answer
``{"success": true, "predictions": [{label, confidence, x_min, y_min, x_max, y_max}]}`` with integer
pixel coordinates of the original image, or ``{"success": false, "error": "..."}`` with the status
codes of DeepStack's server (``server/middlewares`` of johnolafenwa/DeepStack): 400 for a missing
image or a bad ``min_confidence``, 401 "Incorrect api key", 403 "... endpoint not activated", 404
for what is not served, 500 for a server error. ringserve's own conditions keep their codes (408,
413, 415, 503 + Retry-After, 504), in the same shape.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

from loguru import logger
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import UploadFile
from starlette.requests import Request

from frontend.body import read_limited
from frontend.errors import STATUS, request_id
from frontend.jsonresp import JSONResponse
from frontend.settings import Settings
from ipc.errors import BadInput, InvalidParameter, RingserveError, Unauthorized, UnsupportedMedia

DEFAULT_MIN_CONFIDENCE = 0.40  # DeepStack's server default for /v1/vision/detection
NO_IMAGE = "No valid image file found"
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# DeepStack answers 400 where ringserve's REST answers 422 (its middleware: "Invalid value for
# min_confidence"); everything else keeps the status of frontend/errors.py.
_STATUS = {**STATUS, InvalidParameter: 400}


class NotActivated(RingserveError):
    """DeepStack's 403 for an endpoint whose model is not served ("Scene endpoint not activated")."""

    reason = "not_activated"


class NotServed(RingserveError):
    """DeepStack's 404: a route or custom model this box does not serve."""

    reason = "not_found"


_STATUS.update({NotActivated: 403, NotServed: 404})


# --------------------------------------------------------------------------- schemas (OpenAPI)
class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class DSPrediction(_Frozen):
    label: str
    confidence: float
    x_min: int
    y_min: int
    x_max: int
    y_max: int


class DSDetectionResponse(_Frozen):
    success: bool
    predictions: list[DSPrediction]
    count: int  # CodeProject.AI's fields, beside DeepStack's
    inferenceMs: int
    processMs: int


class DSSceneResponse(_Frozen):
    success: bool
    label: str
    confidence: float


class DSError(_Frozen):
    success: bool
    error: str


# --------------------------------------------------------------------------- the request
@dataclass(frozen=True)
class DSForm:
    image: bytes | None
    min_confidence: str  # as sent; "" when absent


async def read_form(request: Request, settings: Settings) -> DSForm:
    """The body under the REST limits, the API key checked (form field or headers), the fields kept."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMedia(f"Content-Encoding {encoding!r} is not accepted; send the image as it is")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_limited(request, settings.max_body_bytes)
    if ctype not in _FORM_TYPES:
        check_key(request, settings, None)
        raise BadInput(NO_IMAGE)
    request._body = body  # parsed from the bytes already read under the limits
    try:
        form = await request.form(max_files=4, max_fields=32, max_part_size=settings.max_body_bytes)
    except Exception as exc:
        raise BadInput(f"malformed multipart body: {exc}") from None
    try:
        key = form.get("api_key")
        check_key(request, settings, key if isinstance(key, str) else None)
        image = form.get("image")
        data = await image.read() if isinstance(image, UploadFile) else None
        confidence = form.get("min_confidence")
        return DSForm(data or None, confidence if isinstance(confidence, str) else "")
    finally:
        await form.close()  # large parts spill to temporary files


def check_key(request: Request, settings: Settings, form_key: str | None) -> None:
    """The key as DeepStack sends it (form field ``api_key``) or as REST does (headers)."""
    if not settings.api_key:
        return
    expected = settings.api_key.encode()
    header = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not header and auth[:7].lower() == "bearer ":
        header = auth[7:].strip()
    given = [k.encode() for k in (header, form_key) if k]
    # compare every candidate (no short cut), so the timing does not say which one was tried
    if not sum(hmac.compare_digest(k, expected) for k in given):
        raise Unauthorized("Incorrect api key")


def min_confidence(raw: str) -> float:
    if raw.strip() == "":
        return DEFAULT_MIN_CONFIDENCE
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter("Invalid value for min_confidence") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidParameter("Invalid value for min_confidence")
    if value > 1.0:
        raise InvalidParameter("min_confidence cannot be greater than 1")
    return value


# --------------------------------------------------------------------------- the answers
def error_response(request: Request, exc: RingserveError) -> JSONResponse:
    """``{"success": false, "error": ...}``, counted and logged like every other error."""
    status = _STATUS.get(type(exc), 500)
    count = getattr(request.app.state, "count_error", None)
    if count is not None:
        count(exc.reason)
    rid = request_id(request)
    log = logger.bind(request_id=rid)
    (log.error if status >= 500 and status != 503 else log.info)(
        "{} {} -> {} {}: {}", request.method, request.url.path, status, exc.reason, exc.detail
    )
    headers = {"X-Request-ID": rid}
    if status == 503:
        headers["Retry-After"] = "1"
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse({"success": False, "error": message}, status_code=status, headers=headers)


def internal_error(request: Request) -> JSONResponse:
    logger.bind(request_id=request_id(request)).exception("unhandled error")
    return JSONResponse({"success": False, "error": "error occured on the server"}, status_code=500)
