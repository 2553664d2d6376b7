"""Frozen request and response models (they also make the OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from frontend.params import Params


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PredictJSON(Params):
    image_b64: str = Field(..., description="the encoded image, base64 (empty: a 400 like any empty image)")


class Detection(_Frozen):
    label: str
    class_id: int
    confidence: float
    bbox: list[float] = Field(..., description="[x1, y1, x2, y2] in original image pixels")


class ClassScore(_Frozen):
    label: str
    class_id: int
    confidence: float


class Timings(_Frozen):
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float


class ModelRef(_Frozen):
    name: str
    version: int


class ImageSize(_Frozen):
    width: int
    height: int


class TensorData(_Frozen):
    name: str
    dtype: str
    shape: list[int] = Field(..., description="without the batch dimension")
    data: list[float] = Field(..., description="the values, flattened in row-major order")


class PredictResponse(_Frozen):
    request_id: str
    model: ModelRef
    image: ImageSize
    detections: list[Detection] | None = None
    classes: list[ClassScore] | None = None
    tensors: list[TensorData] | None = Field(None, description='the output tensors of a task = "raw" model')
    timings: Timings
    batch_size: int


class ErrorResponse(_Frozen):
    error: str
    detail: object
    request_id: str


class TensorSpec(_Frozen):
    name: str
    datatype: str
    shape: list[int]


class ModelVersionInfo(_Frozen):
    name: str
    version: int
    task: str
    input_width: int
    input_height: int
    resize: str
    labels_count: int
    max_batch_size: int
    max_queue_delay_ms: float
    queue_limit: int
    default_confidence: float
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ModelSummary(_Frozen):
    name: str
    versions: list[int]
    latest: int
    task: str
    details: list[ModelVersionInfo]
    providers: list[str]


class ModelList(_Frozen):
    models: list[ModelSummary]
    failed: dict[str, str]
