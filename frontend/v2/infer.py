"""One V2 inference: N images become N requests to the image service, gathered back in order.

The per-image work (deadline, decode off the event loop in the bounded queue, slot, engine call,
boxes in original pixels) is frontend/service.py's; this module maps V2's parameters onto the
shared ones and the service's results onto what the V2 outputs and statistics need. HTTP and gRPC
both call it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from frontend.params import Params, invalid
from frontend.service import ImageRequest, ImageResult, ImageService
from frontend.settings import Settings
from frontend.v2.errors import bad
from frontend.v2.inputs import Images
from frontend.v2.stats import Sample
from ipc import messages as m
from ipc.errors import RingserveError


@dataclass(frozen=True)
class Options:
    confidence: float  # < 0: the model's default
    max_detections: int  # 0: the model's default
    timeout: float

    def params(self) -> Params:
        return Params(
            confidence_threshold=None if self.confidence < 0 else self.confidence,
            max_detections=self.max_detections or None,
            timeout_s=self.timeout,
        )


@dataclass(frozen=True)
class Outcome:
    results: list[ImageResult]
    input_ns: float  # decode + resize/copy into the ring slots, summed over the images

    def sample(self, total_ns: float, output_ns: float) -> Sample:
        """This request in the box-wide V2 statistics."""
        t = [r.timings for r in self.results]
        return Sample(
            total_ns=total_ns,
            queue_ns=max(x.queue_ms for x in t) * 1e6,
            input_ns=self.input_ns,
            infer_ns=max(x.inference_ms for x in t) * 1e6,
            output_ns=output_ns,
            batches=[(r.batch_size, r.timings.inference_ms * 1e6) for r in self.results],
        )


def options(params: dict[str, Any], settings: Settings) -> Options:
    """Request parameters: ringserve's own, and Triton's ``timeout`` (microseconds)."""
    if params.get("sequence_id") not in (None, 0, ""):
        raise bad("sequence batching is not supported: ringserve's models are stateless")
    ours = {k: params[k] for k in ("confidence_threshold", "max_detections") if k in params}
    try:
        p = Params.model_validate(ours)
    except ValidationError as exc:
        raise invalid(exc) from None
    timeout = settings.request_timeout_s
    if "timeout" in params:
        us = params["timeout"]
        if isinstance(us, bool) or not isinstance(us, int | float) or not 0 < us < float("inf"):
            raise bad(f"parameter 'timeout' must be a positive number of microseconds, got {us!r}")
        timeout = min(timeout, us / 1e6)
    return Options(
        confidence=-1.0 if p.confidence_threshold is None else p.confidence_threshold,
        max_detections=p.max_detections or 0,
        timeout=timeout,
    )


async def run(
    service: ImageService,
    info: m.ModelInfo,
    images: Images,
    req_id: str,
    opts: Options,
    *,
    raw: bool,
    accepted: float | None = None,
) -> Outcome:
    """Every image through the service; the first failure fails the request (as tritonserver)."""
    accepted = time.monotonic() if accepted is None else accepted
    params, n = opts.params(), images.count

    def request(i: int) -> ImageRequest:
        rid = req_id if n == 1 else f"{req_id}.{i}"
        if images.pixels is not None:
            return ImageRequest(info.name, info.version, params, rid, accepted, pixels=images.pixels[i], raw=raw)
        return ImageRequest(info.name, info.version, params, rid, accepted, image=images.encoded[i], raw=raw)

    # Every image is answered before the request is, so no engine request outlives it.
    settled = await service.predict_batch([request(i) for i in range(n)])
    for item in settled:
        if isinstance(item, RingserveError):
            raise item
    results = [r for r in settled if isinstance(r, ImageResult)]
    return Outcome(results, sum(r.timings.decode_ms for r in results) * 1e6)
