"""The EngineClient seam for unit tests of the worker's service: a 64x64 detector that fills its
slot and answers one detection, at once or when ``release`` is set if ``hold`` is."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np

from ipc.messages import Detection, InputSpec, ModelInfo, Result


class FakeEngine:
    def __init__(self, hold: bool = False, after_fill: Callable[[], None] | None = None) -> None:
        self.info = ModelInfo(
            name="pixels",
            version=1,
            task="ssd",
            input=InputSpec(64, 64, "stretch"),
            labels_count=2,
            max_batch_size=1,
            max_queue_delay_ms=0.0,
            queue_limit=1,
            confidence=0.5,
            max_detections=10,
        )
        self.hold = hold
        self.after_fill = after_fill  # runs while the engine would be working on the slot
        self.release = asyncio.Event()
        self.started = self.finished = 0

    def resolve(self, model: str, version: int | None) -> ModelInfo:
        return self.info

    async def infer(self, info: ModelInfo, fill: Any, *, req_id: str, **_: Any) -> Result:
        self.started += 1
        fill(np.empty((64, 64, 3), np.uint8))
        if self.after_fill is not None:
            self.after_fill()
        if self.hold:
            await self.release.wait()
        self.finished += 1
        return Result(
            req_id=req_id,
            slot=0,
            generation=1,
            model="pixels",
            version=1,
            batch_size=1,
            queue_ms=0.0,
            inference_ms=0.0,
            detections=[Detection(0.0, 0.0, 32.0, 32.0, 0.9, 1, "thing")],
        )
