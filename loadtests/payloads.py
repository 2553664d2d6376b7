"""Request payloads for the load tests: the real test photos re-encoded at camera sizes.

Every photo of ``tests/photos.py`` is cropped to the target aspect ratio (centred, so nothing is
stretched) and re-encoded with Pillow as a JPEG at 640x480, 1280x720 and 1920x1080. ``expect`` is
a label the default detector (SSD-MobileNet-v2 COCO) finds in that photo at every size, so a load
test can check the content of an answer, not only its status.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1280, 720), (1920, 1080))
# photo -> a label SSD-MobileNet-v2 finds at confidence >= 0.5 at every size above (checked
# against the converted model, with simplejpeg + OpenCV and with Pillow decoding and resizing).
EXPECT: dict[str, str | None] = {
    "cat": "cat",
    "two_people": "person",
    "bus": "bus",
    "astronaut": "person",
    "coffee": "cup",
}
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Payload:
    photo: str
    width: int
    height: int
    jpeg: bytes
    expect: str | None  # a label the default detector must answer, or None

    @property
    def name(self) -> str:
        return f"{self.photo}-{self.width}x{self.height}"


def encode(path: Path, width: int, height: int, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        fitted = ImageOps.fit(img.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    fitted.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def build(photos: tuple[str, ...] = tuple(EXPECT), sizes: tuple[tuple[int, int], ...] = SIZES) -> list[Payload]:
    """Every photo at every size (photo-major order); fetches the photos on first use."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.photos import photo

    return [Payload(name, w, h, encode(photo(name), w, h), EXPECT.get(name)) for name in photos for (w, h) in sizes]


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"640x480,1280x720"`` -> ((640, 480), (1280, 720))."""
    sizes = []
    for part in text.split(","):
        w, _, h = part.strip().lower().partition("x")
        sizes.append((int(w), int(h)))
    return tuple(sizes)
