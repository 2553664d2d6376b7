"""Integration: ``WS /ws/stream`` against the real appliance (engine, one uvicorn worker, shared memory)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from frontend.params import Params
from frontend.routes.stream import Options, Stream
from frontend.service import ImageService
from frontend.settings import Settings
from tests.fake_engine import FakeEngine
from tests.harness import Appliance, segments, wait_for
from tests.models import expected_box, write_pixel_detector

KEY = "stream-test-key"
AUTH = {"X-API-Key": KEY}
MAX_BODY = 1_000_000
MAX_PIXELS = 1_000_000
SLOW_MS = 500  # about the most the "slow" model takes per run: 40 512x512 MatMuls, 0.1-0.4 s here


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91 + 13) % 256, (i * 53 + 101) % 256


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(Image.new("RGB", size, rgb))


def muted(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour with room for +-16 of noise."""
    r, g, b = (min(max(c, 16), 239) for c in rgb)
    return r, g, b


def noisy_png(rgb: tuple[int, int, int], size: tuple[int, int], seed: int) -> bytes:
    """A large PNG (noise does not compress) whose mean colour is ``muted(rgb)`` within a fraction of a level."""
    rng = np.random.default_rng(seed)
    base = np.array(muted(rgb), dtype=np.int16)
    noise = rng.integers(-16, 17, size=(size[1], size[0], 3), dtype=np.int16)
    return encode(Image.fromarray((base + noise).astype(np.uint8)))


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """One appliance for the module: one worker (so /health shows THE ring), an API key, tight limits."""
    repo = tmp_path_factory.mktemp("repo")
    write_pixel_detector(repo)
    write_pixel_detector(repo, "slow", max_batch_size=8, delay_ms=0.0, busy=40)
    env = {"RINGSERVE_API_KEY": KEY, "RINGSERVE_MAX_BODY_BYTES": str(MAX_BODY), "RINGSERVE_MAX_PIXELS": str(MAX_PIXELS)}
    with Appliance(repo, workers=1, env=env) as appliance:
        pid = worker_health(appliance)["pid"]
        yield appliance
    left = {name for name in segments() if name.split("-")[2] == str(pid)}
    assert not left, f"the worker left shared-memory segments behind: {left}"


def ws_url(app: Appliance, path: str) -> str:
    return app.url.replace("http://", "ws://") + path


def open_ws(app: Appliance, path: str, **kwargs: Any) -> connect:
    return connect(ws_url(app, path), additional_headers=AUTH, compression=None, proxy=None, **kwargs)


def worker_health(app: Appliance) -> dict[str, Any]:
    return httpx.get(f"{app.url}/health", timeout=5).json()["worker"]  # type: ignore[no-any-return]


def idle(worker: dict[str, Any]) -> bool:
    return worker["ring_in_use"] == 0 and worker["in_flight"] == 0


async def recv_json(ws: ClientConnection, timeout: float = 15) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))  # type: ignore[no-any-return]


async def recv_until(ws: ClientConnection, last_id: object, timeout: float = 30) -> list[dict[str, Any]]:
    """Every reply up to and including the one for ``last_id`` (the newest frame is always answered)."""
    replies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not replies or replies[-1]["frame_id"] != last_id:
        replies.append(await recv_json(ws, deadline - time.monotonic()))
    return replies


def check_stream(
    replies: list[dict[str, Any]],
    sent: dict[Any, tuple[int, int, int]],
    order: list[Any],
    size: tuple[int, int],
    abs_tol: float = 0.6,
) -> None:
    """Ids sent, in order, no errors, own box for each; dropped + answered == sent."""
    assert all("error" not in r for r in replies), [r for r in replies if "error" in r][:3]
    ids = [r["frame_id"] for r in replies]
    assert set(ids) <= set(sent)
    positions = [order.index(i) for i in ids]
    assert positions == sorted(positions) and len(set(positions)) == len(positions), "replies out of order"
    assert replies[-1]["dropped"] + len(replies) == len(sent)
    assert [r["dropped"] for r in replies] == sorted(r["dropped"] for r in replies)
    for r in replies:
        [det] = r["detections"]
        assert r["image"] == {"width": size[0], "height": size[1]}
        assert det["bbox"] == pytest.approx(expected_box(sent[r["frame_id"]], *size), abs=abs_tol), r


def test_fast_stream_answers_each_frame_with_its_own_box(app: Appliance, no_leaks: None) -> None:
    """200 distinct frames as fast as the socket takes them, ids in a 4-byte header."""
    pid = worker_health(app)["pid"]

    async def burst(n: int, first_id: int) -> tuple[list[dict[str, Any]], dict[int, tuple[int, int, int]]]:
        sent = {first_id + 7 * i: colour(i) for i in range(n)}
        frames = [struct.pack(">I", fid) + png(rgb) for fid, rgb in sent.items()]
        async with open_ws(app, "/ws/stream?framing=id") as ws:

            async def send_all() -> None:
                for frame in frames:
                    await ws.send(frame)

            sender = asyncio.create_task(send_all())
            replies = await recv_until(ws, max(sent))
            await sender
        return replies, sent

    asyncio.run(burst(50, 10))  # warm up the worker's allocations
    before = rss(pid)
    replies, sent = asyncio.run(burst(200, 1000))
    grown = rss(pid) - before
    check_stream(replies, sent, list(sent), (96, 64))
    assert grown < 8 * 2**20, f"worker RSS grew by {grown / 2**20:.1f} MiB over 200 frames"
    wait_for(lambda: idle(worker_health(app)), 10, "the ring to be empty")


def test_latest_frame_wins_when_the_model_is_slower(app: Appliance, no_leaks: None) -> None:
    """JSON frames at a model that takes SLOW_MS per frame: stale frames are dropped and counted."""
    sent = {f"f{i}": colour(i) for i in range(20)}

    async def go() -> list[dict[str, Any]]:
        async with open_ws(app, "/ws/stream/slow") as ws:
            for fid, rgb in sent.items():
                await ws.send(json.dumps({"frame_id": fid, "image_b64": base64.b64encode(png(rgb)).decode()}))
            return await recv_until(ws, "f19")

    replies = asyncio.run(go())
    check_stream(replies, sent, list(sent), (96, 64))
    assert len(replies) <= 4, [r["frame_id"] for r in replies]  # 20 frames sent in far less than SLOW_MS
    assert replies[-1]["dropped"] >= 16


def test_slow_reader_does_not_grow_worker_memory(app: Appliance, no_leaks: None) -> None:
    """A client that sends large frames and reads nothing for a while: two frames held, not a queue.

    The replies back up in the socket buffers here; ``test_blocked_send_holds_one_waiting_frame``
    covers a reply send that blocks outright.
    """
    pid = worker_health(app)["pid"]
    size = (400, 400)
    images = {k: noisy_png(colour(k), size, seed=k) for k in range(8)}
    frame_bytes = len(images[0])
    n = 200
    assert frame_bytes * n > 60 * 2**20  # what a queue of them would cost

    async def go() -> tuple[list[dict[str, Any]], list[int]]:
        async with open_ws(app, "/ws/stream", max_queue=1) as ws:
            samples = [rss(pid)]
            for i in range(n):
                await ws.send(images[i % 8])
                if i % 40 == 39:
                    samples.append(rss(pid))
                    health = await asyncio.to_thread(worker_health, app)
                    assert health["ring_in_use"] <= 1 and health["in_flight"] <= 1, health
            samples.append(rss(pid))
            return await recv_until(ws, n - 1), samples  # now read everything

    replies, samples = asyncio.run(go())
    check_stream(replies, {i: muted(colour(i % 8)) for i in range(n)}, list(range(n)), size, abs_tol=1.5)
    grown = max(samples) - samples[0]
    assert grown < 16 * 2**20, f"worker RSS grew by {grown / 2**20:.1f} MiB ({frame_bytes * n / 2**20:.0f} MiB sent)"


def test_bad_frames_get_errors_in_place_and_the_stream_goes_on(app: Appliance, no_leaks: None) -> None:
    good = png((200, 100, 50))
    jpeg = encode(Image.new("RGB", (120, 80), (40, 180, 90)), "JPEG")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    frames: list[str | bytes] = [
        b"this is not an image",
        good,
        b"\x89PNG\r\n\x1a\n" + bytes(MAX_BODY),  # over the per-frame byte limit
        png((1, 2, 3), (1100, 1000)),  # over the pixel limit
        "{not json",
        json.dumps({"frame_id": "a", "image_b64": "!!!"}),
        json.dumps({"frame_id": 9, "image_b64": b64(good), "confidence_threshold": 0.95}),
        json.dumps({"frame_id": 10, "image_b64": b64(good), "confidence_threshold": 3}),
        jpeg,
    ]

    async def go() -> list[dict[str, Any]]:
        async with open_ws(app, "/ws/stream", max_size=None) as ws:
            replies = []
            for frame in frames:  # one at a time: nothing is dropped
                await ws.send(frame)
                replies.append(await recv_json(ws))
            return replies

    replies = asyncio.run(go())
    got = [(r["frame_id"], r.get("error")) for r in replies]
    assert got == [
        (0, "bad_input"),
        (1, None),
        (2, "too_large"),
        (3, "too_large"),
        (4, "invalid_parameter"),
        ("a", "bad_input"),
        (9, None),
        (10, "invalid_parameter"),
        (8, None),
    ]
    assert all(set(r) == {"frame_id", "error", "detail", "dropped"} for r in replies if "error" in r)
    assert replies[1]["detections"][0]["bbox"] == pytest.approx(expected_box((200, 100, 50), 96, 64), abs=0.6)
    assert replies[6]["detections"] == []  # the frame's own threshold (0.95) is above the score (0.9)
    assert replies[8]["detections"][0]["bbox"] == pytest.approx(expected_box((40, 180, 90), 120, 80), abs=1.5)
    assert all(r["dropped"] == 0 for r in replies)

    async def short_header() -> dict[str, Any]:
        async with open_ws(app, "/ws/stream?framing=id") as ws:
            await ws.send(b"\x00\x01")
            return await recv_json(ws)

    assert asyncio.run(short_header())["error"] == "bad_input"


def test_handshake_refusals(app: Appliance, no_leaks: None) -> None:
    """No API key, an unknown model or bad query parameters: an HTTP error instead of the upgrade."""

    async def status(path: str, headers: dict[str, str] | None) -> tuple[int, bytes]:
        try:
            async with connect(ws_url(app, path), additional_headers=headers, proxy=None):
                return 101, b""
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.body or b""

    # RequestContext refuses the handshake: 401 through the WebSocket denial-response extension
    # (uvicorn has it), 403 where it can only close before accepting.
    for headers in (None, {"X-API-Key": "wrong"}):
        code, _ = asyncio.run(status("/ws/stream", headers))
        assert code in (401, 403), code
    assert asyncio.run(status("/ws/stream", {"Authorization": f"Bearer {KEY}"}))[0] == 101
    code, body = asyncio.run(status("/ws/stream/nope", AUTH))
    assert code == 404 and json.loads(body)["error"] == "model_not_found"
    code, body = asyncio.run(status("/ws/stream?framing=weird", AUTH))
    assert code == 422 and set(json.loads(body)) == {"error", "detail", "request_id"}
    code, body = asyncio.run(status("/ws/stream?confidence_threshold=2", AUTH))
    assert code == 422
    code, body = asyncio.run(status("/ws/stream?colour=red", AUTH))
    assert code == 422 and "colour" in str(json.loads(body)["detail"])


def test_disconnect_with_a_frame_in_flight_frees_its_slot(app: Appliance, no_leaks: None) -> None:
    async def go() -> None:
        async with open_ws(app, "/ws/stream/slow") as ws:
            for i in range(2):  # one in flight, one waiting
                await ws.send(png(colour(i)))
            await asyncio.to_thread(
                wait_for, lambda: worker_health(app)["ring_in_use"] == 1, SLOW_MS / 1000 * 4, "a frame in flight"
            )
            ws.transport.abort()  # no close handshake: the client just vanishes

    asyncio.run(go())
    wait_for(lambda: idle(worker_health(app)), 10, "the abandoned frame's slot to come back")
    wait_for(lambda: "stream closed" in app.log(), 10, "the worker to close the stream")
    r = httpx.post(f"{app.url}/api/v1/predict", content=png((7, 8, 9)), headers={"content-type": "image/png", **AUTH})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------ the Stream object, without processes
class FakeSocket:
    """The ASGI side of one connection: frames to deliver, and sends that block while ``paused``."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.connect"})
        self.sent: list[dict[str, Any]] = []
        self.writable = asyncio.Event()
        self.writable.set()

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.send":
            await self.writable.wait()  # like uvicorn's send while the transport is paused for writing
        self.sent.append(message)

    def replies(self) -> list[dict[str, Any]]:
        return [json.loads(m["text"]) for m in self.sent if m["type"] == "websocket.send"]


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def open_stream(engine: FakeEngine, sock: FakeSocket, tmp_path: Path) -> tuple[Stream, asyncio.Task[None]]:
    settings = Settings(run_dir=tmp_path)
    state = SimpleNamespace(client=engine, settings=settings, service=ImageService(engine, settings))  # type: ignore[arg-type]
    scope = {
        "type": "websocket",
        "app": SimpleNamespace(state=state),
        "state": {"request_id": "t"},
        "path": "/ws/stream",
        "query_string": b"",
        "headers": [],
    }
    ws = WebSocket(scope, sock.receive, sock.send)  # type: ignore[arg-type]
    await ws.accept()
    stream = Stream(ws, "pixels", Options("raw", None, Params()))
    return stream, asyncio.create_task(stream.run())


def test_blocked_send_holds_one_waiting_frame(tmp_path: Path) -> None:
    """While a reply cannot be sent (the client does not read), new frames replace the waiting one."""

    async def go() -> None:
        sock = FakeSocket()
        sock.writable.clear()
        stream, task = await open_stream(FakeEngine(), sock, tmp_path)
        frames = [{"type": "websocket.receive", "bytes": png(colour(i))} for i in range(102)]
        sock.incoming.put_nowait(frames[0])
        await until(lambda: stream.busy)
        for frame in frames[1:]:
            sock.incoming.put_nowait(frame)
        await until(lambda: stream.received == 102)
        assert len(stream.waiting) == 1 and stream.dropped == 100  # frame 0 in flight, 101 waiting
        sock.writable.set()
        await until(lambda: len(sock.replies()) == 2)
        sock.incoming.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(task, 5)
        replies = sock.replies()
        assert [r["frame_id"] for r in replies] == [0, 101]
        assert replies[-1]["dropped"] + len(replies) == 102

    asyncio.run(go())


def test_disconnect_waits_for_the_frame_in_flight(tmp_path: Path) -> None:
    """The connection's task ends only after the engine answered the abandoned frame (its slot is free)."""

    async def go() -> None:
        engine, sock = FakeEngine(hold=True), FakeSocket()
        stream, task = await open_stream(engine, sock, tmp_path)
        sock.incoming.put_nowait({"type": "websocket.receive", "bytes": png((1, 2, 3))})
        sock.incoming.put_nowait({"type": "websocket.receive", "bytes": png((4, 5, 6))})
        await until(lambda: engine.started == 1 and stream.received == 2)
        sock.incoming.put_nowait({"type": "websocket.disconnect", "code": 1006})
        await until(lambda: stream.closed)
        assert not task.done()
        engine.release.set()
        await asyncio.wait_for(task, 5)
        assert engine.started == engine.finished == 1  # the waiting frame never went to the engine
        assert sock.replies() == []  # nothing is sent to a client that is gone

    asyncio.run(go())
