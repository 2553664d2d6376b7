"""The Open Inference Protocol (KServe V2) with Triton's own client against the real appliance."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shm
from PIL import Image
from tritonclient.utils import InferenceServerException

from frontend.v2 import codec, stats
from frontend.v2.errors import V2Error, to_response
from frontend.v2.shm import segment_path
from ipc import errors as e
from tests.harness import ROOT, Appliance, segments, wait_for
from tests.models import expected_box, write_pixel_detector

SIZE = 64  # the pixel detector's input is 64 x 64


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37 + 20) % 256, (i * 91 + 13) % 256, (i * 53 + 101) % 256


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def pixels(rgb: tuple[int, int, int], n: int = 1) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (n, SIZE, SIZE, 3)).copy()


def raw_box(rgb: tuple[int, int, int]) -> list[float]:
    """The pixel detector's raw output: normalised (ymin, xmin, ymax, xmax)."""
    r, g, b = (c / 255 for c in rgb)
    return [g / 2, r / 2, g / 2 + 0.25, r / 2 + 0.25 + b / 4]


def rest_detections(app: Appliance, data: bytes, model: str = "pixels") -> list[dict[str, object]]:
    r = httpx.post(
        f"{app.url}/api/v1/models/{model}/predict",
        content=data,
        headers={"content-type": "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["detections"]


def host(app: Appliance) -> str:
    return app.url.removeprefix("http://")


def worker_pid(client: triton.InferenceServerClient) -> int:
    """The HTTP worker behind this client's one kept-alive connection (tritonclient has no public
    call for ringserve's /health, hence its request helper)."""
    response = client._get("health", None, None)
    return int(json.loads(response.read())["worker"]["pid"])


def clients_on_distinct_workers(app: Appliance, count: int = 2) -> list[triton.InferenceServerClient]:
    """A client per HTTP worker, each kept alive on its one connection to that worker."""
    clients = []
    for pid in app.worker_pids()[:count]:
        with app.only_worker(pid):
            client = triton.InferenceServerClient(host(app), concurrency=1)
            assert worker_pid(client) == pid  # its connection is made by its first request, here
        clients.append(client)
    assert len(clients) == count, f"the appliance has {len(clients)} HTTP workers"
    return clients


@contextlib.contextmanager
def running(appliance: Appliance, timeout: float = 120) -> Iterator[Appliance]:
    """Like ``with appliance``, but stops what started even when it never became ready."""
    try:
        yield appliance.start(timeout)
    finally:
        appliance.__exit__(None, None, None)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    """One appliance for the module: 2 workers, client shared memory allowed."""
    repo = tmp_path_factory.mktemp("v2") / "repo"
    write_pixel_detector(repo)
    with running(Appliance(repo, workers=2, env={"RINGSERVE_ALLOW_CLIENT_SHM": "1"})) as appliance:
        pids = {p.pid for p in appliance.tree()}
        yield appliance
    # no_leaks for the whole module, limited to this appliance's segments (ringserve-<uid>-<pid>-<n>)
    left = {s for s in segments() if int(s.split("-")[2]) in pids}
    assert not left, f"the appliance left ring segments behind: {sorted(left)}"


@pytest.fixture
def client(app: Appliance) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(host(app))
    yield c
    c.close()


def uint8_input(data: np.ndarray, binary: bool = True) -> triton.InferInput:
    inp = triton.InferInput("image", list(data.shape), "UINT8")
    inp.set_data_from_numpy(data, binary_data=binary)
    return inp


def bytes_input(images: list[bytes], binary: bool = True, name: str = "image") -> triton.InferInput:
    inp = triton.InferInput(name, [len(images)], "BYTES")
    # Raw image bytes are not JSON strings: in JSON, each element is the image in base64.
    items = images if binary else [base64.b64encode(x) for x in images]
    inp.set_data_from_numpy(np.array(items, dtype=object), binary_data=binary)
    return inp


def detections(result: triton.InferResult) -> list[list[dict[str, object]]]:
    return [json.loads(x) for x in result.as_numpy("detections")]


# --------------------------------------------------------------------------- health and metadata
def test_health_metadata_and_config(app: Appliance, client: triton.InferenceServerClient, no_leaks: None) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("pixels")
    assert client.is_model_ready("pixels", "1")
    assert not client.is_model_ready("pixels", "2")
    assert not client.is_model_ready("nope")

    server = client.get_server_metadata()
    assert server["name"] == "ringserve"
    assert {"binary_tensor_data", "statistics", "system_shared_memory"} <= set(server["extensions"])

    meta = client.get_model_metadata("pixels")
    assert meta["name"] == "pixels" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]}]
    assert {(o["name"], o["datatype"]) for o in meta["outputs"]} == {
        ("boxes", "FP32"),
        ("scores", "FP32"),
        ("classes", "FP32"),
        ("count", "FP32"),
        ("detections", "BYTES"),
    }
    assert client.get_model_metadata("pixels", "1")["versions"] == ["1"]

    config = client.get_model_config("pixels")
    assert config["max_batch_size"] == 8
    assert config["input"][0] == {
        "name": "image",
        "data_type": "TYPE_UINT8",
        "format": "FORMAT_NHWC",
        "dims": [SIZE, SIZE, 3],
    }
    assert {o["name"]: o["data_type"] for o in config["output"]}["boxes"] == "TYPE_FP32"
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 256

    assert client.get_model_repository_index() == [{"name": "pixels", "version": "1", "state": "READY"}]


# --------------------------------------------------------------------------- inference
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_tensor_matches_rest(
    app: Appliance, client: triton.InferenceServerClient, binary: bool, no_leaks: None
) -> None:
    rgb = colour(1)
    outputs = (
        None
        if binary
        else [
            triton.InferRequestedOutput(n, binary_data=False)
            for n in ("boxes", "scores", "classes", "count", "detections")
        ]
    )
    result = client.infer("pixels", [uint8_input(pixels(rgb), binary)], outputs=outputs, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "pixels" and response["model_version"] == "1"
    assert all(("data" in o) != binary for o in response["outputs"])
    np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(rgb)]], atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), [[0.9]], atol=1e-6)
    assert result.as_numpy("count").tolist() == [1.0]
    # The same pixels as a PNG of the model's size through REST give the same detections.
    assert detections(result) == [rest_detections(app, png(rgb, (SIZE, SIZE)))]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json-base64"])
def test_encoded_images_match_rest(
    app: Appliance, client: triton.InferenceServerClient, binary: bool, no_leaks: None
) -> None:
    sizes = [(96, 64), (50, 120), (200, 100)]
    images = [png(colour(i), size) for i, size in enumerate(sizes)]
    result = client.infer("pixels", [bytes_input(images, binary)])
    got = detections(result)
    assert got == [rest_detections(app, x) for x in images]
    for i, size in enumerate(sizes):  # and both are right
        assert got[i][0]["bbox"] == pytest.approx(expected_box(colour(i), *size), abs=0.6)
    assert result.as_numpy("boxes").shape == (3, 1, 4)


def test_batch_is_split_and_gathered_in_order(client: triton.InferenceServerClient, no_leaks: None) -> None:
    batch = np.concatenate([pixels(colour(i)) for i in range(5)])
    result = client.infer("pixels", [uint8_input(batch)])
    np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(i))] for i in range(5)], atol=1e-6)
    assert [len(d) for d in detections(result)] == [1] * 5
    # [H, W, 3] is a batch of one
    single = client.infer("pixels", [uint8_input(pixels(colour(9))[0])])
    np.testing.assert_allclose(single.as_numpy("boxes"), [[raw_box(colour(9))]], atol=1e-6)


def test_subset_of_outputs(client: triton.InferenceServerClient, no_leaks: None) -> None:
    for wanted in (["scores"], ["detections"], ["detections", "boxes"]):
        outputs = [triton.InferRequestedOutput(n) for n in wanted]
        result = client.infer("pixels", [uint8_input(pixels(colour(3)))], outputs=outputs)
        assert [o["name"] for o in result.get_response()["outputs"]] == wanted


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_request(client: triton.InferenceServerClient, algorithm: str, no_leaks: None) -> None:
    result = client.infer("pixels", [uint8_input(pixels(colour(6)))], request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(6))]], atol=1e-6)


def test_request_parameters(client: triton.InferenceServerClient, no_leaks: None) -> None:
    inp = [uint8_input(pixels(colour(4)))]
    assert detections(client.infer("pixels", inp, parameters={"confidence_threshold": 0.95})) == [[]]
    assert len(detections(client.infer("pixels", inp, parameters={"confidence_threshold": 0.5}))[0]) == 1
    with pytest.raises(InferenceServerException) as info:
        client.infer("pixels", inp, parameters={"max_detections": 0})
    assert info.value.status() == "400" and "max_detections" in info.value.message()


# --------------------------------------------------------------------------- errors
def expect_error(call: object, status: str, text: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    assert info.value.status() == status, info.value
    assert text in info.value.message(), info.value.message()


def test_errors_are_triton_compatible(app: Appliance, client: triton.InferenceServerClient, no_leaks: None) -> None:
    good = [uint8_input(pixels(colour(5)))]
    expect_error(lambda: client.infer("nope", good), "400", "Request for unknown model: 'nope' is not found")
    expect_error(lambda: client.get_model_metadata("nope"), "400", "Request for unknown model")
    expect_error(
        lambda: client.infer("pixels", good, model_version="3"),
        "404",
        "Request for unknown model: 'pixels' version 3 is not found",
    )
    small = np.zeros((1, 32, 32, 3), np.uint8)
    expect_error(lambda: client.infer("pixels", [uint8_input(small)]), "400", "unexpected shape for input 'image'")
    fp32 = triton.InferInput("image", [1, SIZE, SIZE, 3], "FP32")
    fp32.set_data_from_numpy(np.zeros((1, SIZE, SIZE, 3), np.float32))
    expect_error(lambda: client.infer("pixels", [fp32]), "400", "data-type is 'FP32'")
    wrong_name = triton.InferInput("pixels_in", [1, SIZE, SIZE, 3], "UINT8")
    wrong_name.set_data_from_numpy(pixels(colour(5)))
    expect_error(lambda: client.infer("pixels", [wrong_name]), "400", "expected 1 input named 'image'")
    expect_error(
        lambda: client.infer("pixels", good, outputs=[triton.InferRequestedOutput("nope")]),
        "400",
        "unexpected inference output 'nope'",
    )
    expect_error(lambda: client.infer("pixels", [uint8_input(pixels(colour(5), 9))]), "400", "batch-size must be <= 8")
    expect_error(lambda: client.infer("pixels", [bytes_input([b"not an image"])]), "400", "not a recognised image")

    url = f"{app.url}/v2/models/pixels/infer"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, SIZE, SIZE, 3],
                    "datatype": "UINT8",
                    "parameters": {"binary_data_size": SIZE * SIZE * 3},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + bytes(SIZE * SIZE * 3)
    malformed = [
        ({"Inference-Header-Content-Length": str(len(body) + 1)}, body),  # past the end of the body
        ({"Inference-Header-Content-Length": "twelve"}, body),
        ({"Inference-Header-Content-Length": str(len(header) - 3)}, body),  # cuts the JSON
        ({"Inference-Header-Content-Length": str(len(header))}, body[:-1]),  # binary data too short
        ({}, b"{not json"),
    ]
    for headers, content in malformed:
        r = httpx.post(url, content=content, headers=headers)
        assert r.status_code == 400, (headers, r.text)
        assert set(r.json()) == {"error"}, r.text
    ok = httpx.post(url, content=body, headers={"Inference-Header-Content-Length": str(len(header))})
    assert ok.status_code == 200 and int(ok.headers["inference-header-content-length"]) > 0
    assert client.is_server_ready()


# --------------------------------------------------------------------------- statistics
def test_statistics_are_box_wide(app: Appliance, no_leaks: None) -> None:
    clients = clients_on_distinct_workers(app)
    try:

        def pixel_stats(c: triton.InferenceServerClient) -> dict[str, object]:
            [stat] = c.get_inference_statistics("pixels")["model_stats"]
            return stat

        before = pixel_stats(clients[0])
        sent = images = 0
        for i in range(6):
            n = 1 + i % 3  # 1, 2 or 3 images per request, half through each worker
            clients[i % 2].infer("pixels", [uint8_input(pixels(colour(i), n))])
            sent, images = sent + 1, images + n
        with pytest.raises(InferenceServerException):
            clients[1].infer("pixels", [bytes_input([b"broken"])])
        views = [pixel_stats(c) for c in clients]  # the same totals whichever worker answers
        assert views[0] == views[1]
        after = views[0]
        assert after["name"] == "pixels" and after["version"] == "1"
        s0, s1 = before["inference_stats"], after["inference_stats"]
        assert s1["success"]["count"] - s0["success"]["count"] == sent
        assert s1["fail"]["count"] - s0["fail"]["count"] == 1
        assert s1["queue"]["count"] - s0["queue"]["count"] == sent
        assert s1["compute_infer"]["ns"] > s0["compute_infer"]["ns"]
        assert after["inference_count"] - before["inference_count"] == images
        assert 1 <= after["execution_count"] - before["execution_count"] <= images
        assert after["last_inference"] >= before["last_inference"]
        executions = sum(b["batch_size"] * b["compute_infer"]["count"] for b in after["batch_stats"])
        assert executions == after["inference_count"]
        every = clients[0].get_inference_statistics()["model_stats"]
        assert [(m["name"], m["version"]) for m in every] == [("pixels", "1")]
        expect_error(lambda: clients[0].get_inference_statistics("nope"), "400", "unknown model")
        assert len({worker_pid(c) for c in clients}) == 2  # both connections stayed on their worker
    finally:
        for c in clients:
            c.close()


# --------------------------------------------------------------------------- shared memory
def test_system_shared_memory_across_workers(app: Appliance, no_leaks: None) -> None:
    one, other = clients_on_distinct_workers(app)
    key = f"/rs-test-{os.getpid()}"
    nbytes = SIZE * SIZE * 3
    region_in = shm.create_shared_memory_region("in", f"{key}-in", 2 * nbytes)
    region_out = shm.create_shared_memory_region("out", f"{key}-out", 4096)
    try:
        batch = np.concatenate([pixels(colour(7)), pixels(colour(8))])
        shm.set_shared_memory_region(region_in, [batch])
        one.register_system_shared_memory("in", f"{key}-in", 2 * nbytes)
        one.register_system_shared_memory("out", f"{key}-out", 4096)
        expect_error(lambda: other.register_system_shared_memory("in", f"{key}-in", nbytes), "400", "already")
        assert {r["name"] for r in other.get_system_shared_memory_status()} == {"in", "out"}
        assert other.get_system_shared_memory_status("in") == [
            {"name": "in", "key": f"{key}-in", "offset": 0, "byte_size": 2 * nbytes}
        ]

        # registered through one worker, used by a request that the other worker handles
        inp = triton.InferInput("image", [2, SIZE, SIZE, 3], "UINT8")
        inp.set_shared_memory("in", 2 * nbytes)
        boxes = triton.InferRequestedOutput("boxes")
        boxes.set_shared_memory("out", 32)
        dets = triton.InferRequestedOutput("detections")
        dets.set_shared_memory("out", 4096 - 64, offset=64)
        result = other.infer("pixels", [inp], outputs=[boxes, dets])
        out = result.get_output("boxes")
        assert out["shape"] == [2, 1, 4] and out["parameters"]["shared_memory_byte_size"] == 32
        got = shm.get_contents_as_numpy(region_out, np.float32, [2, 1, 4])
        np.testing.assert_allclose(got, [[raw_box(colour(7))], [raw_box(colour(8))]], atol=1e-6)
        det = result.get_output("detections")
        raw = shm.get_contents_as_numpy(region_out, np.object_, det["shape"], offset=64)
        assert [len(json.loads(x)) for x in raw] == [1, 1]

        # offsets and sizes are checked against the region; nothing crashes
        bad_in = triton.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
        bad_in.set_shared_memory("in", nbytes, offset=nbytes + 1)
        expect_error(lambda: other.infer("pixels", [bad_in]), "400", "exceeds shared memory region 'in'")
        short = triton.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
        short.set_shared_memory("in", nbytes - 1)
        expect_error(lambda: other.infer("pixels", [short]), "400", "unexpected total byte size")
        tiny = triton.InferRequestedOutput("boxes")
        tiny.set_shared_memory("out", 8)
        expect_error(lambda: other.infer("pixels", [inp], outputs=[tiny]), "400", "should be at least 32 bytes")
        expect_error(
            lambda: one.register_system_shared_memory("big", f"{key}-in", 2 * nbytes + 1), "400", "the region needs"
        )
        expect_error(lambda: one.register_system_shared_memory("gone", f"{key}-missing", 16), "400", "unable to open")
        expect_error(lambda: one.register_system_shared_memory("ring", "ringserve-0-1-0", 16), "400", "reserved")

        # Unregistered and registered again through one worker over a new segment of the same key:
        # the other worker, which mapped the old segment, now reads the new one.
        one.unregister_system_shared_memory("in")
        shm.destroy_shared_memory_region(region_in)
        region_in = shm.create_shared_memory_region("in", f"{key}-in", 2 * nbytes)
        shm.set_shared_memory_region(region_in, [np.concatenate([pixels(colour(10)), pixels(colour(11))])])
        one.register_system_shared_memory("in", f"{key}-in", 2 * nbytes)
        again = other.infer("pixels", [inp], outputs=[triton.InferRequestedOutput("boxes")])
        np.testing.assert_allclose(again.as_numpy("boxes"), [[raw_box(colour(10))], [raw_box(colour(11))]], atol=1e-6)

        other.unregister_system_shared_memory("in")
        assert [r["name"] for r in one.get_system_shared_memory_status()] == ["out"]
        expect_error(lambda: one.infer("pixels", [inp]), "400", "Unable to find shared memory region: 'in'")
        one.unregister_system_shared_memory()
        assert other.get_system_shared_memory_status() == []
        assert len({worker_pid(one), worker_pid(other)}) == 2
        assert one.is_server_ready() and other.is_server_ready()
    finally:
        for c in (one, other):
            c.unregister_system_shared_memory()
            c.close()
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)


def test_shared_memory_is_off_by_default(pixel_repo: Path, no_leaks: None) -> None:
    with running(Appliance(pixel_repo, workers=1, env={"RINGSERVE_ALLOW_CLIENT_SHM": "0"})) as app:
        client = triton.InferenceServerClient(host(app))
        region = shm.create_shared_memory_region("in", f"/rs-off-{os.getpid()}", SIZE * SIZE * 3)
        try:
            assert "system_shared_memory" not in client.get_server_metadata()["extensions"]
            expect_error(
                lambda: client.register_system_shared_memory("in", f"/rs-off-{os.getpid()}", 16),
                "400",
                "RINGSERVE_ALLOW_CLIENT_SHM=1",
            )
            assert client.get_system_shared_memory_status() == []
            inp = triton.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
            inp.set_shared_memory("in", SIZE * SIZE * 3)
            expect_error(lambda: client.infer("pixels", [inp]), "400", "client shared memory is disabled")
            assert client.infer("pixels", [uint8_input(pixels(colour(1)))]).as_numpy("boxes").shape == (1, 1, 4)
        finally:
            client.close()
            shm.destroy_shared_memory_region(region)


def test_engine_down_is_503_then_recovers(app: Appliance, no_leaks: None) -> None:
    """Last user of the module's appliance: kill -9 the engine mid-service."""
    client = triton.InferenceServerClient(host(app))
    try:
        os.kill(app.engine_pid(), signal.SIGKILL)
        expect_error(lambda: client.infer("pixels", [uint8_input(pixels(colour(2)))]), "503", "engine")
        wait_for(client.is_server_ready, 60, "the V2 readiness after the engine restart")
        app.wait_all_workers_ready()
        result = client.infer("pixels", [uint8_input(pixels(colour(2)))])
        np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(2))]], atol=1e-6)
    finally:
        client.close()


# --------------------------------------------------------------------------- the real detector
SSD_REPO = Path(os.environ.get("RINGSERVE_MODEL_REPO", ROOT / "models"))
SSD = "ssd-mobilenet-v2-coco"


@pytest.mark.timeout(600)
@pytest.mark.skipif(not (SSD_REPO / SSD / "1" / "model.onnx").exists(), reason="run `ringserve models pull` first")
def test_ssd_detections_match_rest(no_leaks: None) -> None:
    from tests.photos import photo

    data = photo("cat").read_bytes()
    # Loading the SSD takes about 20 s on an idle 2-core box, minutes on a busy one.
    with running(Appliance(SSD_REPO, workers=1, default_model=SSD, args=("--models", SSD)), timeout=400) as app:
        client = triton.InferenceServerClient(host(app))
        try:
            [spec] = client.get_model_metadata(SSD)["inputs"]
            result = client.infer(SSD, [bytes_input([data], name=spec["name"])])
            [got] = detections(result)
            want = rest_detections(app, data, SSD)
            assert got == want
            assert any(d["label"] == "cat" for d in got), got
            assert result.as_numpy("detection_boxes:0").shape[0] == 1
        finally:
            client.close()


# --------------------------------------------------------------------------- units, no processes
def test_error_mapping_follows_triton() -> None:
    from starlette.requests import Request

    request = Request({"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": []})
    cases = [
        (e.EngineUnavailable("the engine is not connected"), 503),
        (e.QueueFull("full"), 503),
        (e.DeadlineExceeded("late"), 503),
        (e.ModelNotFound("gone"), 400),
        (e.BadInput("broken"), 400),
        (e.PayloadTooLarge("big"), 400),
        (V2Error(404, "Request for unknown model: 'm' version 2 is not found"), 404),
        (RuntimeError("boom"), 500),
    ]
    for exc, status in cases:
        response = to_response(request, exc)
        assert response.status_code == status, exc
        assert set(json.loads(response.body)) == {"error"}
        assert (response.headers.get("retry-after") == "1") == (status == 503)
    assert json.loads(to_response(request, RuntimeError("secret")).body) == {"error": "internal server error"}


def test_codec_checks_what_it_reads() -> None:
    import gzip

    items = [b"", b"abc", bytes(range(256))]
    blob = codec.serialize_bytes(items)
    assert codec.deserialize_bytes(blob, 3, "x") == items
    for bad_blob, count in ((blob[:-1], 3), (blob, 2), (blob[:2], 1)):
        with pytest.raises(V2Error):
            codec.deserialize_bytes(bad_blob, count, "x")
    assert codec.decompress(gzip.compress(b"x" * 100), "gzip", 100) == b"x" * 100
    with pytest.raises(V2Error, match="exceeds the limit"):
        codec.decompress(gzip.compress(b"x" * 101), "gzip", 100)
    with pytest.raises(V2Error, match="unsupported Content-Encoding"):
        codec.decompress(b"", "br", 100)
    assert codec.from_numpy(np.float32) == "FP32" and codec.from_numpy(np.dtype(">i4")) == "INT32"
    assert codec.from_ort("tensor(float)") == "FP32" and codec.config_type("BYTES") == "TYPE_STRING"


def test_stats_of_dead_workers_still_count(tmp_path: Path) -> None:
    writer = stats.StatsWriter(tmp_path)
    sample = stats.Sample(total_ns=10, queue_ns=2, input_ns=3, infer_ns=4, output_ns=1, batches=[(2, 4.0), (2, 4.0)])
    writer.success("m", 1, sample)
    writer.failure("m", 1, 5)
    (tmp_path / "999999999.bin").write_bytes(writer.path.read_bytes())  # a worker that has exited
    stat = stats.model_stat("m", 1, stats.read_totals(tmp_path)[("m", 1)])
    assert stat["inference_count"] == 4 and stat["execution_count"] == 2
    assert stat["inference_stats"]["success"] == {"count": 2, "ns": 20}
    assert stat["inference_stats"]["fail"] == {"count": 2, "ns": 10}
    assert stat["batch_stats"] == [
        {
            "batch_size": 2,
            "compute_input": {"count": 2, "ns": 0},
            "compute_infer": {"count": 2, "ns": 8},
            "compute_output": {"count": 2, "ns": 0},
        }
    ]
    again = stats.StatsWriter(tmp_path)  # the same pid again continues its file
    again.success("m", 1, sample)
    assert stats.read_totals(tmp_path)[("m", 1)].counters[1] == 6


def test_shm_keys_are_checked() -> None:
    assert segment_path("/client-region").name == "client-region"
    for key in ("", "/", "a/b", "..", "ringserve-0-1-0", "/ringserve-0-2-1"):
        with pytest.raises(V2Error):
            segment_path(key)


def test_statistics_agree_with_the_metrics(pixel_repo: Path, no_leaks: None) -> None:
    """With only V2 traffic, the V2 statistics and the box-wide Prometheus metrics tell one story."""
    from tests.test_metrics import scrape, total

    with running(Appliance(pixel_repo, workers=2)) as app:
        client = triton.InferenceServerClient(host(app))
        try:
            images = 0
            for i in range(8):
                n = 1 + i % 3
                client.infer("pixels", [uint8_input(pixels(colour(i), n))])
                images += n
            [stat] = client.get_inference_statistics("pixels")["model_stats"]
        finally:
            client.close()
        s = scrape(app.url)
        assert stat["inference_count"] == images == total(s, "ringserve_inference_images_total", model="pixels")
        assert stat["execution_count"] == total(s, "ringserve_inference_executions_total", model="pixels")
        assert stat["inference_stats"]["success"]["count"] == 8
        assert total(s, "ringserve_batch_size_sum", model="pixels") == images
