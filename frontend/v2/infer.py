"""One V2 inference: N images become N engine requests, gathered back in order."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from frontend import imaging
from frontend.client import EngineClient
from frontend.predict import Params
from frontend.settings import Settings
from frontend.v2.errors import bad
from frontend.v2.inputs import Images
from ipc import messages as m


@dataclass(frozen=True)
class Options:
    confidence: float  # < 0: the model's default
    max_detections: int  # 0: the model's default
    timeout: float


@dataclass(frozen=True)
class Outcome:
    results: list[m.Result]
    geometries: list[imaging.Geometry]
    input_ns: float  # decode + resize/copy into the ring slots, summed over the images


def options(params: dict[str, Any], settings: Settings) -> Options:
    """Request parameters: ringserve's own, and Triton's ``timeout`` (microseconds)."""
    if params.get("sequence_id") not in (None, 0, ""):
        raise bad("sequence batching is not supported: ringserve's models are stateless")
    ours = {k: params[k] for k in ("confidence_threshold", "max_detections") if k in params}
    try:
        p = Params.model_validate(ours)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise bad(f"parameter '{first['loc'][0]}': {first['msg']}") from None
    timeout = settings.request_timeout_s
    if "timeout" in params:
        us = params["timeout"]
        if isinstance(us, bool) or not isinstance(us, int | float) or us <= 0:
            raise bad(f"parameter 'timeout' must be a positive number of microseconds, got {us!r}")
        timeout = min(timeout, us / 1e6)
    return Options(
        confidence=-1.0 if p.confidence_threshold is None else p.confidence_threshold,
        max_detections=p.max_detections or 0,
        timeout=timeout,
    )


async def run(
    client: EngineClient,
    settings: Settings,
    info: m.ModelInfo,
    images: Images,
    req_id: str,
    opts: Options,
    *,
    raw: bool,
) -> Outcome:
    n = images.count
    geometries: list[imaging.Geometry | None] = [None] * n
    spent = [0.0] * n

    async def one(i: int) -> m.Result:
        started = time.perf_counter_ns()
        if images.pixels is not None:
            pixels = images.pixels[i]
            h, w = pixels.shape[:2]

            def fill(out: np.ndarray) -> None:
                np.copyto(out, pixels)
                geometries[i] = imaging.Geometry(w, h, 1.0, 1.0, 0.0, 0.0)
                spent[i] = time.perf_counter_ns() - started
        else:
            img, width, height = imaging.decode(images.encoded[i], info.input, settings.max_pixels)

            def fill(out: np.ndarray) -> None:
                geometries[i] = imaging.fit(img, width, height, info.input, out)
                spent[i] = time.perf_counter_ns() - started

        return await client.infer(
            info,
            fill,
            req_id=req_id if n == 1 else f"{req_id}.{i}",
            timeout=opts.timeout,
            confidence=opts.confidence,
            max_detections=opts.max_detections,
            raw=raw,
        )

    # Wait for every image before answering, so no engine request outlives the HTTP request.
    settled = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    for item in settled:
        if isinstance(item, BaseException):
            raise item
    results = [r for r in settled if isinstance(r, m.Result)]
    return Outcome(results, [g for g in geometries if g is not None], float(sum(spent)))
