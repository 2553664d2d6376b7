"""One image path for every protocol (issue 13), against the real appliance (real engine, workers).

- the same image and parameters give the same answer, and the same bad input the same error
  reason, through REST multipart/JSON/raw, batch, WebSocket and V2 (V2's statuses differ by design);
- the deadline counts from acceptance: a request queued behind decoding work past its deadline is a
  504 at its deadline and is never decoded; the decode queue is bounded (503 + Retry-After at once);
- no protocol decodes on the event loop: /health/live stays fast while V2 decodes the largest images;
- decoding a 7000 x 7000 16-bit PNG grows the worker's peak RSS by less than 300 MB.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from frontend.v2.codec import serialize_bytes
from frontend.v2.errors import _text as v2_text
from tests.harness import Appliance
from tests.models import expected_box, write_pixel_detector

MAX_PIXELS = 1_000_000
BIG = 7000  # a side of the largest images of the tests (49 megapixels, inside the default limit)
QUEUED = 8  # large PNGs queued for decoding ahead of a request with a short deadline


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def gradient_png(side: int = BIG, *, bits: int = 8) -> bytes:
    """A large PNG that compresses to a few hundred KB: long to inflate, small on the wire."""
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    if bits == 16:
        grey = np.broadcast_to((ramp * 65535).astype(np.uint16)[:, None], (side, side))
        im = Image.fromarray(np.ascontiguousarray(grey))
        assert im.mode == "I;16"
    else:
        row = (ramp * 255).astype(np.uint8)
        im = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row[:, None, None], (side, side, 3))))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def ws_url(app: Appliance, path: str = "/ws/stream") -> str:
    return app.url.replace("http://", "ws://") + path


def worker_pid(app: Appliance) -> int:
    return int(httpx.get(f"{app.url}/health", timeout=5).json()["worker"]["pid"])


def decoded_images(app: Appliance) -> float:
    """How many images the workers have decoded (the decode histogram's count)."""
    text = httpx.get(f"{app.url}/metrics", timeout=5).text
    found = re.search(r"^ringserve_decode_duration_seconds_count (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("repo")
    write_pixel_detector(path)
    return path


@pytest.fixture(scope="module")
def big() -> bytes:
    return gradient_png()


# --------------------------------------------------------------------------- one answer, one reason
@pytest.fixture(scope="module")
def small_app(repo: Path) -> Iterator[Appliance]:
    with Appliance(repo, workers=2, env={"RINGSERVE_MAX_PIXELS": str(MAX_PIXELS)}) as app:
        yield app


Sent = tuple[int, Any]  # (HTTP status, the answer: a result or an error body)


def rest_multipart(app: Appliance, data: bytes, params: dict[str, str]) -> Sent:
    r = httpx.post(f"{app.url}/api/v1/predict", files={"image": ("x", data, "image/png")}, data=params, timeout=30)
    return r.status_code, r.json()


def rest_json(app: Appliance, data: bytes | str, params: dict[str, str]) -> Sent:
    b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
    body = {"image_b64": b64, **{k: json.loads(v) for k, v in params.items()}}
    r = httpx.post(f"{app.url}/api/v1/predict", json=body, timeout=30)
    return r.status_code, r.json()


def rest_raw(app: Appliance, data: bytes, params: dict[str, str]) -> Sent:
    r = httpx.post(f"{app.url}/api/v1/predict", content=data, params=params, headers={"content-type": "image/png"})
    return r.status_code, r.json()


def batch(app: Appliance, data: bytes | str, params: dict[str, str], *, as_json: bool) -> Sent:
    if as_json:
        b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
        item = {"image_b64": b64, **{k: json.loads(v) for k, v in params.items()}}
        r = httpx.post(f"{app.url}/api/v1/predict/batch", json={"images": [item]}, timeout=30)
    else:
        assert isinstance(data, bytes)
        files = [("images", ("x", data, "image/png"))]
        r = httpx.post(f"{app.url}/api/v1/predict/batch", files=files, data=params, timeout=30)
    body = r.json()
    if r.status_code != 200:
        return r.status_code, body  # a whole-request error
    (item_answer,) = body["results"]
    return 200, item_answer


def stream(app: Appliance, data: bytes | str, params: dict[str, str], *, as_text: bool) -> Sent:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    try:
        ws = connect(ws_url(app) + (f"?{query}" if query and not as_text else ""), proxy=None)
    except InvalidStatus as exc:  # the handshake is refused with the REST error
        return exc.response.status_code, json.loads(exc.response.body or b"{}")
    with ws:
        if as_text:
            b64 = data if isinstance(data, str) else base64.b64encode(data).decode()
            ws.send(json.dumps({"image_b64": b64, **{k: json.loads(v) for k, v in params.items()}}))
        else:
            assert isinstance(data, bytes)
            ws.send(data)
        return 200, json.loads(ws.recv(timeout=30))


def v2(app: Appliance, data: bytes | str, params: dict[str, str], *, binary: bool) -> Sent:
    parameters = {k: json.loads(v) for k, v in params.items() if k != "timeout_s"}
    inp: dict[str, Any] = {"name": "image", "shape": [1], "datatype": "BYTES"}
    if binary:
        assert isinstance(data, bytes)
        blob = serialize_bytes([data])
        inp["parameters"] = {"binary_data_size": len(blob)}
    else:
        blob = b""
        inp["data"] = [data if isinstance(data, str) else base64.b64encode(data).decode()]
    header = json.dumps(
        {
            "inputs": [inp],
            "outputs": [{"name": "detections", "parameters": {"binary_data": False}}],
            **({"parameters": parameters} if parameters else {}),
        }
    ).encode()
    headers = {"Inference-Header-Content-Length": str(len(header))} if binary else {}
    r = httpx.post(f"{app.url}/v2/models/pixels/infer", content=header + blob, headers=headers, timeout=30)
    return r.status_code, r.json()


SENDERS: dict[str, Callable[[Appliance, Any, dict[str, str]], Sent]] = {
    "rest-multipart": rest_multipart,
    "rest-json": rest_json,
    "rest-raw": rest_raw,
    "batch-multipart": lambda a, d, p: batch(a, d, p, as_json=False),
    "batch-json": lambda a, d, p: batch(a, d, p, as_json=True),
    "ws-binary": lambda a, d, p: stream(a, d, p, as_text=False),
    "ws-text": lambda a, d, p: stream(a, d, p, as_text=True),
    "v2-binary": lambda a, d, p: v2(a, d, p, binary=True),
    "v2-json": lambda a, d, p: v2(a, d, p, binary=False),
}
BINARY_ONLY = {"rest-multipart", "rest-raw", "batch-multipart", "ws-binary", "v2-binary"}
# REST status of each error reason, and V2's (Triton's: every bad input is an INVALID_ARG 400)
REST_STATUS = {"bad_input": 400, "too_large": 413, "invalid_parameter": 422}

GOOD = png((200, 40, 90))
CASES: dict[str, tuple[bytes | str, dict[str, str], str]] = {  # input, parameters, expected reason
    "truncated": (GOOD[:60], {}, "bad_input"),
    "over-max-pixels": (png((1, 2, 3), (1100, 1000)), {}, "too_large"),
    "not-an-image": (b"this is text, not an image" * 4, {}, "bad_input"),
    "fake-gif": (b"GIF87a and then no image at all" * 4, {}, "bad_input"),
    "empty": (b"", {}, "bad_input"),
    "threshold-over-1": (GOOD, {"confidence_threshold": "2"}, "invalid_parameter"),
    "max-detections-0": (GOOD, {"max_detections": "0"}, "invalid_parameter"),
    "bad-base64": ("@@@ not base64 @@@", {}, "bad_input"),
}


def error_of(name: str, sent: Sent) -> tuple[str, str]:
    """(reason, detail as text) of an error answer, checking the status each protocol should use."""
    status, body = sent
    if name.startswith("v2"):
        assert status == 400, body
        return "", body["error"]
    reason = body["error"]
    if name.startswith("ws") or (name.startswith("batch") and status == 200):
        return reason, v2_text(body["detail"])  # an error in its place: the connection/request goes on
    assert status == REST_STATUS[reason], body
    return reason, v2_text(body["detail"])


@pytest.mark.parametrize("case", list(CASES))
def test_same_error_reason_through_every_protocol(small_app: Appliance, case: str) -> None:
    data, params, reason = CASES[case]
    details: dict[str, str] = {}
    for name, send in SENDERS.items():
        if isinstance(data, str) and name in BINARY_ONLY:
            continue  # base64 only exists in the JSON forms
        got, detail = error_of(name, send(small_app, data, params))
        if not name.startswith("v2"):
            assert got == reason, (name, detail)
        details[name] = detail
    # The same words everywhere: V2 says what REST says (base64: the field's name differs).
    texts = {"not valid base64" if "not valid base64" in d else d for d in details.values()}
    assert len(texts) == 1, details


def test_same_answer_through_every_protocol(small_app: Appliance) -> None:
    rgb, size = (200, 40, 90), (96, 64)
    want = expected_box(rgb, *size)
    for name, send in SENDERS.items():
        status, body = send(small_app, png(rgb, size), {"confidence_threshold": "0.5"})
        assert status == 200, (name, body)
        if name.startswith("v2"):
            detections = json.loads(body["outputs"][0]["data"][0])
        else:
            assert body["image"] == {"width": 96, "height": 64}, name
            detections = body["detections"]
        assert len(detections) == 1, (name, detections)
        assert detections[0]["label"] == "thing" and detections[0]["confidence"] == 0.9, name
        assert detections[0]["bbox"] == pytest.approx(want, abs=0.6), name


# --------------------------------------------------------------------------- deadlines and the queue
def test_deadline_counts_from_acceptance_504_without_decoding(repo: Path, big: bytes) -> None:
    """A request queued behind large PNGs (seconds of decoding) with timeout_s=1 is a 504 at its
    deadline, not a late 200, and is never decoded."""
    # The queued batch's own deadline must cover its seconds of decoding (the default is 10 s).
    with Appliance(repo, workers=1, env={"RINGSERVE_REQUEST_TIMEOUT_S": "120"}) as app:

        async def go() -> tuple[list[int], httpx.Response, float, float]:
            async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:
                files = [("images", (f"{i}.png", big, "image/png")) for i in range(QUEUED)]
                queued = asyncio.create_task(client.post("/api/v1/predict/batch", files=files))
                before = decoded_images(app)
                while decoded_images(app) == before:  # the first image is decoded: 11 wait behind
                    assert not queued.done(), queued.result().text
                    await asyncio.sleep(0.02)
                started = time.monotonic()
                late = await client.post(
                    "/api/v1/predict",
                    content=png((1, 2, 3)),
                    params={"timeout_s": "1"},
                    headers={"content-type": "image/png"},
                )
                waited = time.monotonic() - started
                results = (await queued).json()["results"]
                assert all("detections" in r for r in results), results
                return [1 for _ in results], late, waited, before

        answered, late, waited, before = asyncio.run(go())
        assert sum(answered) == QUEUED
        assert late.status_code == 504 and late.json()["error"] == "timeout", late.text
        assert waited < 1.8, f"the 504 came {waited:.2f}s after the request, its deadline was 1s"
        assert decoded_images(app) == before + QUEUED  # the batch's images; the late one was not decoded


@pytest.mark.parametrize("bound", ["images", "bytes"])
def test_decode_queue_is_bounded(repo: Path, big: bytes, bound: str) -> None:
    """Past the worker's decode queue bound (in images, or in bytes), a request is refused at once."""
    env = (
        {"RINGSERVE_DECODE_QUEUE_IMAGES": "2"}
        if bound == "images"
        else {"RINGSERVE_DECODE_QUEUE_BYTES": str(len(big) * 3 // 2)}
    )
    with Appliance(repo, workers=1, env=env) as app:

        async def one(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            r = await client.post("/api/v1/predict", content=big, headers={"content-type": "image/png"})
            return r, time.monotonic() - started

        async def go() -> list[tuple[httpx.Response, float]]:
            async with httpx.AsyncClient(base_url=app.url, timeout=120) as client:
                return await asyncio.gather(*(one(client) for _ in range(6)))

        answers = asyncio.run(go())
    refused = [(r, t) for r, t in answers if r.status_code == 503]
    served = [(r, t) for r, t in answers if r.status_code == 200]
    assert refused and served and len(refused) + len(served) == 6, [r.text for r, _ in answers]
    for r, took in refused:
        assert r.json()["error"] == "overload" and r.headers["retry-after"] == "1"
        assert took < min(t for _, t in served), "a refusal must not wait for the decodes"


# --------------------------------------------------------------------------- the event loop
def test_health_live_stays_fast_while_v2_decodes_the_largest_images(repo: Path, big: bytes) -> None:
    """V2 BYTES of four 7000 x 7000 PNGs: the worker keeps answering and keeps its engine."""
    with Appliance(repo, workers=1) as app:
        blob = serialize_bytes([big] * 4)
        header = json.dumps(
            {
                "inputs": [
                    {"name": "image", "shape": [4], "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
                ]
            }
        ).encode()
        statuses: list[int] = []

        def infer() -> None:
            with httpx.Client(base_url=app.url, timeout=120) as client:
                for _ in range(2):
                    r = client.post(
                        "/v2/models/pixels/infer",
                        content=header + blob,
                        headers={"Inference-Header-Content-Length": str(len(header))},
                    )
                    statuses.append(r.status_code)

        sender = threading.Thread(target=infer)
        latencies: list[float] = []
        with httpx.Client(base_url=app.url, timeout=10) as probe:
            sender.start()
            while sender.is_alive():
                started = time.perf_counter()
                assert probe.get("/health/live").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)  # the probe's pace, not a wait for readiness
        sender.join()
        log = app.log()
    assert statuses == [200, 200]
    assert len(latencies) > 50
    p99 = float(np.percentile(latencies, 99))
    assert p99 < 0.1, f"/health/live p99 {p99 * 1000:.0f} ms while the worker decoded"
    assert "engine lost" not in log


# --------------------------------------------------------------------------- decode memory
def _peak_rss_reset(pid: int) -> int:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the kernel's peak RSS starts again from now
    return _status(pid, "VmRSS")


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_16bit_png_decode_grows_peak_rss_less_than_300mb(repo: Path) -> None:
    data = gradient_png(bits=16)
    with Appliance(repo, workers=1) as app:
        pid = worker_pid(app)
        warm = httpx.post(f"{app.url}/api/v1/predict", content=png((5, 5, 5)), headers={"content-type": "image/png"})
        assert warm.status_code == 200
        before = _peak_rss_reset(pid)
        r = httpx.post(f"{app.url}/api/v1/predict", content=data, headers={"content-type": "image/png"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["image"] == {"width": BIG, "height": BIG}
        growth = _status(pid, "VmHWM") - before
    assert growth < 300 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MB for {len(data)} bytes of 16-bit PNG"
