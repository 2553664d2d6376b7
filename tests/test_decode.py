"""The worker's decode queue and the memory of one decode, in process (no appliance needed).

- DecodePool: a job whose deadline passes while it waits, or whose waiter is cancelled, is never
  run; the bounds in images and bytes refuse at once; an image stays counted until its decode has
  really stopped; closing refuses the images that wait.
- Every Pillow mode decodes with a bounded peak: the decoded image at its own depth (the floor for a
  format without a reduced decode) plus about twice the 8-bit RGB image at its reduced size. Each
  case runs in a fresh interpreter, which reads its own peak RSS from the kernel.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frontend import imaging
from frontend.decode_pool import DecodePool
from ipc.errors import DeadlineExceeded, EngineUnavailable, QueueFull
from ipc.messages import InputSpec
from tests.harness import ROOT

SPEC = InputSpec(300, 300, "stretch")


def test_a_job_past_its_deadline_in_the_queue_is_never_run() -> None:
    ran: list[str] = []
    gate = threading.Event()

    def blocker() -> str:
        gate.wait(10)
        ran.append("blocker")
        return "blocker"

    async def go() -> None:
        pool = DecodePool(max_images=8, max_bytes=1 << 20)
        now = time.monotonic()
        first = asyncio.create_task(pool.run(blocker, 10, now + 30))
        await asyncio.sleep(0)  # the blocker is submitted first
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await pool.run(lambda: ran.append("late"), 10, started + 0.3)
        assert 0.25 < time.monotonic() - started < 2.0  # at its deadline, not after the blocker
        assert pool.images == 1  # the late job, never started, is out of the queue
        gate.set()
        assert await first == "blocker"
        await _drained(pool)
        assert ran == ["blocker"] and pool.images == 0 and pool.bytes == 0
        pool.close()

    asyncio.run(go())


async def _drained(pool: DecodePool, timeout: float = 5.0) -> None:
    """Until the pool has counted its finished decodes out (its thread does that after the answer)."""
    deadline = time.monotonic() + timeout
    while (pool.images or pool.bytes) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_the_queue_refuses_at_once_past_its_bounds() -> None:
    gate = threading.Event()

    async def go() -> None:
        pool = DecodePool(max_images=2, max_bytes=100)
        far = time.monotonic() + 30
        held = [asyncio.create_task(pool.run(lambda: gate.wait(10), 40, far)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await pool.run(lambda: None, 1, far)  # a third image
        gate.set()
        await asyncio.gather(*held)
        await _drained(pool)
        gate.clear()
        big = asyncio.create_task(pool.run(lambda: gate.wait(10), 500, far))  # alone: admitted
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await pool.run(lambda: None, 1, far)  # the bytes bound
        gate.set()
        assert await big is True
        pool.close()

    asyncio.run(go())


def test_a_started_decode_stays_counted_after_its_waiter_gave_up() -> None:
    gate = threading.Event()

    async def go() -> None:
        pool = DecodePool(max_images=1, max_bytes=1 << 20)
        with pytest.raises(DeadlineExceeded):
            await pool.run(lambda: gate.wait(10), 10, time.monotonic() + 0.2)
        with pytest.raises(QueueFull):  # the decode still runs: the bound holds for the thread
            await pool.run(lambda: None, 10, time.monotonic() + 5)
        gate.set()
        await _drained(pool)
        assert pool.images == 0
        await pool.run(lambda: None, 10, time.monotonic() + 5)
        pool.close()

    asyncio.run(go())


def test_a_waiter_cancelled_before_its_decode_starts_is_never_decoded() -> None:
    """A client that leaves (its request task is cancelled) while its image waits: the image is
    counted out at once and the thread skips it."""
    ran: list[str] = []
    gate = threading.Event()

    async def go() -> None:
        pool = DecodePool(max_images=8, max_bytes=1 << 20)
        far = time.monotonic() + 30
        first = asyncio.create_task(pool.run(lambda: gate.wait(10), 10, far))
        await asyncio.sleep(0)
        second = asyncio.create_task(pool.run(lambda: ran.append("cancelled"), 20, far))
        await asyncio.sleep(0)
        assert (pool.images, pool.bytes) == (2, 30)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert (pool.images, pool.bytes) == (1, 10)
        gate.set()
        assert await first is True
        assert await pool.run(lambda: "after", 10, far) == "after"  # the thread went on past it
        assert ran == [] and (pool.images, pool.bytes) == (0, 0)
        pool.close()

    asyncio.run(go())


def test_close_refuses_the_images_that_wait_and_new_ones() -> None:
    gate, started = threading.Event(), threading.Event()

    def blocker() -> bool:
        started.set()
        return gate.wait(10)

    async def go() -> None:
        pool = DecodePool(max_images=8, max_bytes=1 << 20)
        far = time.monotonic() + 30
        running = asyncio.create_task(pool.run(blocker, 10, far))
        assert await asyncio.to_thread(started.wait, 10)  # the thread is decoding it
        waiting = asyncio.create_task(pool.run(lambda: "never", 10, far))
        await asyncio.sleep(0)
        pool.close()
        gate.set()
        assert await running is True  # the decode under way finishes
        with pytest.raises(EngineUnavailable):
            await waiting
        with pytest.raises(EngineUnavailable):
            await pool.run(lambda: "late", 10, far)
        await _drained(pool)
        assert (pool.images, pool.bytes) == (0, 0)

    asyncio.run(go())


# --------------------------------------------------------------------------- decode memory per mode
SIDE = 4000


def _image(mode: str) -> Image.Image:
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)[:, None] * np.ones((1, SIDE), np.float32)
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))
    if mode == "I;16B":
        return Image.frombytes(mode, (SIDE, SIDE), (ramp * 65535).astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray((ramp * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(ramp)
    grey = Image.fromarray((ramp * 255).astype(np.uint8))
    return grey.convert("RGB").convert(mode) if mode != "L" else grey


CASES = {  # (mode, format): bytes per pixel of the decoded image at its own depth
    ("I;16", "PNG"): 2,
    ("I;16B", "TIFF"): 2,
    ("I", "TIFF"): 4,
    ("F", "TIFF"): 4,
    ("P", "PNG"): 1,
    ("LA", "PNG"): 4,  # Pillow keeps LA in 4 bytes a pixel
    ("RGBA", "PNG"): 4,
    ("1", "PNG"): 1,
    ("CMYK", "TIFF"): 4,
    ("CMYK", "JPEG"): 0,  # drafted: decoded at about the model's size
}
_CHILD = """
import sys
from pathlib import Path
from frontend import imaging
from ipc.messages import InputSpec
data = Path(sys.argv[1]).read_bytes()
imaging.decode(Path(sys.argv[2]).read_bytes(), InputSpec(300, 300, "stretch"), 10**8)  # a warm worker
def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
img, w, h = imaging.decode(data, InputSpec(300, 300, "stretch"), 10**8)
print(status("VmHWM") - before, img.shape[0], img.shape[1], w, h)
"""


@pytest.mark.parametrize(("mode", "fmt"), list(CASES), ids=[f"{m}-{f}" for m, f in CASES])
def test_decode_memory_is_bounded_for_every_mode(tmp_path: Path, mode: str, fmt: str) -> None:
    extra = {"compression": "tiff_deflate"} if fmt == "TIFF" else {}
    path, small = tmp_path / f"image.{fmt.lower()}", tmp_path / f"small.{fmt.lower()}"
    image = _image(mode)
    image.save(path, format=fmt, **extra)
    image.resize((700, 700)).save(small, format=fmt, **extra)
    child = [sys.executable, "-c", _CHILD, str(path), str(small)]
    out = subprocess.run(child, cwd=ROOT, capture_output=True, text=True, timeout=100, check=True).stdout.split()
    growth, rh, rw, w, h = (int(x) for x in out)
    assert (w, h) == (SIDE, SIDE)
    native = SIDE * SIDE * CASES[(mode, fmt)]
    reduced_rgb = rh * rw * 3
    slack = 16 * 2**20  # strips (1 MB at the image's depth, and their RGB), allocator, libtiff/zlib buffers
    assert growth <= native + 2 * reduced_rgb + slack, (
        f"{mode} {fmt}: peak grew by {growth / 2**20:.0f} MB; decoded at its depth {native / 2**20:.0f} MB, "
        f"reduced RGB {reduced_rgb / 2**20:.1f} MB"
    )


def test_modes_decode_to_the_same_picture() -> None:
    """The strip-wise conversion gives what a whole-image conversion would (16-bit: the high byte)."""
    ramp = (np.linspace(0, 65535, 640, dtype=np.float64)[:, None] * np.ones((1, 480))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    img, w, h = imaging.decode(buf.getvalue(), InputSpec(64, 64, "stretch"), 10**8)
    want = (ramp >> 8).astype(np.uint8)
    factor = min(480 // 64, 640 // 64)
    expected = np.asarray(Image.fromarray(want).reduce(factor))
    assert (w, h) == (480, 640) and img.shape == (*expected.shape, 3)
    assert np.abs(img[..., 0].astype(int) - expected).max() <= 1


def test_center_crop_resizes_only_the_window_and_maps_back() -> None:
    """The crop is cut before the resize (issue 15): the same pixels as scaling the whole image to a
    short side of resize_short and cutting the middle, and boxes map back to the original."""
    import cv2

    spec = InputSpec(height=224, width=224, resize="center-crop", resize_short=256)
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (12, 16, 3), np.uint8)
    img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_LINEAR)  # smooth, like a photo
    out = np.empty((224, 224, 3), np.uint8)
    geo = imaging.fit(img, 1280, 960, spec, out)  # decoded at half the original's size
    scaled = cv2.resize(img, (341, 256), interpolation=cv2.INTER_AREA)
    whole_then_cut = scaled[16:240, 58:282]
    assert np.abs(out.astype(int) - whole_then_cut.astype(int)).mean() < 2.0  # up to a sub-pixel shift
    # the window is the middle 840 x 840 of the 1280 x 960 original (224 of 256 of its short side)
    left, top, right, bottom = geo.to_original(0, 0, 224, 224)
    assert abs(left - 220) <= 2 and abs(top - 60) <= 2 and abs(right - 1060) <= 2 and abs(bottom - 900) <= 2


def test_the_resize_filter_is_bilinear_under_a_2x_shrink_and_area_from_there() -> None:
    """Under 2x a bilinear filter still reads every input pixel (and is an eighth of the cost of
    OpenCV's area filter at such factors); from 2x on it would skip pixels and alias."""
    import cv2

    from frontend.resize import interpolation

    assert interpolation(420, 420, 224, 224) == cv2.INTER_LINEAR  # Lite0's window of a 640x480 photo
    assert interpolation(451, 300, 300, 300) == cv2.INTER_LINEAR
    assert interpolation(640, 480, 300, 300) == cv2.INTER_AREA  # the long side shrinks 2.13x
    assert interpolation(600, 600, 300, 300) == cv2.INTER_AREA
    assert interpolation(200, 100, 300, 300) == cv2.INTER_LINEAR  # an enlargement


def test_bilinear_under_2x_gives_the_area_filters_pixels_on_a_photo() -> None:
    """The model sees the same image: on a smooth, photo-like image the two filters differ by
    a fraction of a grey level at Lite0's 1.875x shrink (0.2 on this image)."""
    import cv2

    spec = InputSpec(height=224, width=224, resize="center-crop", resize_short=256)
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (24, 32, 3), np.uint8)
    img = cv2.resize(small, (640, 480), interpolation=cv2.INTER_CUBIC)
    out = np.empty((224, 224, 3), np.uint8)
    imaging.fit(img, 640, 480, spec, out)
    cx, cy = (640 - 420) // 2, (480 - 420) // 2
    area = cv2.resize(img[cy : cy + 420, cx : cx + 420], (224, 224), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - area.astype(int)).mean() < 0.5


def test_a_center_crop_window_is_decoded_at_full_resolution() -> None:
    """The short side decodes to resize_short or more, so the model's 224x224 window comes from at
    least 224 decoded pixels (decoded only to 224x224, a 640x480 photo's window came from 210,
    enlarged)."""
    import simplejpeg

    spec = InputSpec(height=224, width=224, resize="center-crop", resize_short=256)
    stretch = InputSpec(height=224, width=224, resize="stretch")
    assert imaging._needed(spec, 1) == (256, 256)
    assert imaging._needed(stretch, 1) == (224, 224)
    photo = simplejpeg.encode_jpeg(np.full((480, 640, 3), 128, np.uint8))
    img, w, h = imaging.decode(photo, spec, 10**8)
    assert (w, h) == (640, 480) and min(img.shape[:2]) >= 256 and img.shape[:2] != (480, 640)  # 5/8: 400x300
