"""Decode an encoded image and write it, resized for the model, straight into a ring slot.

JPEG: simplejpeg (header first, so absurd dimensions are refused before any decoding, and a
DCT-domain downscale when the image is much larger than the model input). Other formats and JPEGs
libjpeg-turbo cannot convert (CMYK): Pillow. Resizing: OpenCV. EXIF orientation is applied, so
boxes come back in the orientation a viewer shows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from ipc.errors import BadInput, PayloadTooLarge
from ipc.messages import InputSpec

cv2.setNumThreads(1)  # one request per worker at a time already uses the cores
Image.MAX_IMAGE_PIXELS = None  # we enforce our own pixel limit (413) before decoding

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Geometry:
    """Maps model-input pixels back to the original image: x = (x_model - ox) / sx."""

    width: int
    height: int
    sx: float
    sy: float
    ox: float
    oy: float

    def to_original(self, x1: float, y1: float, x2: float, y2: float) -> list[float]:
        def fx(x: float) -> float:
            return min(max((x - self.ox) / self.sx, 0.0), float(self.width))

        def fy(y: float) -> float:
            return min(max((y - self.oy) / self.sy, 0.0), float(self.height))

        return [round(fx(x1), 2), round(fy(y1), 2), round(fx(x2), 2), round(fy(y2), 2)]


def sniff(data: bytes) -> str:
    if data.startswith(_JPEG):
        return "jpeg"
    if data.startswith(_PNG):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    raise BadInput("the data is not a recognised image (JPEG, PNG, WebP, BMP, GIF or TIFF)")


def _exif_orientation(data: bytes) -> int:
    """Orientation tag of a JPEG's EXIF block without decoding the image (1 when absent)."""
    if b"Exif" not in data[:65536]:
        return 1
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as im:
            return _orientation_of(im)
    except Exception:
        return 1


def _orientation_of(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return value if 1 <= value <= 8 else 1


def _orient(img: np.ndarray, orientation: int) -> np.ndarray:
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 1)[::-1],  # transverse
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(img)) if op else img


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise BadInput(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height}, more than {max_pixels} pixels")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _sof_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a JPEG's frame header, or None (a walk over the marker segments)."""
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF:
            return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
        i += 2 + length
    return None


def _needed(spec: InputSpec, orientation: int) -> tuple[int, int]:
    """The smallest stored width and height worth decoding for the model (before the EXIF rotation)."""
    return (spec.height, spec.width) if orientation in (5, 6, 7, 8) else (spec.width, spec.height)


def _decode_jpeg(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int] | None:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        claimed = _sof_size(data)  # libjpeg refuses more than 65500 a side before saying how many
        if claimed is not None:
            _check_pixels(*claimed, max_pixels)
        raise BadInput(f"not a readable JPEG: {exc}") from None
    _check_pixels(width, height, max_pixels)
    if colorspace in ("CMYK", "YCCK"):
        return None
    orientation = _exif_orientation(data)
    need_w, need_h = _needed(spec, orientation)
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=need_w, min_height=need_h)
    except ValueError as exc:
        raise BadInput(f"the JPEG could not be decoded: {exc}") from None
    img = _orient(img, orientation)
    w, h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    return img, w, h


_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float greyscale as 8-bit L (16-bit: the high byte; float: 0..1 or 0..255)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and float(a.max()) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray((np.clip(a.astype(np.int64), 0, 65535) >> 8).astype(np.uint8))


def _decode_pillow(data: bytes, kind: str, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Pillow for everything simplejpeg does not do. Large images are reduced (box filter) to about
    the model's input before any conversion or copy, so a 50-megapixel PNG costs its inflate and
    little more."""
    try:
        with Image.open(io.BytesIO(data), formats=[kind.upper()]) as opened:
            _check_pixels(opened.width, opened.height, max_pixels)
            orientation = _orientation_of(opened)
            swap = orientation in (5, 6, 7, 8)
            width, height = (opened.height, opened.width) if swap else (opened.width, opened.height)
            need_w, need_h = _needed(spec, orientation)
            im: Image.Image = opened
            if kind == "jpeg":
                im.draft(None, (need_w, need_h))  # a CMYK JPEG: DCT-domain downscale as with simplejpeg
            if im.mode in _WIDE_MODES:
                im = _to_8bit(im)
            elif im.mode in ("P", "PA"):
                im = im.convert("RGBA")  # palette indices must not be averaged; keeps transparency right
            elif im.mode == "1":
                im = im.convert("L")
            factor = min(im.width // need_w, im.height // need_h)
            if factor >= 2:
                im = im.reduce(factor)
            if im.mode != "RGB":
                im = im.convert("RGB")  # drops alpha
            img = np.asarray(im)
    except (PayloadTooLarge, BadInput):
        raise
    except Exception as exc:
        raise BadInput(f"the image could not be decoded: {exc}") from None
    return _orient(img, orientation), width, height


def decode(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """RGB pixels (maybe downscaled, never below the model input) and the original (displayed) size.

    Blocking, and for a large image long: callers on an event loop run it in a thread.
    """
    if not data:
        raise BadInput("empty image")
    kind = sniff(data)
    if kind == "jpeg":
        decoded = _decode_jpeg(data, spec, max_pixels)
        if decoded is not None:
            return decoded
    return _decode_pillow(data, kind, spec, max_pixels)


def fit(img: np.ndarray, width: int, height: int, spec: InputSpec, out: np.ndarray) -> Geometry:
    """Resize ``img`` (decoded from a width x height original) into ``out`` as the model wants."""
    dh, dw = img.shape[:2]
    th, tw = spec.height, spec.width
    k = dw / width  # DCT downscale factor of the decode
    if spec.resize == "stretch":
        cv2.resize(img, (tw, th), dst=out, interpolation=_interp(dw, tw))
        return Geometry(width, height, tw / dw * k, th / dh * k, 0.0, 0.0)
    if spec.resize == "letterbox":
        r = min(tw / dw, th / dh)
        nw, nh = max(1, round(dw * r)), max(1, round(dh * r))
        left, top = (tw - nw) // 2, (th - nh) // 2
        out.fill(spec.pad_value)
        out[top : top + nh, left : left + nw] = cv2.resize(img, (nw, nh), interpolation=_interp(dw, nw))
        return Geometry(width, height, nw / dw * k, nh / dh * k, float(left), float(top))
    # center-crop: scale the short side, then cut the middle
    short = spec.resize_short or max(th, tw)
    r = short / min(dw, dh)
    nw, nh = max(tw, round(dw * r)), max(th, round(dh * r))
    scaled = cv2.resize(img, (nw, nh), interpolation=_interp(dw, nw))
    left, top = (nw - tw) // 2, (nh - th) // 2
    out[...] = scaled[top : top + th, left : left + tw]
    return Geometry(width, height, nw / dw * k, nh / dh * k, float(-left), float(-top))


def _interp(src: int, dst: int) -> int:
    return cv2.INTER_AREA if dst < src else cv2.INTER_LINEAR
