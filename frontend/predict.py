"""The shared prediction path: parameters, decode, engine round trip, response in original pixels."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from frontend import imaging
from frontend.client import EngineClient
from frontend.schemas import (
    ClassScore,
    Detection,
    ImageSize,
    ModelRef,
    PredictJSON,
    PredictResponse,
    TensorData,
    Timings,
)
from frontend.settings import Settings
from ipc.errors import BadInput, InvalidParameter, UnsupportedMedia
from ipc.messages import ModelInfo, Tensor

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
_RAW_TYPES = {*RAW_TYPES, "image/jpg"}
_DATA_URL = re.compile(rb"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SPACE = re.compile(rb"\s+")
# Decoding runs off the event loop (a 50-megapixel PNG takes seconds to inflate; the loop must keep
# reading the engine's heartbeats meanwhile), one image at a time per worker process, as before: a
# per-process resource like OpenCV's thread count, hence module level.
_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")


class Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_detections: int | None = Field(None, ge=1, le=1000)
    timeout_s: float | None = Field(None, gt=0.0, allow_inf_nan=False)


@dataclass(frozen=True)
class Upload:
    data: bytes
    params: Params


def parse_params(raw: dict[str, str]) -> Params:
    try:
        return Params.model_validate({k: v for k, v in raw.items() if v != ""})
    except ValidationError as exc:
        detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise InvalidParameter(detail) from None  # type: ignore[arg-type]


def b64decode(text: str) -> bytes:
    """Strict base64, but line breaks and a ``data:image/...;base64,`` prefix are accepted."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise BadInput("image_b64 is not valid base64") from None
    raw = _SPACE.sub(b"", _DATA_URL.sub(b"", raw, count=1))
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("image_b64 is not valid base64") from None


def checked_query(request: Request) -> dict[str, str]:
    """The request's query parameters, refusing unknown ones and any Content-Encoding."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMedia(f"Content-Encoding {encoding!r} is not accepted; send the images as they are")
    query = dict(request.query_params)
    unknown = set(query) - set(Params.model_fields)
    if unknown:
        raise InvalidParameter(f"unknown query parameters: {sorted(unknown)}")
    return query


async def read_upload(request: Request, settings: Settings) -> Upload:
    """One image from multipart (field ``image``), JSON ``{image_b64, ...}`` or a raw body."""
    from frontend.body import read_limited

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query = checked_query(request)
    if ctype not in ("multipart/form-data", "application/json") and ctype not in _RAW_TYPES:
        if not ctype:
            raise UnsupportedMedia("a Content-Type is required (multipart/form-data, application/json or image/*)")
        raise UnsupportedMedia(f"unsupported Content-Type {ctype!r}")
    body = await read_limited(request, settings.max_body_bytes)
    if ctype == "multipart/form-data":
        request._body = body
        try:
            form = await request.form(max_files=1, max_fields=16, max_part_size=settings.max_body_bytes)
        except Exception as exc:
            raise BadInput(f"malformed multipart body: {exc}") from None
        try:
            image = form.get("image")
            if image is None or isinstance(image, str):
                raise InvalidParameter("multipart field 'image' (a file) is required")
            fields = {k: v for k, v in form.multi_items() if k != "image"}
            unknown = set(fields) - set(Params.model_fields)
            if unknown:
                raise InvalidParameter(f"unknown form fields: {sorted(unknown)}")
            if not all(isinstance(v, str) for v in fields.values()):
                raise InvalidParameter("only the field 'image' may be a file")
            data = await image.read()
            return Upload(data, parse_params({**query, **fields}))  # type: ignore[dict-item]
        finally:
            await form.close()  # large parts spill to temporary files
    if ctype == "application/json":
        try:
            payload = PredictJSON.model_validate_json(body)
        except ValidationError as exc:
            detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
            raise InvalidParameter(detail) from None  # type: ignore[arg-type]
        given = payload.model_dump(exclude={"image_b64"}, exclude_none=True)
        return Upload(b64decode(payload.image_b64), parse_params({**query, **given}))
    return Upload(body, parse_params(query))


async def run(
    client: EngineClient, settings: Settings, info: ModelInfo, upload: Upload, request_id: str
) -> PredictResponse:
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    img, width, height = await loop.run_in_executor(
        _DECODER, imaging.decode, upload.data, info.input, settings.max_pixels
    )
    geometry: list[imaging.Geometry] = []
    prepared: list[float] = []

    def fill(out: object) -> None:  # runs once a slot is ours: resize straight into it
        geometry.append(imaging.fit(img, width, height, info.input, out))  # type: ignore[arg-type]
        prepared.append(time.perf_counter())

    p = upload.params
    timeout = min(p.timeout_s or settings.request_timeout_s, settings.request_timeout_s)
    result = await client.infer(
        info,
        fill,
        req_id=request_id,
        timeout=timeout,
        confidence=-1.0 if p.confidence_threshold is None else p.confidence_threshold,
        max_detections=p.max_detections or 0,
    )
    geo = geometry[0]
    decode_ms = (prepared[0] - started) * 1000
    total_ms = (time.perf_counter() - started) * 1000
    detections = classes = None
    if info.task in ("ssd", "yolo"):
        detections = [
            Detection(
                label=d.label,
                class_id=d.class_id,
                confidence=round(d.score, 4),
                bbox=geo.to_original(d.x1, d.y1, d.x2, d.y2),
            )
            for d in result.detections
        ]
    elif info.task == "classify":
        classes = [ClassScore(label=c.label, class_id=c.class_id, confidence=round(c.score, 4)) for c in result.classes]
    return PredictResponse(
        request_id=request_id,
        model=ModelRef(name=result.model, version=result.version),
        image=ImageSize(width=width, height=height),
        detections=detections,
        classes=classes,
        tensors=[_tensor(t) for t in result.tensors] if info.task == "raw" else None,
        timings=Timings(
            decode_ms=round(decode_ms, 3),
            queue_ms=round(result.queue_ms, 3),
            inference_ms=round(result.inference_ms, 3),
            total_ms=round(total_ms, 3),
        ),
        batch_size=result.batch_size,
    )


def _tensor(t: Tensor) -> TensorData:
    values = np.frombuffer(t.data, dtype=np.dtype(t.dtype)).astype(np.float64, copy=False)
    return TensorData(name=t.name, dtype=t.dtype, shape=t.shape, data=values.tolist())
