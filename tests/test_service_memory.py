"""What a worker keeps while its requests wait for the engine: not their decoded pixels.

A worker's requests wait for the engine far longer than they take to decode; at c=64 on two
workers that is 32 waiting requests per worker, and their decoded images (up to 0.9 MB each)
were 18 MB of each worker's peak PSS (loadtests/bench, Lite0). The service lets go of them once
they are resized into the ring slot."""

from __future__ import annotations

import asyncio
import gc
import io
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from frontend import imaging
from frontend.params import parse_params
from frontend.service import ImageRequest, ImageService
from frontend.settings import Settings
from ipc.messages import InputSpec
from tests.fake_engine import FakeEngine


def test_the_decoded_pixels_are_let_go_once_they_are_in_the_slot(tmp_path: Path, monkeypatch: Any) -> None:
    decoded: list[weakref.ref[np.ndarray]] = []
    real = imaging.decode

    def tracked(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int]:
        img, width, height = real(data, spec, max_pixels)
        decoded.append(weakref.ref(img))
        return img, width, height

    monkeypatch.setattr(imaging, "decode", tracked)
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 100, 50)).save(buf, "JPEG")
    alive_while_waiting: list[bool] = []

    def check() -> None:  # as the engine works on the slot
        gc.collect()
        alive_while_waiting.append(decoded[0]() is not None)

    engine = FakeEngine(after_fill=check)
    service = ImageService(engine, Settings(run_dir=tmp_path))  # type: ignore[arg-type]
    req = ImageRequest("pixels", None, parse_params({}), "r1", time.monotonic(), image=buf.getvalue())
    result = asyncio.run(service.predict(req))
    assert result.width == 640 and len(result.detections) == 1
    assert len(decoded) == 1
    assert alive_while_waiting == [False], "the decoded image was kept while the engine answered"
