"""Integration: the real engine, real uvicorn workers, real shared memory and ZeroMQ."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.harness import Appliance, wait_for
from tests.models import expected_box, write_pixel_detector


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91 + 13) % 256, (i * 53 + 101) % 256


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


async def post(client: httpx.AsyncClient, url: str, i: int, how: str, size: tuple[int, int]) -> httpx.Response:
    data = png(colour(i), size)
    if how == "multipart":
        return await client.post(url, files={"image": ("x.png", data, "image/png")})
    if how == "json":
        return await client.post(url, json={"image_b64": base64.b64encode(data).decode()})
    return await client.post(url, content=data, headers={"content-type": "image/png"})


def assert_own_answer(response: httpx.Response, i: int, size: tuple[int, int]) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image"] == {"width": size[0], "height": size[1]}
    [det] = body["detections"]
    assert det["label"] == "thing"
    want = expected_box(colour(i), *size)
    assert det["bbox"] == pytest.approx(want, abs=0.6), (i, det["bbox"], want)


def test_every_response_answers_its_own_image(pixel_repo: Path, no_leaks: None) -> None:
    """240 concurrent requests with distinct images over 2 workers: no mix-up of slots/workers."""
    with Appliance(pixel_repo, workers=2, env={"RINGSERVE_RING_SLOTS": "64"}) as app:

        async def fire() -> list[tuple[int, tuple[int, int], httpx.Response]]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                jobs = []
                for i in range(240):
                    size = (64 + i % 7 * 16, 48 + i % 5 * 16)
                    how = ("multipart", "json", "raw")[i % 3]
                    jobs.append((i, size, post(client, f"{app.url}/api/v1/predict", i, how, size)))
                responses = await asyncio.gather(*(j[2] for j in jobs))
                return [(i, size, r) for (i, size, _), r in zip(jobs, responses, strict=False)]

        results = asyncio.run(fire())
        for i, size, response in results:
            assert_own_answer(response, i, size)
        batch_sizes = [r.json()["batch_size"] for _, _, r in results]
        assert max(batch_sizes) > 1, "the engine never formed a batch under concurrent load"
        pids = {r.headers["x-request-id"] for _, _, r in results}
        assert len(pids) == 240
        health = [httpx.get(f"{app.url}/health").json() for _ in range(6)]
        assert all(h["worker"]["ring_in_use"] == 0 for h in health)


def test_lone_request_does_not_wait_for_company(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo, max_batch_size=8, delay_ms=400.0)
    with Appliance(repo, workers=1) as app:
        for i in range(5):
            body = httpx.post(
                f"{app.url}/api/v1/predict", content=png(colour(i)), headers={"content-type": "image/png"}
            ).json()
            assert body["batch_size"] == 1
            # Nothing else is queued or running: the batcher runs it at once instead of waiting
            # max_queue_delay_ms (400) for requests that are not coming.
            assert body["timings"]["queue_ms"] < 200, body["timings"]


def test_request_id_is_echoed_and_logged_by_both_processes(pixel_repo: Path, no_leaks: None) -> None:
    with Appliance(pixel_repo, workers=2, env={"RINGSERVE_LOG_JSON": "1"}) as app:
        r = httpx.post(
            f"{app.url}/api/v1/predict",
            content=png((1, 2, 3)),
            headers={"content-type": "image/png", "x-request-id": "req-abc.123"},
        )
        assert r.status_code == 200
        assert r.headers["x-request-id"] == "req-abc.123"
        assert r.json()["request_id"] == "req-abc.123"
        wait_for(lambda: app.log().count("req-abc.123") >= 2, 10, "log lines of both processes")
        import orjson

        lines = [orjson.loads(x) for x in app.log().splitlines() if x.startswith("{") and "req-abc.123" in x]
        processes = {x["record"]["extra"]["process"] for x in lines}
        assert {"engine", "worker"} <= processes


def test_only_the_engine_loads_onnxruntime(pixel_repo: Path, no_leaks: None) -> None:
    with Appliance(pixel_repo, workers=2) as app:
        httpx.post(f"{app.url}/api/v1/predict", content=png((9, 9, 9)), headers={"content-type": "image/png"})

        def has_ort(pid: int) -> bool:
            return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()

        assert has_ort(app.engine_pid())
        workers = app.worker_pids()
        assert len(workers) == 2
        assert not any(has_ort(p) for p in workers)
        # and nothing else runs beside them: the launcher, the engine and the workers
        assert len(app.tree()) == 3, [p.cmdline() for p in app.tree()]


_BAD = [
    (b"this is not an image at all", "image/jpeg", 400),
    (b"", "image/png", 400),
    ("truncated", "image/jpeg", 400),
    ("huge-header", "image/jpeg", 413),
    (b"{}", "text/plain", 415),
]


def test_bad_input_basics(pixel_repo: Path, no_leaks: None) -> None:
    """Each bad body gets its 4xx JSON error, and the appliance keeps answering correctly after it.

    (tests/test_hostile.py has the full parametrised list; these are the core issue's basics.)
    """
    with Appliance(pixel_repo, workers=1) as app:
        for body, ctype, status in _BAD:
            r = httpx.post(f"{app.url}/api/v1/predict", content=_bad_body(body), headers={"content-type": ctype})
            assert r.status_code == status, (body if isinstance(body, str) else body[:20], r.text)
            assert set(r.json()) == {"error", "detail", "request_id"}
            ok = httpx.post(
                f"{app.url}/api/v1/predict", content=png((200, 100, 50)), headers={"content-type": "image/png"}
            )
            assert ok.status_code == 200, ok.text
            assert ok.json()["detections"][0]["bbox"] == pytest.approx(expected_box((200, 100, 50), 96, 64), abs=0.6)


def _bad_body(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 200, 30)).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    if body == "truncated":
        return jpeg[: len(jpeg) // 2]
    # a valid JPEG whose SOF0 header claims 60000 x 60000 pixels
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big") + jpeg[i + 9 :]
