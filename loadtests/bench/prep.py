"""The model input of a repository model for the targets that are not ringserve: (b), (c), (d).

Read from the model's ``model.toml`` [input] the way ringserve reads it: ``stretch`` resizes the
whole photo; ``center-crop`` keeps the middle square-ish part whose short side is
``height / resize_short`` of the photo's (ImageNet's resize-256-crop-224) and resizes only that;
a ``float32`` input is ``(pixel * scale - mean) / std``, an ``NCHW`` one transposed. The crop is
taken from the photo before resizing (the same pixels as resize-then-crop, less work), so the
ceiling is the cheapest correct way to feed the model.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Prep:
    width: int
    height: int
    resize: str  # "stretch" or "center-crop"
    resize_short: int
    nchw: bool
    dtype: str  # "uint8" or "float32"
    scale: float
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, directory: Path) -> Prep:
        spec = tomllib.loads((directory / "model.toml").read_text())["input"]
        return cls(
            width=int(spec["width"]),
            height=int(spec["height"]),
            resize=str(spec.get("resize", "stretch")),
            resize_short=int(spec.get("resize_short", 0) or max(spec["width"], spec["height"])),
            nchw=spec.get("layout", "NHWC") == "NCHW",
            dtype=str(spec.get("dtype", "uint8")),
            scale=float(spec.get("scale", 1.0)),
            mean=np.asarray(spec.get("mean", [0.0, 0.0, 0.0]), np.float32),
            std=np.asarray(spec.get("std", [1.0, 1.0, 1.0]), np.float32),
        )

    @property
    def decode_min(self) -> tuple[int, int]:
        """The smallest (width, height) worth decoding, by ringserve's own rule."""
        from frontend.resize import decode_size

        return decode_size(self.width, self.height, self.resize, self.resize_short)

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the photo that the model sees."""
        if self.resize != "center-crop":
            return 0, 0, width, height
        r = self.resize_short / min(width, height)  # the photo's short side scaled to resize_short
        cw, ch = min(width, round(self.width / r)), min(height, round(self.height / r))
        left, top = (width - cw) // 2, (height - ch) // 2
        return left, top, left + cw, top + ch

    def tensor(self, pixels: np.ndarray) -> np.ndarray:
        """A batch of one from ``height x width x 3`` uint8 RGB pixels."""
        if self.dtype == "uint8" and not self.nchw:
            return pixels[None]
        x = pixels.astype(np.float32)
        if self.dtype != "uint8":
            x = (x * self.scale - self.mean) / self.std
        if self.nchw:
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None], dtype=np.uint8 if self.dtype == "uint8" else np.float32)

    def zeros(self) -> np.ndarray:
        return self.tensor(np.zeros((self.height, self.width, 3), np.uint8))

    def pillow(self, image: Any) -> np.ndarray:
        """From a Pillow RGB image: resize (of the crop box) with Pillow, as the FastAPI app does."""
        from PIL import Image

        resized = image.resize((self.width, self.height), Image.Resampling.BILINEAR, box=self.box(*image.size))
        return self.tensor(np.asarray(resized))

    def opencv(self, img: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """From decoded pixels: OpenCV resize of the crop into ``buf`` (height x width x 3)."""
        import cv2

        from frontend.resize import interpolation  # ringserve's own choice of filter

        left, top, right, bottom = self.box(img.shape[1], img.shape[0])
        crop = img[top:bottom, left:right]
        h, w = crop.shape[:2]
        cv2.resize(crop, (self.width, self.height), dst=buf, interpolation=interpolation(w, h, self.width, self.height))
        return self.tensor(buf)
