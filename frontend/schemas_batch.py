"""Frozen models of the batch endpoint and the WebSocket stream (requests, replies, OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from frontend.params import Params
from frontend.schemas import ClassScore, Detection, ImageSize, ModelRef, Timings

MAX_BATCH_IMAGES = 32


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BatchJSONItem(Params):
    image_b64: str = Field(..., description="the encoded image, base64 (empty: a 400 like any empty image)")


class BatchJSON(_Frozen):
    """What the OpenAPI schema shows; items are validated one by one so that a bad one fails alone."""

    images: list[BatchJSONItem] = Field(..., min_length=1, max_length=MAX_BATCH_IMAGES)


class BatchEnvelope(_Frozen):
    """The loose outer shape actually parsed: per-item problems become per-item errors."""

    images: list[Any] = Field(..., min_length=1)


class _Answer(BaseModel):
    """The fields of ``PredictResponse`` but its request id; extra ones (a raw model's tensors) pass."""

    model_config = ConfigDict(frozen=True, extra="allow")


class BatchItemResult(_Answer):
    index: int
    image: ImageSize
    detections: list[Detection] | None = None
    classes: list[ClassScore] | None = None
    timings: Timings
    batch_size: int = Field(..., description="how many images the engine ran together with this one")


class BatchItemError(_Frozen):
    index: int
    error: str
    detail: object


class BatchResponse(_Frozen):
    request_id: str
    model: ModelRef
    results: list[BatchItemResult | BatchItemError] = Field(..., description="one per image, in request order")


class StreamFrameJSON(Params):
    """A text frame of ``/ws/stream``."""

    frame_id: int | str | None = Field(None, description="echoed in the reply; the frame counter when absent")
    image_b64: str = Field(..., description="the encoded image, base64")


class StreamResult(_Answer):
    frame_id: int | str
    model: ModelRef
    image: ImageSize
    detections: list[Detection] | None = None
    classes: list[ClassScore] | None = None
    timings: Timings
    batch_size: int
    dropped: int = Field(..., description="frames of this connection replaced by newer ones so far")


class StreamError(_Frozen):
    frame_id: int | str | None
    error: str
    detail: object
    dropped: int
