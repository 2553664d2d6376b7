"""Reading REST prediction bodies: multipart, JSON base64 or a raw image, under the body limits.

The parsing of one protocol only; the per-image work is frontend/service.py's. The batch route
shares ``content_type``, ``checked_query`` and ``read_form`` (so "too many files" is one answer).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from frontend.body import read_limited
from frontend.params import PARAM_NAMES, Params, b64decode, check_names, invalid, merge, parse_params
from frontend.schemas import PredictJSON
from frontend.settings import Settings
from ipc.errors import BadInput, InvalidParameter, PayloadTooLarge, UnsupportedMedia

__all__ = ["RAW_ACCEPTED", "RAW_TYPES", "Params", "Upload", "b64decode", "checked_query", "parse_params", "read_upload"]

# Raw bodies accepted as an image (the OpenAPI schema documents these too).
RAW_TYPES = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/gif",
    "image/tiff",
    "application/octet-stream",
)
RAW_ACCEPTED = frozenset({*RAW_TYPES, "image/jpg"})  # documented, and the common misspelling
_FORM_FIELDS = 16


@dataclass(frozen=True)
class Upload:
    data: bytes
    params: Params


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def checked_query(request: Request) -> dict[str, str]:
    """The request's query parameters, refusing unknown ones and any Content-Encoding."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMedia(f"Content-Encoding {encoding!r} is not accepted; send the images as they are")
    query = dict(request.query_params)
    check_names(query, PARAM_NAMES, "query parameters")
    return query


async def read_form(request: Request, body: bytes, settings: Settings, files: str, max_files: int) -> FormData:
    """The multipart form of ``body``: at most ``max_files`` files (413 past it), text fields checked."""
    request._body = body  # let Starlette parse what we read under the limit
    try:
        form = await request.form(max_files=max_files, max_fields=_FORM_FIELDS, max_part_size=settings.max_body_bytes)
    except HTTPException as exc:  # Starlette's wrapping of python-multipart's errors
        if str(exc.detail).startswith("Too many files"):
            raise PayloadTooLarge(f"at most {max_files} file(s) in field '{files}' per request") from None
        raise BadInput(f"malformed multipart body: {exc.detail}") from None
    except Exception as exc:  # python-multipart raises several types
        raise BadInput(f"malformed multipart body: {exc}") from None
    fields = [(k, v) for k, v in form.multi_items() if k != files]
    try:
        check_names((k for k, _ in fields), PARAM_NAMES, "form fields")
        if any(not isinstance(v, str) for _, v in fields):
            raise InvalidParameter(f"only the field '{files}' may hold files")
    except BaseException:
        await form.close()
        raise
    return form


def form_params(form: FormData, files: str, query: dict[str, str]) -> Params:
    texts = {k: v for k, v in form.multi_items() if k != files and isinstance(v, str)}
    return parse_params({**query, **texts})


async def read_upload(request: Request, settings: Settings) -> Upload:
    """One image from multipart (field ``image``), JSON ``{image_b64, ...}`` or a raw body."""
    ctype = content_type(request)
    query = checked_query(request)
    if ctype not in ("multipart/form-data", "application/json") and ctype not in RAW_ACCEPTED:
        if not ctype:
            raise UnsupportedMedia("a Content-Type is required (multipart/form-data, application/json or image/*)")
        raise UnsupportedMedia(f"unsupported Content-Type {ctype!r}")
    body = await read_limited(request, settings.max_body_bytes)
    if ctype == "multipart/form-data":
        form = await read_form(request, body, settings, "image", 1)
        try:
            image = form.get("image")
            if not isinstance(image, UploadFile):
                raise InvalidParameter("multipart field 'image' (a file) is required")
            return Upload(await image.read(), form_params(form, "image", query))
        finally:
            await form.close()  # large parts spill to temporary files
    if ctype == "application/json":
        try:
            payload = PredictJSON.model_validate_json(body)
        except ValidationError as exc:
            raise invalid(exc) from None
        return Upload(b64decode(payload.image_b64), merge(parse_params(query), payload))
    return Upload(body, parse_params(query))
