"""Decode an encoded image and write it, resized for the model, straight into a ring slot.

JPEG: simplejpeg (header first, so absurd dimensions are refused before any decoding, and a
DCT-domain downscale when the image is much larger than the model input). Other formats and JPEGs
libjpeg-turbo cannot convert (CMYK): Pillow, imported by the first image that needs it (a JPEG
with EXIF or another format), so a worker that never sees one never loads it. Resizing: OpenCV.
EXIF orientation is applied, so boxes come back in the orientation a viewer shows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import simplejpeg

from frontend.resize import decode_size, interpolation
from ipc.errors import BadInput, PayloadTooLarge
from ipc.messages import InputSpec

if TYPE_CHECKING:
    from PIL import Image

cv2.setNumThreads(1)  # one request per worker at a time already uses the cores

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


def _open(data: bytes, kind: str) -> Image.Image:
    """Pillow's lazy open (headers only) of one format."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # we enforce our own pixel limit (413) before decoding
    return Image.open(io.BytesIO(data), formats=[kind.upper()])


def _exif_orientation(data: bytes) -> int:
    """Orientation tag of a JPEG's EXIF block without decoding the image (1 when absent)."""
    if b"Exif" not in data[:65536]:
        return 1
    try:
        with _open(data, "jpeg") as im:
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


def check_pixels(width: int, height: int, max_pixels: int) -> None:
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
    w, h = decode_size(spec.width, spec.height, spec.resize, spec.resize_short)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _decode_jpeg(data: bytes, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int] | None:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        claimed = _sof_size(data)  # libjpeg refuses more than 65500 a side before saying how many
        if claimed is not None:
            check_pixels(*claimed, max_pixels)
        raise BadInput(f"not a readable JPEG: {exc}") from None
    check_pixels(width, height, max_pixels)
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


_STRIP_BYTES = 1024 * 1024  # of the decoded image, converted and reduced at a time


def _eight_bit(strip: Image.Image, float_scale: float) -> Image.Image:
    """One strip of any mode as 8-bit RGB; temporaries are the strip's size, never the image's.

    16-bit and 32-bit integer greyscale: the high byte of 0..65535; float: 0..1 or 0..255.
    """
    from PIL import Image

    mode = strip.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(strip)  # uint16 (either byte order) or int32
        if mode == "I":
            a = np.clip(a, 0, 65535)
        return Image.fromarray((a >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.nan_to_num(np.asarray(strip), nan=0.0, posinf=255.0, neginf=0.0) * float_scale
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    return strip if mode == "RGB" else strip.convert("RGB")  # palette: looked up before any averaging


def _float_scale(im: Image.Image) -> float:
    """Float images in 0..1 are scaled to 0..255, judged on the whole image (not per strip)."""
    if im.mode != "F":
        return 1.0
    extrema = im.getextrema()
    high = extrema[1] if isinstance(extrema, tuple) else None
    return 255.0 if isinstance(high, float) and high <= 1.0 else 1.0


def _reduced_rgb(im: Image.Image, factor: int) -> np.ndarray:
    """``im`` as 8-bit RGB, box-reduced by ``factor``, converted a few rows at a time.

    The decoded image at its own depth is the only full-size buffer: each strip is copied out,
    converted to 8-bit RGB and reduced before the next one, so a 16-bit, 32-bit, float, palette,
    CMYK or LA image costs its decode plus a few megabytes, not a full-size widened copy.
    """
    width, height = im.size
    depth = max(1, len(im.getbands())) * (4 if im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else 1)
    rows = max(1, _STRIP_BYTES // (width * depth * factor)) * factor
    out = np.empty((-(-height // factor), -(-width // factor), 3), dtype=np.uint8)
    scale = _float_scale(im)
    for top in range(0, height, rows):
        strip = _eight_bit(im.crop((0, top, width, min(height, top + rows))), scale)
        if factor > 1:
            strip = strip.reduce(factor)
        out[top // factor : top // factor + strip.height] = np.asarray(strip)
    return out


def _decode_pillow(data: bytes, kind: str, spec: InputSpec, max_pixels: int) -> tuple[np.ndarray, int, int]:
    """Pillow for everything simplejpeg does not do. JPEGs are drafted (DCT-domain downscale)
    before decoding; other large images are reduced (box filter) to about the model's input
    strip by strip (``_reduced_rgb``), so a 50-megapixel PNG costs its inflate and little more."""
    from PIL import UnidentifiedImageError

    try:
        with _open(data, kind) as opened:
            check_pixels(opened.width, opened.height, max_pixels)
            orientation = _orientation_of(opened)
            swap = orientation in (5, 6, 7, 8)
            width, height = (opened.height, opened.width) if swap else (opened.width, opened.height)
            need_w, need_h = _needed(spec, orientation)
            if kind == "jpeg":
                opened.draft(None, (need_w, need_h))  # a CMYK JPEG: DCT-domain downscale as with simplejpeg
            opened.load()
            factor = max(1, min(opened.width // need_w, opened.height // need_h))
            img = _reduced_rgb(opened, factor)
    except (PayloadTooLarge, BadInput):
        raise
    except UnidentifiedImageError:  # its message names a BytesIO object of this process
        raise BadInput(f"the data is not a readable {kind.upper()} image") from None
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
        cv2.resize(img, (tw, th), dst=out, interpolation=interpolation(dw, dh, tw, th))
        return Geometry(width, height, tw / dw * k, th / dh * k, 0.0, 0.0)
    if spec.resize == "letterbox":
        r = min(tw / dw, th / dh)
        nw, nh = max(1, round(dw * r)), max(1, round(dh * r))
        left, top = (tw - nw) // 2, (th - nh) // 2
        out.fill(spec.pad_value)
        out[top : top + nh, left : left + nw] = cv2.resize(img, (nw, nh), interpolation=interpolation(dw, dh, nw, nh))
        return Geometry(width, height, nw / dw * k, nh / dh * k, float(left), float(top))
    # center-crop: the middle of the image scaled so that its short side is resize_short. Only the
    # part that lands in the model's window is resized, straight into ``out``: the same pixels as
    # scaling all of it and cutting the middle, for a fraction of the work (profiled: the full
    # resize cost as much as the JPEG decode on EfficientNet-Lite0's 224-of-256 crop).
    short = spec.resize_short or max(th, tw)
    r = short / min(dw, dh)
    nw, nh = max(tw, round(dw * r)), max(th, round(dh * r))
    cw, ch = min(dw, max(1, round(tw * dw / nw))), min(dh, max(1, round(th * dh / nh)))
    cx, cy = (dw - cw) // 2, (dh - ch) // 2
    cv2.resize(img[cy : cy + ch, cx : cx + cw], (tw, th), dst=out, interpolation=interpolation(cw, ch, tw, th))
    sx, sy = tw / cw, th / ch  # model pixels per decoded pixel
    return Geometry(width, height, sx * k, sy * k, -cx * sx, -cy * sy)
