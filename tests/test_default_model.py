"""The real default detector (SSD-MobileNet-v2 COCO, built by `ringserve models pull`) on real photos."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.harness import ROOT, Appliance
from tests.photos import photo

MODEL = "ssd-mobilenet-v2-coco"


@pytest.fixture(scope="module")
def repo() -> Path:
    path = ROOT / "models"
    if not (path / MODEL / "1" / "model.onnx").is_file():
        from engine.convert import pull_default  # cached by sha256: seconds when already converted

        pull_default(path, progress=False)
    return path


@pytest.fixture(scope="module")
def app(repo: Path) -> Iterator[Appliance]:
    with Appliance(repo, workers=2, default_model=MODEL) as appliance:
        yield appliance


def predict(app: Appliance, data: bytes, how: str = "multipart", **params: object) -> dict:
    url = f"{app.url}/api/v1/predict"
    if how == "multipart":
        r = httpx.post(
            url,
            files={"image": ("photo.jpg", data, "image/jpeg")},
            data={k: str(v) for k, v in params.items()},
            timeout=30,
        )
    elif how == "json":
        r = httpx.post(url, json={"image_b64": base64.b64encode(data).decode(), **params}, timeout=30)
    else:
        r = httpx.post(url, content=data, params=params, headers={"content-type": "image/jpeg"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def labels(body: dict, at_least: float = 0.5) -> list[str]:
    return sorted(d["label"] for d in body["detections"] if d["confidence"] >= at_least)


def inside(bbox: list[float], width: int, height: int) -> bool:
    x1, y1, x2, y2 = bbox
    return 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height


@pytest.mark.parametrize("how", ["multipart", "json", "raw"])
def test_the_cat_is_a_cat(app: Appliance, how: str) -> None:
    data = photo("cat").read_bytes()
    width, height = Image.open(io.BytesIO(data)).size
    body = predict(app, data, how)
    assert body["model"] == {"name": MODEL, "version": 1}
    assert body["image"] == {"width": width, "height": height}
    [cat] = [d for d in body["detections"] if d["label"] == "cat"]
    assert cat["confidence"] >= 0.5
    assert inside(cat["bbox"], width, height)
    # The cat fills most of the photo: the box is in original pixels, not the model's 300x300.
    assert cat["bbox"][2] - cat["bbox"][0] > 0.7 * width


def test_same_answer_through_every_body_kind(app: Appliance) -> None:
    data = photo("two_people").read_bytes()
    answers = [predict(app, data, how)["detections"] for how in ("multipart", "json", "raw")]
    assert answers[0] == answers[1] == answers[2]


def test_two_people_are_two_persons(app: Appliance) -> None:
    body = predict(app, photo("two_people").read_bytes())
    assert labels(body) == ["person", "person"]
    width, height = body["image"]["width"], body["image"]["height"]
    assert all(inside(d["bbox"], width, height) for d in body["detections"])


def test_bus_and_thresholds(app: Appliance) -> None:
    data = photo("bus").read_bytes()
    found = labels(predict(app, data))
    assert "bus" in found and found.count("person") >= 2
    strict = predict(app, data, confidence_threshold=0.9)
    assert all(d["confidence"] >= 0.9 for d in strict["detections"])
    assert len(strict["detections"]) < len(found)
    assert len(predict(app, data, "json", max_detections=1)["detections"]) == 1


def test_exif_rotation_is_applied(app: Appliance) -> None:
    """The same photo stored rotated with an EXIF orientation: same boxes, displayed orientation."""
    original = Image.open(photo("cat"))
    stored = original.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=92, exif=exif)
    upright = predict(app, photo("cat").read_bytes())
    rotated = predict(app, buf.getvalue())
    assert rotated["image"] == upright["image"]
    [a] = [d for d in upright["detections"] if d["label"] == "cat"]
    [b] = [d for d in rotated["detections"] if d["label"] == "cat"]
    assert b["bbox"] == pytest.approx(a["bbox"], abs=0.05 * max(original.size))


def test_cmyk_and_grayscale_jpegs_work(app: Appliance) -> None:
    original = Image.open(photo("cat"))
    for mode in ("CMYK", "L"):
        buf = io.BytesIO()
        original.convert(mode).save(buf, format="JPEG", quality=92)
        body = predict(app, buf.getvalue())
        assert body["image"] == {"width": original.width, "height": original.height}
        assert "cat" in labels(body, 0.3), (mode, body["detections"])


def test_the_model_lives_in_the_engine_not_in_the_workers(app: Appliance) -> None:
    """The model lives once, in the engine: it outweighs any HTTP worker. How much a worker may cost
    is a memory goal, and memory goals live in the benchmark (loadtests/bench: PSS per process and
    the goal table), not in a test."""
    engine = psutil.Process(app.engine_pid()).memory_full_info().pss
    workers = [psutil.Process(p).memory_full_info().pss for p in app.worker_pids()]
    assert len(workers) == 2
    assert engine > max(workers), "the engine holds the model"
