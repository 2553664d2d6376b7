"""Integration: ``POST /api/v1/predict/batch`` against the real appliance."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.harness import Appliance, segments, wait_for
from tests.models import expected_box, write_pixel_detector

RING_SLOTS = 8  # fewer slots than a full batch has images
MAX_PIXELS = 1_000_000


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91 + 13) % 256, (i * 53 + 101) % 256


def size_of(i: int) -> tuple[int, int]:
    return 64 + i % 7 * 16, 48 + i % 5 * 16


def encode(rgb: tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt)
    return buf.getvalue()


BAD = {  # kind -> (bytes, the error it must get)
    "garbage": (b"certainly not an image", "bad_input"),
    "empty": (b"", "bad_input"),
    "huge": (encode((1, 2, 3), (1100, 1000)), "too_large"),
    "truncated": (encode((9, 9, 9), (200, 100), "JPEG")[:300], "bad_input"),
}


def batch_images(n: int = 32) -> list[tuple[bytes, str | None]]:
    """Image i: every fourth one broken (in turn each kind of BAD), the others PNG of colour(i)."""
    kinds = list(BAD)
    out: list[tuple[bytes, str | None]] = []
    for i in range(n):
        if i % 4 == 3:
            out.append(BAD[kinds[i // 4 % len(kinds)]])
        else:
            out.append((encode(colour(i), size_of(i)), None))
    return out


def multipart(images: list[tuple[bytes, str | None]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(images)]


def check_results(body: dict[str, Any], images: Sequence[tuple[bytes, str | None]]) -> None:
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(images)))
    for i, ((_, error), r) in enumerate(zip(images, results, strict=True)):
        if error is not None:
            assert set(r) == {"index", "error", "detail"} and r["error"] == error, r
            continue
        assert "error" not in r, r
        assert r["image"] == {"width": size_of(i)[0], "height": size_of(i)[1]}
        [det] = r["detections"]
        assert det["bbox"] == pytest.approx(expected_box(colour(i), *size_of(i)), abs=0.6), (i, r)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("repo")
    write_pixel_detector(repo, max_batch_size=8, delay_ms=5.0)
    env = {"RINGSERVE_RING_SLOTS": str(RING_SLOTS), "RINGSERVE_MAX_PIXELS": str(MAX_PIXELS)}
    with Appliance(repo, workers=1, env=env) as appliance:
        pid = httpx.get(f"{appliance.url}/health").json()["worker"]["pid"]
        yield appliance
    left = {name for name in segments() if name.split("-")[2] == str(pid)}
    assert not left, f"the worker left shared-memory segments behind: {left}"


def ring_idle(app: Appliance) -> bool:
    worker = httpx.get(f"{app.url}/health").json()["worker"]
    return worker["ring_in_use"] == 0 and worker["in_flight"] == 0


def test_mixed_multipart_batch(app: Appliance, no_leaks: None) -> None:
    """32 images, a quarter broken: 200, each valid one its own box, each broken one its error in place."""
    images = batch_images()
    r = httpx.post(f"{app.url}/api/v1/predict/batch", files=multipart(images), timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "pixels", "version": 1}
    assert body["request_id"] == r.headers["x-request-id"]
    check_results(body, images)
    sizes = [x["batch_size"] for x in body["results"] if "batch_size" in x]
    assert max(sizes) > 1, "the images of a batch request never ran together"
    wait_for(lambda: ring_idle(app), 10, "the ring to be empty")


def test_json_batch_with_per_image_parameters(app: Appliance, no_leaks: None) -> None:
    good = encode((200, 100, 50), (96, 64))
    b64 = base64.b64encode(good).decode()
    items: list[Any] = [
        {"image_b64": b64},
        {"image_b64": "###"},
        {"image_b64": b64, "confidence_threshold": 0.95},  # above the model's score (0.9)
        {"image_b64": b64, "confidence_threshold": 5},
        {"confidence_threshold": 0.1},
        "not an object",
        {"image_b64": b64, "colour": "blue"},
        {"image_b64": base64.b64encode(BAD["garbage"][0]).decode()},
    ]
    r = httpx.post(f"{app.url}/api/v1/models/pixels/predict/batch", json={"images": items}, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x.get("error") for x in results] == [
        None,
        "bad_input",
        None,
        "invalid_parameter",
        "invalid_parameter",
        "invalid_parameter",
        "invalid_parameter",
        "bad_input",
    ]
    assert results[0]["detections"][0]["bbox"] == pytest.approx(expected_box((200, 100, 50), 96, 64), abs=0.6)
    assert results[2]["detections"] == []
    # query parameters are the defaults of every image
    r = httpx.post(f"{app.url}/api/v1/predict/batch?confidence_threshold=0.95", json={"images": items[:1]})
    assert r.json()["results"][0]["detections"] == []


@pytest.mark.parametrize(
    ("how", "status", "error"),
    [
        ("33 multipart", 413, "too_large"),
        ("33 json", 413, "too_large"),
        ("0 json", 422, "invalid_parameter"),
        ("no images field", 422, "invalid_parameter"),
        ("bad form field", 422, "invalid_parameter"),
        ("unknown query parameter", 422, "invalid_parameter"),
        ("a file in another field", 422, "invalid_parameter"),
        ("raw body", 415, "unsupported_media"),
        ("unknown model", 404, "model_not_found"),
    ],
)
def test_whole_request_errors(app: Appliance, no_leaks: None, how: str, status: int, error: str) -> None:
    png = encode((1, 2, 3), (8, 8))
    url = f"{app.url}/api/v1/predict/batch"
    b64 = base64.b64encode(png).decode()
    requests: dict[str, dict[str, Any]] = {
        "33 multipart": {"files": [("images", ("x.png", png, "image/png"))] * 33},
        "33 json": {"json": {"images": [{"image_b64": b64}] * 33}},
        "0 json": {"json": {"images": []}},
        "no images field": {"files": [("image", ("x.png", png, "image/png"))]},
        "bad form field": {"files": [("images", ("x.png", png, "image/png"))], "data": {"max_detections": "0"}},
        "unknown query parameter": {"json": {"images": [{"image_b64": b64}]}, "params": {"colour": "red"}},
        "a file in another field": {
            "files": [("images", ("x.png", png, "image/png")), ("max_detections", ("y.png", png, "image/png"))]
        },
        "raw body": {"content": png, "headers": {"content-type": "image/png"}},
        "unknown model": {"json": {"images": [{"image_b64": b64}]}},
    }
    if how == "unknown model":
        url = f"{app.url}/api/v1/models/nope/predict/batch"
    r = httpx.post(url, **requests[how])
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "detail", "request_id"} and r.json()["error"] == error


def test_concurrent_full_batches_wait_for_slots_instead_of_failing(app: Appliance, no_leaks: None) -> None:
    """Two 32-image batches at once on a worker with 8 ring slots: every image answered, no overload."""
    images = [(encode(colour(i), size_of(i)), None) for i in range(32)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            url = f"{app.url}/api/v1/predict/batch"
            return await asyncio.gather(*(client.post(url, files=multipart(images)) for _ in range(2)))

    for r in asyncio.run(fire()):
        assert r.status_code == 200, r.text
        check_results(r.json(), images)
    wait_for(lambda: ring_idle(app), 10, "the ring to be empty")


def test_openapi_documents_both_bodies(app: Appliance) -> None:
    spec = httpx.get(f"{app.url}/openapi.json").json()
    post = spec["paths"]["/api/v1/predict/batch"]["post"]
    content = post["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"]["properties"]["images"]["maxItems"] == 32
    assert content["application/json"]["schema"]["properties"]["images"]["items"]["required"] == ["image_b64"]
    assert "$ref" not in str(content["application/json"])  # self-contained, resolvable
    assert "BatchResponse" in spec["components"]["schemas"]
    assert {"413", "422"} <= set(post["responses"])
