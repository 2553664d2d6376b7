"""Several models and versions in one engine: routing, batching per model, model listing, raw
tensors, 404s, bad model.toml files next to good models, and the real classifier beside the SSD."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import onnx
import pytest
from PIL import Image

from tests.harness import ROOT, Appliance
from tests.models import expected_box, pixel_detector_onnx, write_pixel_detector
from tests.photos import photo
from tests.test_yolo import CONST_BOX, letterbox_back, rectangle_png, serving, write_yolo


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def post(url: str, data: bytes, **kw: object) -> httpx.Response:
    return httpx.post(url, content=data, headers={"content-type": "image/png"}, timeout=30, **kw)  # type: ignore[arg-type]


def assert_error(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "request_id"}, body
    assert body["error"] == error and body["request_id"] == r.headers["x-request-id"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("repo")
    write_pixel_detector(repo, "pixels", versions=(1, 2), max_batch_size=8, delay_ms=30.0)
    write_yolo(repo, "yolo-v8", "v8", height=256, width=256, max_batch_size=8, delay_ms=30.0)
    write_yolo(repo, "yolo-v5", "v5", height=224, width=288)
    write_yolo(repo, "tensors", "v8", height=32, width=48, task="raw", max_batch_size=1)
    with serving(Appliance(repo, workers=2, default_model="pixels", env={"RINGSERVE_RING_SLOTS": "48"})) as app:
        yield app


def test_requests_are_routed_by_name_and_version(multi: Appliance) -> None:
    data = png((200, 100, 50))
    latest = post(f"{multi.url}/api/v1/predict", data).json()
    assert latest["model"] == {"name": "pixels", "version": 2}
    assert post(f"{multi.url}/api/v1/models/pixels/predict", data).json()["model"]["version"] == 2
    first = post(f"{multi.url}/api/v1/models/pixels/versions/1/predict", data).json()
    assert first["model"] == {"name": "pixels", "version": 1}
    assert first["detections"][0]["bbox"] == pytest.approx(expected_box((200, 100, 50), 96, 64), abs=0.6)
    rect = (10, 20, 60, 50)
    yolo = post(f"{multi.url}/api/v1/models/yolo-v8/versions/1/predict", rectangle_png((96, 64), rect)).json()
    assert yolo["model"] == {"name": "yolo-v8", "version": 1}
    assert yolo["detections"][0]["label"] == "person"
    assert yolo["detections"][0]["bbox"] == pytest.approx(list(rect), abs=1.0)


def test_each_model_batches_on_its_own(multi: Appliance) -> None:
    """Concurrent requests to two models: every answer is its own model's, and both form batches."""
    rect = (20, 10, 70, 40)

    async def fire() -> list[tuple[str, int, httpx.Response]]:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            jobs = []
            for i in range(48):
                model = ("pixels", "yolo-v8")[i % 2]
                data = png((i * 5, 100, 200)) if model == "pixels" else rectangle_png((96, 64), rect)
                url = f"{multi.url}/api/v1/models/{model}/predict"
                jobs.append((model, i, client.post(url, content=data, headers={"content-type": "image/png"})))
            responses = await asyncio.gather(*(j[2] for j in jobs))
            return [(model, i, r) for (model, i, _), r in zip(jobs, responses, strict=True)]

    batches: dict[str, list[int]] = {"pixels": [], "yolo-v8": []}
    for model, i, r in asyncio.run(fire()):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == model
        batches[model].append(body["batch_size"])
        [first, *_] = body["detections"]
        if model == "pixels":
            assert first["bbox"] == pytest.approx(expected_box((i * 5, 100, 200), 96, 64), abs=0.6)
        else:
            assert first["bbox"] == pytest.approx(list(rect), abs=1.0)
    assert max(batches["pixels"]) > 1 and max(batches["yolo-v8"]) > 1, batches


@pytest.mark.parametrize("model", ["yolo-v5", "yolo-v8"])
@pytest.mark.parametrize(("size", "rect"), [((300, 180), (60, 40, 201, 131)), ((190, 310), (17, 101, 150, 290))])
def test_yolo_boxes_come_back_in_original_pixels(
    multi: Appliance, model: str, size: tuple[int, int], rect: tuple[int, int, int, int]
) -> None:
    """Generated YOLO models (v5 and v8 layouts), letterboxed non-square photos, landscape and portrait."""
    r = post(f"{multi.url}/api/v1/models/{model}/predict", rectangle_png(size, rect))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": size[0], "height": size[1]}
    dets = body["detections"]
    # NMS removed the shifted duplicate of "person", kept "dog" on the same box; "kite" 0.2 is under 0.3
    assert [(d["label"], d["class_id"], d["confidence"]) for d in dets] == [
        ("person", 0, 0.9),
        ("dog", 1, 0.7),
        ("kite", 2, 0.6),
    ]
    for det in dets[:2]:  # the box the model found around the white rectangle
        assert det["bbox"] == pytest.approx(list(rect), abs=1.0), (det["bbox"], rect)
    height, width = (224, 288) if model == "yolo-v5" else (256, 256)
    want = letterbox_back(CONST_BOX, size, height, width)  # a constant box in model-input pixels
    assert dets[2]["bbox"] == pytest.approx(want, abs=0.05)


def test_request_thresholds_reach_the_yolo_head(multi: Appliance) -> None:
    data = rectangle_png((300, 180), (60, 40, 201, 131))
    url = f"{multi.url}/api/v1/models/yolo-v5/predict"
    r = httpx.post(
        url,
        files={"image": ("r.png", data, "image/png")},
        data={"confidence_threshold": "0.1", "max_detections": "3"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert [d["label"] for d in r.json()["detections"]] == ["person", "dog", "kite"]
    low = httpx.post(
        url, files={"image": ("r.png", data, "image/png")}, data={"confidence_threshold": "0.1"}, timeout=30
    ).json()["detections"]
    assert [(d["label"], d["confidence"]) for d in low] == [("person", 0.9), ("dog", 0.7), ("kite", 0.6), ("kite", 0.2)]


def test_model_listing(multi: Appliance) -> None:
    body = httpx.get(f"{multi.url}/api/v1/models").json()
    assert body["failed"] == {}
    models = {m["name"]: m for m in body["models"]}
    assert sorted(models) == ["pixels", "tensors", "yolo-v5", "yolo-v8"]
    pixels = models["pixels"]
    assert (pixels["versions"], pixels["latest"], pixels["task"]) == ([1, 2], 2, "ssd")
    assert pixels["providers"] == ["CPUExecutionProvider"]
    v2 = pixels["details"][1]
    assert (v2["version"], v2["labels_count"], v2["max_batch_size"], v2["max_queue_delay_ms"]) == (2, 2, 8, 30.0)
    assert [o["name"] for o in v2["outputs"]] == ["boxes", "scores", "classes", "count"]
    yolo = httpx.get(f"{multi.url}/api/v1/models/yolo-v8").json()
    [detail] = yolo["details"]
    assert (yolo["task"], detail["resize"], detail["labels_count"], detail["default_confidence"]) == (
        "yolo",
        "letterbox",
        3,
        0.3,
    )
    # The wire input: uint8 NHWC at the model's size (the float NCHW preprocessing is in the graph).
    assert detail["inputs"] == [{"name": "ringserve_pixels", "datatype": "tensor(uint8)", "shape": [-1, 256, 256, 3]}]
    assert detail["outputs"] == [{"name": "output", "datatype": "tensor(float)", "shape": [-1, 7, 5]}]
    assert httpx.get(f"{multi.url}/health").json()["status"] == "healthy"


def test_a_raw_model_answers_its_tensors(multi: Appliance) -> None:
    rect = (10, 5, 40, 25)  # a 48x32 image: the model input size, so stretch is the identity
    body = post(f"{multi.url}/api/v1/models/tensors/predict", rectangle_png((48, 32), rect)).json()
    assert "detections" not in body and "classes" not in body
    [tensor] = body["tensors"]
    assert (tensor["name"], tensor["dtype"], tensor["shape"]) == ("output", "float32", [7, 5])
    rows = [tensor["data"][i * 5 : (i + 1) * 5] for i in range(7)]  # [4+C, A], row-major
    cx, cy, w, h = (rows[k][0] for k in range(4))
    assert [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2] == list(rect)
    assert rows[4][0] == pytest.approx(0.9)


def test_unknown_models_and_versions_are_404(multi: Appliance) -> None:
    data = png((1, 2, 3))
    assert_error(post(f"{multi.url}/api/v1/models/nope/predict", data), 404, "model_not_found")
    assert_error(post(f"{multi.url}/api/v1/models/pixels/versions/3/predict", data), 404, "model_not_found")
    assert_error(post(f"{multi.url}/api/v1/models/pixels/versions/0/predict", data), 404, "model_not_found")
    assert_error(httpx.get(f"{multi.url}/api/v1/models/nope"), 404, "model_not_found")
    r = post(f"{multi.url}/api/v1/models/pixels/versions/one/predict", data)
    assert r.status_code in (404, 422) and set(r.json()) == {"error", "detail", "request_id"}


# ------------------------------------------------------------------ bad model.toml files


def test_bad_models_are_reported_and_the_others_served(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo, "good")
    bad = write_pixel_detector(repo, "bad-field")
    (bad / "model.toml").write_text((bad / "model.toml").read_text().replace('resize = "stretch"', 'resize = "zoom"'))
    nolabels = write_pixel_detector(repo, "no-labels")
    (nolabels / "labels.txt").unlink()
    shape = write_pixel_detector(repo, "wrong-shape", size=64)
    (shape / "model.toml").write_text((shape / "model.toml").read_text().replace("height = 64", "height = 48"))
    half = write_pixel_detector(repo, "half-broken", versions=(1, 2))
    onnx.save(pixel_detector_onnx(32), str(half / "2" / "model.onnx"))  # version 2 is 32x32, the toml 64x64

    with serving(Appliance(repo, workers=1, default_model="good")) as app:
        health = httpx.get(f"{app.url}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded"
        failed = httpx.get(f"{app.url}/api/v1/models").json()["failed"]
        assert set(failed) == {"bad-field", "no-labels", "wrong-shape/1", "half-broken/2"}, failed
        expect = {
            "bad-field": (bad, "input.resize"),
            "no-labels": (nolabels, "labels"),
            "wrong-shape/1": (shape, "input.height"),
            "half-broken/2": (half, "input.height"),
        }
        for key, (directory, field) in expect.items():
            assert failed[key].startswith(f"{directory / 'model.toml'}: field '{field}'"), failed[key]
        assert "'zoom' is not one of" in failed["bad-field"]
        assert "shape ['N', 64, 64, 3]" in failed["wrong-shape/1"]
        ok = post(f"{app.url}/api/v1/predict", png((200, 100, 50)))
        assert ok.status_code == 200 and ok.json()["model"] == {"name": "good", "version": 1}
        # the good version of a half-broken model serves; its bad version does not
        assert post(f"{app.url}/api/v1/models/half-broken/predict", png((9, 9, 9))).json()["model"]["version"] == 1
        assert_error(
            post(f"{app.url}/api/v1/models/half-broken/versions/2/predict", png((9, 9, 9))), 404, "model_not_found"
        )
        assert_error(post(f"{app.url}/api/v1/models/bad-field/predict", png((9, 9, 9))), 404, "model_not_found")


# ------------------------------------------------------------------ the real models


@pytest.fixture(scope="module")
def real() -> Iterator[Appliance]:
    repo = ROOT / "models"
    if not (repo / "ssd-mobilenet-v2-coco" / "1" / "model.onnx").is_file():
        from engine.convert import pull_default

        pull_default(repo, progress=False)
    if not (repo / "efficientnet-lite0" / "1" / "model.onnx").is_file():
        from engine.convert_efficientnet import pull_efficientnet  # cached by sha256; ~25 s the first time

        pull_efficientnet(repo, progress=False)
    models = ("--models", "ssd-mobilenet-v2-coco,efficientnet-lite0")
    # ONNX Runtime takes ~10 s to build the SSD's session on 2 idle cores, minutes on busy ones.
    with serving(Appliance(repo, workers=2, default_model="ssd-mobilenet-v2-coco", args=models), 240) as app:
        yield app


@pytest.mark.timeout(400)  # the fixture may build EfficientNet (~25 s) and loads the SSD (slow on busy cores)
def test_the_classifier_knows_coffee_and_the_detector_a_cat(real: Appliance) -> None:
    coffee = photo("coffee").read_bytes()
    r = httpx.post(
        f"{real.url}/api/v1/models/efficientnet-lite0/predict",
        files={"image": ("coffee.jpg", coffee, "image/jpeg")},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "efficientnet-lite0", "version": 1} and "detections" not in body
    classes = body["classes"]
    assert len(classes) == 5 and classes == sorted(classes, key=lambda c: -c["confidence"])
    top = classes[0]
    assert top["label"] in ("espresso", "cup", "coffee mug"), classes
    assert top["class_id"] in (967, 968, 504) and top["confidence"] > 0.5
    assert all(not c["label"].isdigit() for c in classes)
    two = httpx.post(
        f"{real.url}/api/v1/models/efficientnet-lite0/predict",
        files={"image": ("coffee.jpg", coffee, "image/jpeg")},
        data={"max_detections": "2"},
        timeout=30,
    ).json()["classes"]
    assert [c["label"] for c in two] == [c["label"] for c in classes[:2]]
    cat = httpx.post(
        f"{real.url}/api/v1/predict", files={"image": ("cat.jpg", photo("cat").read_bytes(), "image/jpeg")}, timeout=30
    ).json()
    assert cat["model"]["name"] == "ssd-mobilenet-v2-coco"
    assert "cat" in [d["label"] for d in cat["detections"]]
    listing = {m["name"]: m for m in httpx.get(f"{real.url}/api/v1/models").json()["models"]}
    assert listing["efficientnet-lite0"]["task"] == "classify"
    assert listing["efficientnet-lite0"]["details"][0]["labels_count"] == 1000
    assert listing["efficientnet-lite0"]["details"][0]["resize"] == "center-crop"
