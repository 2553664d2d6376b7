"""DeepStack's API with the real client packages from PyPI, used unchanged, against the real appliance.

``deepstack-python`` (what Home Assistant's DeepStack integration uses), ``deepstack-sdk`` and
``codeproject-ai-api`` talk to an appliance serving the real default detector (SSD-MobileNet-v2
COCO), the EfficientNet-Lite0 classifier (the scene model) and the tiny pixel detector (a custom
model whose box is known exactly). A second appliance, with an API key set, serves the pixel
detector only: the key tests and the "endpoint not activated" answer need no real model.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from codeprojectai import core as cpai
from deepstack import core as ds
from deepstack_sdk import Detection, SceneRecognition, ServerConfig
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ipc.shm import pid_alive
from tests.harness import ROOT, Appliance, segments
from tests.models import expected_box, write_pixel_detector
from tests.photos import photo

MODEL = "ssd-mobilenet-v2-coco"
SCENE = "efficientnet-lite0"
KEY = "s3cret-key"


def _pulled(name: str) -> Path:
    path = ROOT / "models" / name
    if not (path / "1" / "model.onnx").is_file():  # cached by sha256: seconds when already converted
        if name == MODEL:
            from engine.convert import pull_default

            pull_default(ROOT / "models", progress=False)
        else:
            from engine.convert_efficientnet import pull_efficientnet

            pull_efficientnet(ROOT / "models", progress=False)
    return path


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("deepstack") / "repo"
    write_pixel_detector(repo)
    for name in (MODEL, SCENE):
        (repo / name).symlink_to(_pulled(name), target_is_directory=True)
    before = segments()
    with Appliance(repo, workers=1, default_model=MODEL) as appliance:
        yield appliance
        assert "Traceback" not in appliance.log(), appliance.log()[-4000:]
    _no_orphans(before)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("deepstack-key") / "repo"
    write_pixel_detector(repo)
    before = segments()
    with Appliance(repo, workers=1, env={"RINGSERVE_API_KEY": KEY}) as appliance:
        yield appliance
        assert "Traceback" not in appliance.log(), appliance.log()[-4000:]
    _no_orphans(before)


def _no_orphans(before: set[str]) -> None:
    left = sorted(s for s in segments() - before if not pid_alive(int(s.split("-")[2])))
    assert not left, f"segments left in /dev/shm: {left}"


def _size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def _png(rgb: tuple[int, int, int], size: tuple[int, int] = (160, 120)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def _check_boxes(predictions: list[dict], width: int, height: int) -> None:
    confidences = [p["confidence"] for p in predictions]
    assert confidences == sorted(confidences, reverse=True), "Frigate stops at the first one under its threshold"
    for p in predictions:
        box = [p["x_min"], p["y_min"], p["x_max"], p["y_max"]]
        assert all(type(v) is int for v in box), p
        assert 0 <= p["x_min"] < p["x_max"] <= width and 0 <= p["y_min"] < p["y_max"] <= height, p


def _post(app: Appliance, path: str, data: bytes | None = None, **fields: str) -> httpx.Response:
    files = {"image": ("image", data)} if data is not None else None
    return httpx.post(f"{app.url}{path}", files=files, data=fields, timeout=30)


# --------------------------------------------------------------------------- the three clients
def test_deepstack_python_finds_the_cat_in_original_pixels(app: Appliance) -> None:
    data = photo("cat").read_bytes()
    width, height = _size(data)
    client = ds.DeepstackObject(ip="127.0.0.1", port=app.port, min_confidence=0.5)
    predictions = client.detect(data)
    _check_boxes(predictions, width, height)
    [cat] = [p for p in predictions if p["label"] == "cat"]
    assert cat["confidence"] >= 0.5
    assert cat["x_max"] - cat["x_min"] > 0.7 * width  # the original 451 px, not the model's 300
    assert ds.get_objects(predictions) == ["cat"]
    # The same boxes as REST's, as integers.
    rest = httpx.post(f"{app.url}/api/v1/predict", files={"image": ("c.jpg", data)}, timeout=30).json()
    [rest_cat] = [d for d in rest["detections"] if d["label"] == "cat"]
    got = [cat["x_min"], cat["y_min"], cat["x_max"], cat["y_max"]]
    assert got == pytest.approx(rest_cat["bbox"], abs=0.5)
    assert cat["confidence"] == rest_cat["confidence"]


def test_deepstack_python_two_people_are_two_persons(app: Appliance) -> None:
    data = photo("two_people").read_bytes()
    client = ds.DeepstackObject(ip="127.0.0.1", port=app.port, min_confidence=0.5)
    predictions = client.detect(data)
    _check_boxes(predictions, *_size(data))
    assert ds.get_objects_summary(predictions).get("person") == 2


def test_deepstack_sdk_finds_the_cat_and_two_persons(app: Appliance) -> None:
    config = ServerConfig(app.url)
    cat = photo("cat").read_bytes()
    found = Detection(config).detectObject(cat, min_confidence=0.5)
    assert [d.label for d in found] == ["cat"]
    width, _height = _size(cat)
    assert found[0].x_max - found[0].x_min > 0.7 * width
    people = Detection(config).detectObject(photo("two_people").read_bytes(), min_confidence=0.5)
    assert sorted(d.label for d in people if d.label == "person") == ["person", "person"]
    assert all(d.confidence >= 0.5 for d in people)


def test_codeproject_ai_api_finds_the_cat_and_two_persons(app: Appliance) -> None:
    client = cpai.CodeProjectAIObject(ip="127.0.0.1", port=app.port, min_confidence=0.5)
    cat = photo("cat").read_bytes()
    predictions = client.detect(cat)
    _check_boxes(predictions, *_size(cat))
    assert cpai.get_objects(predictions) == ["cat"]
    people = photo("two_people").read_bytes()
    assert cpai.get_objects_summary(client.detect(people)).get("person") == 2


def test_min_confidence_is_respected(app: Appliance) -> None:
    data = photo("bus").read_bytes()
    counts = {}
    for threshold in (0.3, 0.4, 0.5, 0.9):
        client = ds.DeepstackObject(ip="127.0.0.1", port=app.port, min_confidence=threshold)
        predictions = client.detect(data)
        assert all(p["confidence"] >= threshold for p in predictions), (threshold, predictions)
        rest = httpx.post(
            f"{app.url}/api/v1/predict",
            files={"image": ("b.jpg", data)},
            data={"confidence_threshold": str(threshold)},
            timeout=30,
        ).json()
        assert [p["label"] for p in predictions] == [d["label"] for d in rest["detections"]]
        counts[threshold] = len(predictions)
    assert counts[0.3] >= counts[0.4] >= counts[0.5] > counts[0.9] > 0
    # Without min_confidence: DeepStack's default, 0.40 (what Frigate gets: it sends none).
    default = _post(app, "/v1/vision/detection", data).json()
    assert default["success"] is True and default["count"] == counts[0.4]


def test_custom_model_boxes_are_exact(app: Appliance) -> None:
    rgb, (width, height) = (100, 60, 200), (160, 120)
    client = ds.DeepstackObject(ip="127.0.0.1", port=app.port, custom_model="pixels", min_confidence=0.5)
    [thing] = client.detect(_png(rgb, (width, height)))
    assert thing["label"] == "thing" and thing["confidence"] == pytest.approx(0.9)
    want = [round(v) for v in expected_box(rgb, width, height)]
    assert [thing["x_min"], thing["y_min"], thing["x_max"], thing["y_max"]] == pytest.approx(want, abs=1)
    assert cpai.CodeProjectAIObject(ip="127.0.0.1", port=app.port, custom_model="pixels").detect(_png(rgb))
    assert [d.label for d in Detection(ServerConfig(app.url), name="pixels").detectObject(_png(rgb))] == ["thing"]


def test_custom_model_that_is_not_a_detector_is_404(app: Appliance) -> None:
    for name in ("nope", SCENE):
        with pytest.raises(ds.DeepstackException, match="404"):
            ds.DeepstackObject(ip="127.0.0.1", port=app.port, custom_model=name).detect(_png((1, 2, 3)))
        r = _post(app, f"/v1/vision/custom/{name}", _png((1, 2, 3)))
        assert r.status_code == 404 and r.json()["success"] is False and name in r.json()["error"]


def test_scene_is_the_classifier(app: Appliance) -> None:
    cat = photo("cat").read_bytes()
    answer = ds.DeepstackScene(ip="127.0.0.1", port=app.port).recognize(cat)
    assert set(answer) >= {"label", "confidence"}
    assert "cat" in answer["label"].lower() and 0 < answer["confidence"] <= 1
    rest = httpx.post(f"{app.url}/api/v1/models/{SCENE}/predict", files={"image": ("c.jpg", cat)}, timeout=30)
    assert answer["label"] == rest.json()["classes"][0]["label"]
    scene = SceneRecognition(ServerConfig(app.url)).recognizeScene(cat)
    assert scene.label == answer["label"]


# --------------------------------------------------------------------------- errors, DeepStack's way
def test_routes_deepstack_has_and_ringserve_does_not_are_404(app: Appliance) -> None:
    face = ds.DeepstackFace(ip="127.0.0.1", port=app.port)
    with pytest.raises(ds.DeepstackException, match="404"):
        face.detect(photo("astronaut").read_bytes())
    with pytest.raises(ds.DeepstackException, match="404"):
        face.register("eileen", photo("astronaut").read_bytes())
    for path in ("/v1/vision/face/list", "/v1/vision/addmodel", "/v1/backup", "/v1/vision/enhance", "/v1/x/y"):
        r = httpx.post(f"{app.url}{path}", timeout=10)
        assert r.status_code == 404, path
        body = r.json()
        assert body["success"] is False and "/v1/vision/detection" in body["error"], body


def test_other_methods_on_served_routes_are_405(app: Appliance) -> None:
    for path in ("/v1/vision/detection", "/v1/vision/scene", "/v1/vision/custom/pixels"):
        r = httpx.get(f"{app.url}{path}", timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "POST", path
        assert r.json()["success"] is False


@pytest.mark.parametrize(
    ("fields", "files", "status", "error"),
    [
        ({}, None, 400, "No valid image file found"),
        ({"min_confidence": "0.5"}, {"picture": ("p.png", b"x")}, 400, "No valid image file found"),
        ({"min_confidence": "abc"}, "png", 400, "Invalid value for min_confidence"),
        ({"min_confidence": "1.5"}, "png", 400, "min_confidence cannot be greater than 1"),
        ({"min_confidence": "nan"}, "png", 400, "Invalid value for min_confidence"),
        ({}, {"image": ("x.jpg", b"not an image at all")}, 400, ""),
    ],
)
def test_bad_requests_are_deepstack_errors(
    app: Appliance, fields: dict, files: object, status: int, error: str
) -> None:
    if files == "png":
        files = {"image": ("p.png", _png((9, 9, 9)))}
    r = httpx.post(f"{app.url}/v1/vision/detection", data=fields, files=files, timeout=10)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and error in body["error"] and body["error"]
    assert r.headers["x-request-id"]


def test_bodies_that_are_not_forms(app: Appliance) -> None:
    r = httpx.post(f"{app.url}/v1/vision/detection", json={"image": "abc"}, timeout=10)
    assert (r.status_code, r.json()) == (400, {"success": False, "error": "No valid image file found"})
    r = httpx.post(f"{app.url}/v1/vision/detection", content=b"\x00" * (21 * 2**20), timeout=30)
    assert r.status_code == 413 and r.json()["success"] is False
    r = httpx.post(
        f"{app.url}/v1/vision/detection",
        files={"image": ("p.png", _png((1, 1, 1)))},
        headers={"content-encoding": "gzip"},
        timeout=10,
    )
    assert r.status_code == 415 and r.json()["success"] is False
    # and the box still answers
    assert _post(app, "/v1/vision/custom/pixels", _png((1, 2, 3))).json()["count"] == 1


# --------------------------------------------------------------------------- the API key
def test_the_key_in_the_form_field_as_deepstack_sends_it(keyed: Appliance) -> None:
    good = ds.DeepstackObject(ip="127.0.0.1", port=keyed.port, api_key=KEY, custom_model="pixels")
    assert [p["label"] for p in good.detect(_png((50, 50, 50)))] == ["thing"]
    default = ds.DeepstackObject(ip="127.0.0.1", port=keyed.port, api_key=KEY)  # the default model: pixels
    assert [p["label"] for p in default.detect(_png((50, 50, 50)))] == ["thing"]
    for wrong in ("", "s3cret-kez", KEY + "x"):
        client = ds.DeepstackObject(ip="127.0.0.1", port=keyed.port, api_key=wrong)
        with pytest.raises(ds.DeepstackException, match="401"):
            client.detect(_png((50, 50, 50)))
    r = _post(keyed, "/v1/vision/detection", _png((50, 50, 50)), api_key="wrong")
    assert (r.status_code, r.json()) == (401, {"success": False, "error": "Incorrect api key"})
    with pytest.raises(Exception, match="401"):
        Detection(ServerConfig(keyed.url, api_key="wrong")).detectObject(_png((50, 50, 50)))
    assert len(Detection(ServerConfig(keyed.url, api_key=KEY)).detectObject(_png((50, 50, 50)))) == 1
    # codeproject-ai-api has no key to send: refused
    with pytest.raises(cpai.CodeProjectAIException, match="401"):
        cpai.CodeProjectAIObject(ip="127.0.0.1", port=keyed.port).detect(_png((50, 50, 50)))


def test_the_key_in_the_headers_as_rest_sends_it(keyed: Appliance) -> None:
    png = _png((50, 50, 50))
    for headers in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}):
        r = httpx.post(f"{keyed.url}/v1/vision/detection", files={"image": ("p", png)}, headers=headers, timeout=10)
        assert r.status_code == 200 and r.json()["count"] == 1, r.text
    r = httpx.post(f"{keyed.url}/v1/vision/detection", files={"image": ("p", png)}, headers={"x-api-key": "no"})
    assert r.status_code == 401
    # the key's exemption is the DeepStack routes' only: REST still checks it before the body
    r = httpx.post(f"{keyed.url}/api/v1/predict", files={"image": ("p", png)}, data={"api_key": KEY}, timeout=10)
    assert r.status_code == 401


def test_scene_without_a_classifier_is_not_activated(keyed: Appliance) -> None:
    r = _post(keyed, "/v1/vision/scene", _png((1, 1, 1)), api_key=KEY)
    assert (r.status_code, r.json()) == (403, {"success": False, "error": "Scene endpoint not activated"})
    with pytest.raises(ds.DeepstackException, match="403"):
        ds.DeepstackScene(ip="127.0.0.1", port=keyed.port, api_key=KEY).recognize(_png((1, 1, 1)))
    r = _post(keyed, "/v1/vision/scene", _png((1, 1, 1)), api_key="wrong")
    assert r.status_code == 401  # the key first, as DeepStack checks it


# --------------------------------------------------------------------------- schemathesis
def _deepstack_operations(url: str) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers={"x-api-key": KEY})
    operations = [result.ok() for result in schema.get_all_operations()]
    return [op for op in operations if op.path.startswith("/v1/")]


@pytest.mark.parametrize("which", ["app", "keyed"])
def test_schemathesis_over_the_deepstack_routes(which: str, request: pytest.FixtureRequest, subtests: object) -> None:
    """Generated requests: no 5xx, documented statuses and bodies, 405 + Allow for other methods.

    Generated bytes are no image, so schema-valid requests are rightly refused with 400:
    positive_data_acceptance is left out (the real photos above check the 200s)."""
    appliance: Appliance = request.getfixturevalue(which)
    operations = _deepstack_operations(appliance.url)
    assert sorted(op.path for op in operations) == [
        "/v1/vision/custom/{model}",
        "/v1/vision/detection",
        "/v1/vision/scene",
    ]
    for operation in operations:
        with subtests.test(msg=operation.label):  # type: ignore[attr-defined]

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
            def check(case: schemathesis.Case) -> None:
                case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=30)

            check()
