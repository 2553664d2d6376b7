"""The one per-image path that every protocol (REST, batch, WebSocket, V2, DeepStack, gRPC) calls.

Interface (stable; an adapter parses its protocol into ``ImageRequest``s and renders the
``ImageResult``s, and never touches the ring or the engine client)::

    service: ImageService = app.state.service       # one per worker, built in the app's lifespan
    info = service.model(name, version)              # ModelInfo (version None: the latest)
    result = await service.predict(request)          # ImageResult, or a typed ipc.errors exception
    results = await service.predict_batch(requests)  # ImageResult | RingserveError per image, in order

    ImageRequest(model, version, params, request_id, accepted, image=b"..." | pixels=array, raw=False)
      model, version   the model name and version (None: the latest version)
      params           frontend.params.Params: confidence_threshold, max_detections, timeout_s
      request_id       logged by both processes (a batch's images: "<id>.<index>")
      accepted         time.monotonic() when the request was accepted: the deadline base (HTTP:
                       its body has arrived, BODY_TIMEOUT_S bounds the upload; WebSocket: the frame)
      image            the encoded image (JPEG, PNG, WebP, BMP, GIF, TIFF)
      pixels           or RGB uint8 pixels [H, W, 3] (V2 UINT8 tensors): copied into the slot when
                       they have the model's input size, resized like a decoded image otherwise
      raw              the engine also sends the raw output tensors (V2)

    ImageResult: model, version, task, width, height (the original image), detections (label,
      class_id, confidence, bbox [x1, y1, x2, y2] in original pixels, by confidence descending),
      classes, tensors (raw outputs), timings, batch_size; ``response()`` is the REST
      PredictResponse.

What ``predict`` does, once for every protocol: resolve the model; the deadline (the request's
``timeout_s``, at most REQUEST_TIMEOUT_S, counted from ``accepted``); the decode, in the worker's
bounded decode queue off the event loop (QueueFull when full, DeadlineExceeded without decoding
when the deadline passes in the queue); the slot lease and the engine call; the boxes in original
pixels. Errors are the typed exceptions of ipc/errors.py (BadInput, PayloadTooLarge, ModelNotFound,
EngineUnavailable, QueueFull, DeadlineExceeded...), which each adapter maps to its own statuses.
``predict_batch`` runs the images together (so the engine batches them) while the batches of one
worker hold at most half of its ring slots, and returns each image's result or error in its place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from loguru import logger

from frontend import imaging
from frontend.client import EngineClient
from frontend.decode_pool import DecodePool
from frontend.params import Params
from frontend.schemas import ClassScore, Detection, ImageSize, ModelRef, PredictResponse, TensorData, Timings
from frontend.settings import Settings
from ipc import messages as m
from ipc.errors import BadInput, DeadlineExceeded, InternalError, RingserveError


@dataclass(frozen=True)
class ImageRequest:
    model: str
    version: int | None
    params: Params
    request_id: str
    accepted: float  # time.monotonic() at acceptance
    image: bytes = b""
    pixels: np.ndarray | None = field(default=None, repr=False)
    raw: bool = False


@dataclass(frozen=True)
class ImageResult:
    request_id: str
    model: str
    version: int
    task: str
    width: int
    height: int
    detections: tuple[Detection, ...]
    classes: tuple[ClassScore, ...]
    tensors: tuple[m.Tensor, ...]
    timings: Timings
    batch_size: int

    def response(self) -> PredictResponse:
        """The REST answer: detections for detectors, classes for classifiers, tensors for raw models."""
        return PredictResponse(
            request_id=self.request_id,
            model=ModelRef(name=self.model, version=self.version),
            image=ImageSize(width=self.width, height=self.height),
            detections=list(self.detections) if self.task in ("ssd", "yolo") else None,
            classes=list(self.classes) if self.task == "classify" else None,
            tensors=[_tensor(t) for t in self.tensors] if self.task == "raw" else None,
            timings=self.timings,
            batch_size=self.batch_size,
        )


@dataclass
class _Prepared:
    """What the decode step hands to the slot fill."""

    img: np.ndarray
    width: int
    height: int
    exact: bool  # already the model's input size: copied, not resized


class ImageService:
    def __init__(
        self,
        client: EngineClient,
        settings: Settings,
        observe_decode: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.decoder = DecodePool(settings.decode_queue_images, settings.decode_queue_bytes)
        self._observe_decode = observe_decode
        self._batch_gate = asyncio.Semaphore(max(1, settings.ring_slots // 2))

    def model(self, name: str, version: int | None = None) -> m.ModelInfo:
        return self.client.resolve(name, version)

    def deadline(self, req: ImageRequest) -> float:
        limit = self.settings.request_timeout_s
        return req.accepted + min(req.params.timeout_s or limit, limit)

    async def predict(self, req: ImageRequest, *, grouped: bool = False) -> ImageResult:
        """One image. ``grouped``: it is one of several images of a request, sent together, so the
        engine's batcher may wait for its company (a lone request never waits)."""
        started = time.perf_counter()
        info = self.model(req.model, req.version)
        deadline = self.deadline(req)
        # Held only until it is in the slot: a worker's requests wait for the engine far longer than
        # they take to decode, and their decoded pixels (up to 0.9 MB each) would wait with them.
        pending = [await self._prepare(req, info, deadline)]
        if self._observe_decode is not None and req.pixels is None:
            self._observe_decode(time.perf_counter() - started)  # every decoded image, answered or not
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed while the image was decoded")
        geometry: list[imaging.Geometry] = []
        filled: list[float] = []

        def fill(out: np.ndarray) -> None:  # runs once a slot is ours: resize straight into it
            prepared = pending.pop()
            if prepared.exact:
                np.copyto(out, prepared.img)
                geometry.append(imaging.Geometry(prepared.width, prepared.height, 1.0, 1.0, 0.0, 0.0))
            else:
                geometry.append(imaging.fit(prepared.img, prepared.width, prepared.height, info.input, out))
            filled.append(time.perf_counter())

        p = req.params
        result = await self.client.infer(
            info,
            fill,
            req_id=req.request_id,
            timeout=remaining,
            confidence=-1.0 if p.confidence_threshold is None else p.confidence_threshold,
            max_detections=p.max_detections or 0,
            raw=req.raw,
            grouped=grouped,
        )
        timings = Timings(
            decode_ms=round((filled[0] - started) * 1000, 3),
            queue_ms=round(result.queue_ms, 3),
            inference_ms=round(result.inference_ms, 3),
            total_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return _render(req.request_id, info, result, geometry[0], timings)

    async def _prepare(self, req: ImageRequest, info: m.ModelInfo, deadline: float) -> _Prepared:
        if req.pixels is not None:
            return _pixels(req.pixels, info, self.settings.max_pixels)
        data, spec, limit = req.image, info.input, self.settings.max_pixels
        if not data:
            raise BadInput("empty image")
        img, width, height = await self.decoder.run(lambda: imaging.decode(data, spec, limit), len(data), deadline)
        return _Prepared(img, width, height, exact=False)

    async def predict_batch(self, reqs: Sequence[ImageRequest]) -> list[ImageResult | RingserveError]:
        """Every image at once (the engine batches them), each image's result or error in its place."""

        async def one(req: ImageRequest) -> ImageResult | RingserveError:
            try:
                async with self._batch_gate:
                    return await self.predict(req, grouped=len(reqs) > 1)
            except RingserveError as exc:
                return exc
            except Exception:  # one image's bug must not lose the other answers
                logger.bind(request_id=req.request_id).exception("image of a batch failed")
                return InternalError("internal server error")

        return list(await asyncio.gather(*(one(r) for r in reqs)))

    def close(self) -> None:
        self.decoder.close()


def _pixels(pixels: np.ndarray, info: m.ModelInfo, max_pixels: int) -> _Prepared:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise BadInput(f"pixels must be uint8 [H, W, 3], not {pixels.dtype} {list(pixels.shape)}")
    height, width = pixels.shape[:2]
    imaging.check_pixels(width, height, max_pixels)
    exact = (height, width) == (info.input.height, info.input.width)
    return _Prepared(pixels, width, height, exact)


def _render(request_id: str, info: m.ModelInfo, r: m.Result, geo: imaging.Geometry, timings: Timings) -> ImageResult:
    detections = sorted(
        (
            Detection(
                label=d.label,
                class_id=d.class_id,
                confidence=round(d.score, 4),
                bbox=geo.to_original(d.x1, d.y1, d.x2, d.y2),
            )
            for d in r.detections
        ),
        key=lambda d: d.confidence,
        reverse=True,
    )
    classes = sorted(
        (ClassScore(label=c.label, class_id=c.class_id, confidence=round(c.score, 4)) for c in r.classes),
        key=lambda c: c.confidence,
        reverse=True,
    )
    return ImageResult(
        request_id=request_id,
        model=r.model,
        version=r.version,
        task=info.task,
        width=geo.width,
        height=geo.height,
        detections=tuple(detections),
        classes=tuple(classes),
        tensors=tuple(r.tensors),
        timings=timings,
        batch_size=r.batch_size,
    )


def _tensor(t: m.Tensor) -> TensorData:
    values = np.frombuffer(t.data, dtype=np.dtype(t.dtype)).astype(np.float64, copy=False)
    return TensorData(name=t.name, dtype=t.dtype, shape=t.shape, data=values.tolist())
