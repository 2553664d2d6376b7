"""Hostile and odd input against one live appliance: each case gets the right answer and does no harm.

One appliance (two workers, the tiny pixel detector) serves every case; the last test checks that
after all of them nothing changed: the same processes, the engine connected, no slot held, no
engine loss seen, no traceback logged, and a normal request still answered correctly.
"""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from PIL import Image

from ipc.shm import pid_alive
from tests.harness import Appliance, segments, wait_for
from tests.models import expected_box, write_pixel_detector

MAX_BODY = 2_000_000
BODY_TIMEOUT_S = 2.0
RGB = (200, 100, 50)
SIZE = (96, 64)
PREDICT = "/api/v1/predict"


# ----------------------------------------------------------------------------- images
def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def flat(mode: str = "RGB", size: tuple[int, int] = SIZE, rgb: tuple[int, int, int] = RGB) -> Image.Image:
    return Image.new("RGB", size, rgb).convert(mode)


def luma(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    v = round(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    return v, v, v


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small JPEG whose SOF0 header claims ``width`` x ``height`` pixels."""
    jpeg = encode(flat(), "JPEG")
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9 :]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def png_bomb() -> bytes:
    """A few hundred bytes that claim 100000 x 100000 pixels (30 GB decoded)."""
    return png_raw(100_000, 100_000, 8, 2, b"\x00" * 4096)


def png16_rgb(rgb16: tuple[int, int, int]) -> bytes:
    row = b"\x00" + struct.pack(">HHH", *rgb16) * SIZE[0]
    return png_raw(SIZE[0], SIZE[1], 16, 2, row * SIZE[1])


def png16_grey(value: int) -> bytes:
    return encode(Image.fromarray(np.full(SIZE[::-1], value, dtype=np.uint16)), "PNG")


def palette_png() -> bytes:
    img = flat().convert("P")
    return encode(img, "PNG", transparency=0)


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: 96x64 stored, 64x96 shown
    return encode(flat(), "JPEG", exif=exif, quality=95)


def animated_gif() -> bytes:
    frames = [flat(rgb=RGB), flat(rgb=(0, 0, 0)), flat(rgb=(255, 255, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = encode(flat(), "PNG")


# ----------------------------------------------------------------------------- requests
Send = Callable[[httpx.Client, str], httpx.Response]


def raw(data: bytes, ctype: str | None = "image/png", path: str = PREDICT, **headers: str) -> Send:
    hdrs = {**({"content-type": ctype} if ctype else {}), **headers}
    return lambda c, url: c.post(url + path, content=data, headers=hdrs)


def query(params: dict[str, str]) -> Send:
    return lambda c, url: c.post(url + PREDICT, content=PNG, params=params, headers={"content-type": "image/png"})


def json_text(text: str | bytes) -> Send:
    return lambda c, url: c.post(url + PREDICT, content=text, headers={"content-type": "application/json"})


def json_image(data: bytes = PNG, **fields: object) -> Send:
    return lambda c, url: c.post(url + PREDICT, json={"image_b64": b64(data), **fields})


def form(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str] | None = None) -> Send:
    return lambda c, url: c.post(url + PREDICT, files=files, data=data or {})


def image_file(data: bytes = PNG) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", ("x.png", data, "image/png"))]


class Stream:
    """A body generator that would send ``total`` bytes; counts what the client got to send."""

    def __init__(self, total: int, chunk: int, pause: float = 0.0) -> None:
        self.total, self.chunk, self.pause, self.sent = total, chunk, pause, 0

    def __iter__(self) -> Iterator[bytes]:
        while self.sent < self.total:
            if self.pause:
                time.sleep(self.pause)  # the client under test is slow; this is its behaviour, not a wait
            self.sent += self.chunk
            yield b"\x00" * self.chunk


def streamed(body: Stream, bound: float, limit: int) -> Send:
    """Post a generated (chunked) body; the answer must come within ``bound`` s, after < ``limit`` bytes."""

    def send(c: httpx.Client, url: str) -> httpx.Response:
        started = time.monotonic()
        r = c.post(url + PREDICT, content=iter(body), headers={"content-type": "image/png"}, timeout=bound + 10)
        assert time.monotonic() - started < bound, f"answered after {time.monotonic() - started:.1f}s"
        assert body.sent < limit, f"the client could send {body.sent} bytes before the answer"
        return r

    return send


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    id: str
    send: Send
    status: int
    error: str | None = None  # the error code of a 4xx
    rgb: tuple[int, int, int] | None = None  # a 200's flat colour, to check its box
    size: tuple[int, int] = SIZE  # a 200's displayed width and height
    tolerance: float = 0.6  # of the box, in pixels (JPEG is lossy)
    closes: bool = False  # answered before the body was read: the connection must close


def ok(name: str, send: Send, rgb: tuple[int, int, int] = RGB, size: tuple[int, int] = SIZE, tol: float = 0.6) -> Case:
    return Case(name, send, 200, rgb=rgb, size=size, tolerance=tol)


def err(name: str, send: Send, status: int, error: str, closes: bool = False) -> Case:
    return Case(name, send, status, error, closes=closes)


CASES = [
    # bodies that are no image, or a broken one
    err("empty-body", raw(b""), 400, "bad_input"),
    err("not-an-image", raw(b"this is not an image at all" * 10, "image/jpeg"), 400, "bad_input"),
    err("truncated-jpeg", raw(encode(flat(size=(640, 480)), "JPEG")[:2000], "image/jpeg"), 400, "bad_input"),
    err("truncated-png", raw(PNG[:60]), 400, "bad_input"),
    err("png-without-pixels", raw(png_raw(0, 10, 8, 2, b"")), 400, "bad_input"),
    err("ico-is-not-accepted", raw(encode(flat(), "ICO"), "image/png"), 400, "bad_input"),
    # too many pixels, refused from the header before any decoding
    err("jpeg-header-65535x65535", raw(jpeg_claiming(65535, 65535), "image/jpeg"), 413, "too_large"),
    err("png-decompression-bomb", raw(png_bomb()), 413, "too_large"),
    # odd but legitimate images work
    ok("cmyk-jpeg", raw(encode(flat("CMYK"), "JPEG", quality=95), "image/jpeg"), tol=2),
    ok("greyscale-jpeg", raw(encode(flat("L"), "JPEG", quality=95), "image/jpeg"), rgb=luma(RGB), tol=2),
    ok("progressive-jpeg", raw(encode(flat(), "JPEG", quality=95, progressive=True), "image/jpeg"), tol=2),
    ok("exif-rotated-jpeg", raw(rotated_jpeg(), "image/jpeg"), size=SIZE[::-1], tol=2),
    ok("png-16-bit-rgb", raw(png16_rgb((200 * 257, 100 * 257, 50 * 257))), rgb=RGB),
    ok("png-16-bit-grey", raw(png16_grey(120 * 257)), rgb=(120, 120, 120)),
    ok("palette-png-with-transparency", raw(palette_png()), rgb=RGB, tol=1.5),
    ok("rgba-png", raw(encode(flat("RGBA"), "PNG"))),
    ok("greyscale-alpha-png", raw(encode(flat("LA"), "PNG")), rgb=luma(RGB)),
    ok("gif", raw(encode(flat(), "GIF"), "image/gif"), tol=1.5),
    ok("animated-gif-first-frame", raw(animated_gif(), "image/gif"), tol=1.5),
    ok("bmp", raw(encode(flat(), "BMP"), "image/bmp")),
    ok("webp", raw(encode(flat(), "WEBP", lossless=True), "image/webp")),
    ok("tiff", raw(encode(flat(), "TIFF"), "image/tiff")),
    ok("one-pixel", raw(encode(flat(size=(1, 1)), "PNG")), size=(1, 1), tol=0.05),
    ok("20000x1-strip", raw(encode(flat(size=(20000, 1)), "PNG")), size=(20000, 1), tol=50),
    # 49 megapixels, under the 50 MP limit, 160 kB: decoded off the event loop, the worker keeps its engine
    ok("png-49-megapixels", raw(encode(flat(size=(7000, 7000)), "PNG")), size=(7000, 7000), tol=20),
    # JSON bodies
    err("invalid-base64", json_text(b'{"image_b64": "@@@ not base64 @@@"}'), 400, "bad_input"),
    err("base64-of-a-non-image", json_text(b'{"image_b64": "%s"}' % b64(b"hello" * 50).encode()), 400, "bad_input"),
    ok(
        "base64-data-url-with-line-breaks",
        json_text(b'{"image_b64": "data:image/png;base64,%s"}' % base64.encodebytes(PNG).replace(b"\n", b"\\n")),
    ),
    err("json-not-an-object", json_text(b"[1, 2, 3]"), 422, "invalid_parameter"),
    err("json-malformed", json_text(b'{"image_b64": '), 422, "invalid_parameter"),
    err("json-nested-100000-deep", json_text(b"[" * 100_000 + b"]" * 100_000), 422, "invalid_parameter"),
    err("json-image-null", json_text(b'{"image_b64": null}'), 422, "invalid_parameter"),
    err("json-image-missing", json_text(b'{"confidence_threshold": 0.5}'), 422, "invalid_parameter"),
    err("json-unknown-field", json_image(colour="red"), 422, "invalid_parameter"),
    err(
        "json-nan-threshold",
        json_text(b'{"image_b64": "%s", "confidence_threshold": NaN}' % b64(PNG).encode()),
        422,
        "invalid_parameter",
    ),
    err("json-negative-threshold", json_image(confidence_threshold=-0.1), 422, "invalid_parameter"),
    err("json-threshold-over-1", json_image(confidence_threshold=1.5), 422, "invalid_parameter"),
    err("json-max-detections-0", json_image(max_detections=0), 422, "invalid_parameter"),
    err("json-max-detections-huge", json_image(max_detections=10**12), 422, "invalid_parameter"),
    err("json-threshold-a-string", json_image(confidence_threshold="high"), 422, "invalid_parameter"),
    err("json-timeout-negative", json_image(timeout_s=-1), 422, "invalid_parameter"),
    # query-string parameters (raw bodies)
    err("query-nan-threshold", query({"confidence_threshold": "nan"}), 422, "invalid_parameter"),
    err("query-inf-timeout", query({"timeout_s": "inf"}), 422, "invalid_parameter"),
    err("query-threshold-not-a-number", query({"confidence_threshold": "high"}), 422, "invalid_parameter"),
    err("query-unknown-parameter", query({"confidence": "0.9"}), 422, "invalid_parameter"),
    # multipart bodies
    err("multipart-unknown-field", form(image_file(), {"colour": "red"}), 422, "invalid_parameter"),
    err("multipart-without-image", form([("picture", ("x.png", PNG, "image/png"))]), 422, "invalid_parameter"),
    err(
        "multipart-image-as-text",
        form([("image", (None, b"not a file", "text/plain"))]),
        422,  # type: ignore[list-item]
        "invalid_parameter",
    ),
    # too many files: one answer on every route (413, as a batch of 33 images)
    err("multipart-two-images", form(image_file() * 2), 413, "too_large"),
    err("multipart-zero-byte-file", form(image_file(b"")), 400, "bad_input"),
    err("multipart-threshold-over-1", form(image_file(), {"confidence_threshold": "2"}), 422, "invalid_parameter"),
    err("multipart-no-boundary", raw(b"--x\r\n", "multipart/form-data"), 400, "bad_input"),
    # media types
    err("missing-content-type", raw(PNG, None), 415, "unsupported_media"),
    err("text-plain", raw(PNG, "text/plain"), 415, "unsupported_media"),
    err(
        "gzip-content-encoding",
        raw(zlib.compress(PNG), "image/png", **{"content-encoding": "gzip"}),
        415,
        "unsupported_media",
    ),
    # sizes and time
    err("content-length-over-limit", raw(b"\x00" * (MAX_BODY + 1)), 413, "too_large", closes=True),
    err(
        "endless-chunked-body",
        streamed(Stream(10**10, 1 << 16), bound=10, limit=64 << 20),
        413,
        "too_large",
        closes=True,
    ),
    err("json-over-limit", json_image(b"\x00" * MAX_BODY), 413, "too_large", closes=True),
    err(
        "slow-body",
        streamed(Stream(10**6, 1, pause=0.05), bound=BODY_TIMEOUT_S + 5, limit=10**6),
        408,
        "body_timeout",
        closes=True,
    ),
    # routes
    err("unknown-model", raw(PNG, path="/api/v1/models/nope/predict"), 404, "model_not_found"),
    err("version-0", raw(PNG, path="/api/v1/models/pixels/versions/0/predict"), 404, "model_not_found"),
    err("version-7", raw(PNG, path="/api/v1/models/pixels/versions/7/predict"), 404, "model_not_found"),
    err(
        "version-not-an-integer", raw(PNG, path="/api/v1/models/pixels/versions/one/predict"), 422, "invalid_parameter"
    ),
    err("model-name-traversal", raw(PNG, path="/api/v1/models/..%2F..%2Fetc%2Fpasswd/predict"), 404, "not_found"),
    err("get-on-predict", lambda c, url: c.get(url + PREDICT), 405, "method_not_allowed"),
    err(
        "cors-preflight-from-a-foreign-page",
        lambda c, url: c.options(
            url + PREDICT, headers={"origin": "http://evil.example", "access-control-request-method": "POST"}
        ),
        405,
        "method_not_allowed",
    ),
    # a page of another site may not drive the appliance from a browser (issue 14; tests/test_origin.py)
    err("cross-origin-post-is-refused-without-cors", raw(PNG, origin="http://evil.example"), 403, "forbidden_origin"),
    ok("hostile-request-id-is-replaced", raw(PNG, **{"x-request-id": "a\tb" + "x" * 500})),
]


# ----------------------------------------------------------------------------- fixture and tests
@dataclass
class Snapshot:
    engine: int
    workers: set[int]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    before = segments()
    repo = tmp_path_factory.mktemp("hostile") / "repo"
    write_pixel_detector(repo)
    env = {"RINGSERVE_MAX_BODY_BYTES": str(MAX_BODY), "RINGSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    with Appliance(repo, workers=2, env=env) as appliance:
        appliance.snapshot = Snapshot(appliance.engine_pid(), set(appliance.worker_pids()))  # type: ignore[attr-defined]
        yield appliance
    # The module's no-leak check: every segment this module's appliance made is gone.
    left = sorted(s for s in segments() - before if not pid_alive(int(s.split("-")[2])))
    assert not left, f"segments left in /dev/shm: {left}"


@pytest.fixture(scope="module")
def client(app: Appliance) -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as c:
        yield c


def test_case_count() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(app: Appliance, client: httpx.Client, case: Case) -> None:
    r = case.send(client, app.url)
    assert r.status_code == case.status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    rid = r.headers["x-request-id"]
    assert len(r.headers.get_list("x-request-id")) == 1
    assert "access-control-allow-origin" not in r.headers  # no CORS by default: no other origin reads this
    assert body["request_id"] == rid
    if case.status != 200:
        assert set(body) == {"error", "detail", "request_id"}, body
        assert body["error"] == case.error, body
        assert body["detail"], body
        if case.closes:  # answered before the body was read: the connection must go
            assert r.headers.get("connection") == "close"
        return
    assert body["image"] == {"width": case.size[0], "height": case.size[1]}
    [det] = body["detections"]
    assert det["bbox"] == pytest.approx(expected_box(case.rgb or RGB, *case.size), abs=case.tolerance)
    if case.id == "hostile-request-id-is-replaced":
        assert rid != "a\tb" + "x" * 500 and rid.isalnum()


def test_nothing_changed_after_hostile_input(app: Appliance, client: httpx.Client) -> None:
    """Runs after the cases (file order): same processes, engine connected, no slot held or loss seen."""
    snap: Snapshot = app.snapshot  # type: ignore[attr-defined]
    assert app.engine_pid() == snap.engine
    assert set(app.worker_pids()) == snap.workers
    seen: dict[int, dict] = {}

    def every_worker_clean() -> bool:
        h = httpx.get(f"{app.url}/health", timeout=5).json()  # a new connection: any worker may take it
        seen[h["worker"]["pid"]] = h
        return set(seen) >= snap.workers

    wait_for(every_worker_clean, 30, "/health from every worker")
    for h in seen.values():
        assert h["status"] == "healthy", h
        assert h["engine"]["connected"] and h["engine"]["restarts"] == 0, h
        assert h["engine"]["losses_seen_by_worker"] == 0, h
        assert h["worker"]["ring_in_use"] == 0 and h["worker"]["in_flight"] == 0, h
    for i in range(4):
        rgb = (10 + i, 200, 30)
        r = client.post(
            f"{app.url}{PREDICT}", content=encode(flat(rgb=rgb), "PNG"), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["detections"][0]["bbox"] == pytest.approx(expected_box(rgb, *SIZE), abs=0.6)
    log = app.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]


def test_cases_cover_the_brief() -> None:
    """The kinds of hostile input the issue names, each present at least once."""
    ids = " ".join(c.id for c in CASES)
    for word in (
        "empty",
        "truncated-jpeg",
        "65535",
        "bomb",
        "cmyk",
        "greyscale-jpeg",
        "16-bit",
        "palette",
        "rgba",
        "exif",
        "invalid-base64",
        "base64-of",
        "content-type",
        "content-length-over",
        "endless",
        "nan",
        "negative",
        "over-1",
        "max-detections-0",
        "huge",
        "json-unknown",
        "multipart-unknown",
        "multipart-without",
        "not-an-object",
        "image-null",
        "gif",
        "bmp",
        "webp",
        "tiff",
        "zero-byte",
        "slow-body",
        "unknown-model",
        "version-0",
        "not-an-integer",
    ):
        assert word in ids, word
