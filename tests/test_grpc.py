"""Triton's gRPC API with ``tritonclient.grpc`` unchanged against the real appliance."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import psutil
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
import tritonclient.utils.shared_memory as shm
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc
from tritonclient.utils import InferenceServerException

from frontend.grpc.errors import CODE
from frontend.v2 import classification
from frontend.v2.outputs import Tensor
from tests.harness import Appliance, segments, wait_for
from tests.models import expected_box, write_pixel_detector
from tests.test_v2 import SIZE, colour, pixels, png, raw_box, rest_detections

LABELS = ["red", "green", "blue", "grey"]
TINY = 16  # the tiny classifier's input is 16 x 16
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")  # gRPC binds 127.0.0.1 on a dual-stack socket


def tiny_classifier(repo: Path, name: str = "tinyclass") -> None:
    """logits = mean colour / 255 @ W: [R, G, B, (R + G + B) / 3], exactly known per colour."""
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", TINY, TINY, 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])
    w = np.array([[1, 0, 0, 1 / 3], [0, 1, 0, 1 / 3], [0, 0, 1, 1 / 3]], np.float32)
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "hw"),
        numpy_helper.from_array(np.array([255.0], np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf", "hw"], ["mean"], keepdims=0),
        helper.make_node("Div", ["mean", "k"], ["m"]),
        helper.make_node("MatMul", ["m", "W"], ["logits"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    (repo / name / "1").mkdir(parents=True)
    onnx.save(model, str(repo / name / "1" / "model.onnx"))
    (repo / name / "labels.txt").write_text("\n".join(LABELS) + "\n")
    (repo / name / "model.toml").write_text(
        f'task = "classify"\nlabels = "labels.txt"\n[input]\nheight = {TINY}\nwidth = {TINY}\nresize = "stretch"\n'
        '[outputs]\nlogits = "logits"\n[batching]\nmax_batch_size = 4\nmax_queue_delay_ms = 2.0\n'
    )


def expected_logits(rgb: tuple[int, int, int]) -> list[float]:
    r, g, b = (c / 255 for c in rgb)
    return [r, g, b, (r + g + b) / 3]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("grpc") / "repo"
    write_pixel_detector(repo)
    tiny_classifier(repo)
    appliance = Appliance(repo, workers=2, env={"RINGSERVE_ALLOW_CLIENT_SHM": "1"})
    try:
        appliance.start(120)
        pids = {p.pid for p in appliance.tree()}
        yield appliance
    finally:
        appliance.__exit__(None, None, None)
    left = {s for s in segments() if int(s.split("-")[2]) in pids}
    assert not left, f"the appliance left ring segments behind: {sorted(left)}"


@pytest.fixture
def client(app: Appliance) -> Iterator[tg.InferenceServerClient]:
    c = tg.InferenceServerClient(app.grpc_url)
    yield c
    c.close()


def uint8_input(data: np.ndarray) -> tg.InferInput:
    inp = tg.InferInput("image", list(data.shape), "UINT8")
    inp.set_data_from_numpy(data)
    return inp


def bytes_input(images: list[bytes]) -> tg.InferInput:
    inp = tg.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object))
    return inp


def detections(result: tg.InferResult) -> list[list[dict[str, object]]]:
    return [json.loads(x) for x in result.as_numpy("detections")]


def expect_error(call: object, code: grpc.StatusCode, text: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    assert info.value.status() == str(code), info.value
    assert text in info.value.message(), info.value.message()
    return info.value


# --------------------------------------------------------------------------- health and metadata
def test_health_metadata_and_config_match_v2_http(app: Appliance, client: tg.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("pixels") and client.is_model_ready("pixels", "1")
    assert not client.is_model_ready("pixels", "2") and not client.is_model_ready("nope")
    http = th.InferenceServerClient(app.url.removeprefix("http://"))
    try:
        server = client.get_server_metadata(as_json=True)
        assert server["name"] == "ringserve"
        assert server["extensions"] == http.get_server_metadata()["extensions"]
        assert "classification" in server["extensions"]
        for model in ("pixels", "tinyclass"):
            want_meta = json_format.ParseDict(http.get_model_metadata(model), pb.ModelMetadataResponse())
            assert client.get_model_metadata(model) == want_meta
            config = client.get_model_config(model, "1").config
            assert config == json_format.ParseDict(http.get_model_config(model), mc.ModelConfig())
            assert config.max_batch_size == (8 if model == "pixels" else 4)
        client.infer("pixels", [uint8_input(pixels(colour(1)))])  # statistics are box-wide, one set for both
        grpc_stats = client.get_inference_statistics("pixels")
        assert grpc_stats == json_format.ParseDict(
            http.get_inference_statistics("pixels"), pb.ModelStatisticsResponse()
        )
        assert grpc_stats.model_stats[0].inference_stats.success.count >= 1
        index = client.get_model_repository_index(as_json=True)["models"]
        assert index == [{"name": n, "version": "1", "state": "READY"} for n in ("pixels", "tinyclass")]
    finally:
        http.close()
    with grpc.insecure_channel(app.grpc_url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "live"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_connections_spread_over_the_workers(app: Appliance) -> None:
    """SO_REUSEPORT: every worker listens on the gRPC port and the kernel spreads connections."""
    # One connection per client (gRPC would otherwise share one between channels of one process).
    own = [("grpc.use_local_subchannel_pool", 1)]
    clients = [tg.InferenceServerClient(app.grpc_url, channel_args=own) for _ in range(16)]
    try:
        for c in clients:
            assert c.is_server_live()
        listening, serving = set(), set()
        for pid in app.worker_pids():
            ours = [c for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr.port == app.grpc_port]
            if any(c.status == psutil.CONN_LISTEN and c.laddr.ip in LOOPBACK for c in ours):
                listening.add(pid)
            if any(c.status == psutil.CONN_ESTABLISHED for c in ours):
                serving.add(pid)
        assert listening == serving == set(app.worker_pids())
    finally:
        for c in clients:
            c.close()


# --------------------------------------------------------------------------- inference
def test_uint8_pixels_match_rest(app: Appliance, client: tg.InferenceServerClient) -> None:
    batch = np.concatenate([pixels(colour(i)) for i in range(3)])
    result = client.infer("pixels", [uint8_input(batch)], request_id="g-1")
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("g-1", "pixels", "1")
    np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(i))] for i in range(3)], atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), [[0.9]] * 3, atol=1e-6)
    assert detections(result) == [rest_detections(app, png(colour(i), (SIZE, SIZE))) for i in range(3)]
    subset = client.infer("pixels", [uint8_input(batch)], outputs=[tg.InferRequestedOutput("scores")])
    assert [o.name for o in subset.get_response().outputs] == ["scores"]


def test_encoded_images_match_rest(app: Appliance, client: tg.InferenceServerClient) -> None:
    sizes = [(96, 64), (50, 120), (200, 100)]
    images = [png(colour(i), size) for i, size in enumerate(sizes)]
    got = detections(client.infer("pixels", [bytes_input(images)]))
    assert got == [rest_detections(app, x) for x in images]
    for i, size in enumerate(sizes):
        assert got[i][0]["bbox"] == pytest.approx(expected_box(colour(i), *size), abs=0.6)


def test_typed_contents(app: Appliance) -> None:
    """Other clients than tritonclient send typed contents: uint_contents for UINT8, bytes_contents
    for BYTES (through tritonclient's generated stub)."""
    rgb = colour(4)
    with grpc.insecure_channel(app.grpc_url) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        typed = pb.ModelInferRequest(model_name="pixels", id="typed")
        inp = typed.inputs.add(name="image", datatype="UINT8", shape=[1, SIZE, SIZE, 3])
        inp.contents.uint_contents.extend(pixels(rgb).ravel().tolist())
        reply = stub.ModelInfer(typed, timeout=30)
        result = tg.InferResult(reply)
        np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(rgb)]], atol=1e-6)
        encoded = pb.ModelInferRequest(model_name="pixels")
        inp = encoded.inputs.add(name="image", datatype="BYTES", shape=[2])
        images = [png(colour(5), (80, 40)), png(colour(6))]
        inp.contents.bytes_contents.extend(images)
        got = detections(tg.InferResult(stub.ModelInfer(encoded, timeout=30)))
        assert got == [rest_detections(app, x) for x in images]
        out_of_range = pb.ModelInferRequest(model_name="pixels")
        inp = out_of_range.inputs.add(name="image", datatype="UINT8", shape=[1, SIZE, SIZE, 3])
        inp.contents.uint_contents.extend([256] * (SIZE * SIZE * 3))
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(out_of_range, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in info.value.details()
        both = pb.ModelInferRequest(model_name="pixels")
        inp = both.inputs.add(name="image", datatype="UINT8", shape=[1, SIZE, SIZE, 3])
        inp.contents.uint_contents.extend([1] * (SIZE * SIZE * 3))
        both.raw_input_contents.append(pixels(rgb).tobytes())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(both, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "raw_input_contents" in info.value.details()


def test_stream_with_many_requests_in_flight(app: Appliance, client: tg.InferenceServerClient) -> None:
    [before] = client.get_inference_statistics("pixels", as_json=True)["model_stats"]
    replies: queue.Queue[tuple[tg.InferResult | None, InferenceServerException | None]] = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    count = 120
    try:
        for i in range(count):
            if i == 50:  # an error answers its own request and the stream goes on
                client.async_stream_infer("pixels", [bytes_input([b"not an image"])], request_id="broken")
            client.async_stream_infer("pixels", [uint8_input(pixels(colour(i)))], request_id=f"s{i}")
        got: dict[str, np.ndarray] = {}
        errors = []
        for _ in range(count + 1):
            result, error = replies.get(timeout=60)
            if error is not None:
                errors.append(error)
            else:
                assert result is not None
                got[result.get_response().id] = result.as_numpy("boxes")
    finally:
        client.stop_stream()
    assert [e.message() for e in errors] == ["the data is not a recognised image (JPEG, PNG, WebP, BMP, GIF or TIFF)"]
    assert sorted(got) == sorted(f"s{i}" for i in range(count))
    for i in range(count):
        np.testing.assert_allclose(got[f"s{i}"], [[raw_box(colour(i))]], atol=1e-6)
    [after] = client.get_inference_statistics("pixels", as_json=True)["model_stats"]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == count
    # Requests of one stream were in flight together: the engine batched some of them.
    assert any(int(b["batch_size"]) > 1 for b in after.get("batch_stats", []))


def test_classification_extension_on_grpc_and_http(app: Appliance, client: tg.InferenceServerClient) -> None:
    rgbs = [(200, 50, 100), (10, 240, 30)]
    batch = np.concatenate([np.broadcast_to(np.array(c, np.uint8), (1, TINY, TINY, 3)) for c in rgbs])
    outputs = [tg.InferRequestedOutput("logits", class_count=2)]
    result = client.infer("tinyclass", [uint8_input(batch)], outputs=outputs)
    out = result.get_output("logits")
    assert out.datatype == "BYTES" and list(out.shape) == [2, 2]
    got = result.as_numpy("logits")
    for row, rgb in zip(got, rgbs, strict=True):
        logits = expected_logits(rgb)
        best = sorted(range(4), key=lambda i: -logits[i])[:2]
        fields = [x.decode().split(":") for x in row]
        assert [(int(i), label) for _, i, label in fields] == [(i, LABELS[i]) for i in best]
        assert [float(v) for v, _, _ in fields] == pytest.approx([logits[i] for i in best], abs=1e-5)
        assert all(re.fullmatch(r"\d+\.\d{6}:\d+:\w+", x.decode()) for x in row)  # std::to_string's %f
    # The same over V2 HTTP, with binary and with JSON outputs
    http = th.InferenceServerClient(app.url.removeprefix("http://"))
    try:
        for binary in (True, False):
            inp = th.InferInput("image", list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch)
            wanted = [th.InferRequestedOutput("logits", binary_data=binary, class_count=2)]
            over_http = http.infer("tinyclass", [inp], outputs=wanted)
            assert over_http.get_output("logits")["datatype"] == "BYTES"
            text = [[x.decode() if isinstance(x, bytes) else x for x in row] for row in over_http.as_numpy("logits")]
            assert text == [[x.decode() for x in row] for row in got]
    finally:
        http.close()
    more = client.infer("tinyclass", [uint8_input(batch)], outputs=[tg.InferRequestedOutput("logits", class_count=9)])
    assert list(more.get_output("logits").shape) == [2, 4]
    # a detector's scores have no labels of their own: "score:index"
    scores = client.infer(
        "pixels", [uint8_input(pixels(colour(1)))], outputs=[tg.InferRequestedOutput("scores", class_count=1)]
    )
    assert [x.decode() for x in scores.as_numpy("scores").ravel()] == ["0.900000:0"]
    expect_error(
        lambda: client.infer(
            "pixels", [uint8_input(pixels(colour(1)))], outputs=[tg.InferRequestedOutput("detections", class_count=1)]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsupported type 'BYTES'",
    )


def test_top_k_formats_like_tritonserver() -> None:
    t = Tensor("x", "INT32", [1, 3], np.array([[5, 9, 7]], np.int32).tobytes())
    out = classification.top_k(t, 2, ["a", "b", "c"])
    assert out.items == (b"9:1:b", b"7:2:c") and out.shape == [1, 2]
    f = Tensor("y", "FP32", [2, 2], np.array([[0.25, 0.5], [1.0, 0.0]], np.float32).tobytes())
    assert classification.top_k(f, 1, []).items == (b"0.500000:1", b"1.000000:0")


# --------------------------------------------------------------------------- shared memory
def test_system_shared_memory(app: Appliance, client: tg.InferenceServerClient) -> None:
    key = f"/rs-grpc-{os.getpid()}"
    nbytes = SIZE * SIZE * 3
    region_in = shm.create_shared_memory_region("gin", f"{key}-in", 2 * nbytes)
    region_out = shm.create_shared_memory_region("gout", f"{key}-out", 4096)
    http = th.InferenceServerClient(app.url.removeprefix("http://"))
    try:
        shm.set_shared_memory_region(region_in, [np.concatenate([pixels(colour(7)), pixels(colour(8))])])
        client.register_system_shared_memory("gin", f"{key}-in", 2 * nbytes)
        http.register_system_shared_memory("gout", f"{key}-out", 4096)  # one registry for both protocols
        status = client.get_system_shared_memory_status(as_json=True)["regions"]
        assert status["gin"] == {"name": "gin", "key": f"{key}-in", "byte_size": str(2 * nbytes)}
        assert set(status) == {"gin", "gout"}
        expect_error(
            lambda: client.register_system_shared_memory("gin", f"{key}-in", 16),
            grpc.StatusCode.INVALID_ARGUMENT,
            "already in manager",
        )
        inp = tg.InferInput("image", [2, SIZE, SIZE, 3], "UINT8")
        inp.set_shared_memory("gin", 2 * nbytes)
        boxes = tg.InferRequestedOutput("boxes")
        boxes.set_shared_memory("gout", 32)
        scores = tg.InferRequestedOutput("scores")  # not in shared memory: raw_output_contents stays aligned
        result = client.infer("pixels", [inp], outputs=[boxes, scores])
        out = result.get_output("boxes")
        assert list(out.shape) == [2, 1, 4] and out.parameters["shared_memory_byte_size"].int64_param == 32
        got = shm.get_contents_as_numpy(region_out, np.float32, [2, 1, 4])
        np.testing.assert_allclose(got, [[raw_box(colour(7))], [raw_box(colour(8))]], atol=1e-6)
        np.testing.assert_allclose(result.as_numpy("scores"), [[0.9], [0.9]], atol=1e-6)
        bad = tg.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
        bad.set_shared_memory("gin", nbytes, offset=nbytes + 1)
        expect_error(lambda: client.infer("pixels", [bad]), grpc.StatusCode.INVALID_ARGUMENT, "exceeds shared memory")
        client.unregister_system_shared_memory("gin")
        assert set(http.get_system_shared_memory_status()[0].values()) >= {"gout"}
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
    finally:
        client.unregister_system_shared_memory()
        http.close()
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)


# --------------------------------------------------------------------------- errors
def test_errors_have_tritons_codes(app: Appliance, client: tg.InferenceServerClient) -> None:
    good = [uint8_input(pixels(colour(5)))]
    invalid, code = grpc.StatusCode.INVALID_ARGUMENT, CODE
    expect_error(lambda: client.infer("nope", good), invalid, "Request for unknown model: 'nope' is not found")
    expect_error(lambda: client.get_model_metadata("nope"), invalid, "Request for unknown model")
    expect_error(lambda: client.infer("pixels", good, model_version="3"), code[404], "version 3 is not found")
    wrong = tg.InferInput("image", [1, 32, 32, 3], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
    expect_error(lambda: client.infer("pixels", [wrong]), invalid, "unexpected shape for input 'image'")
    floats = tg.InferInput("image", [1, SIZE, SIZE, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, SIZE, SIZE, 3), np.float32))
    expect_error(lambda: client.infer("pixels", [floats]), invalid, "data-type is 'FP32'")
    expect_error(lambda: client.infer("pixels", [bytes_input([b"junk"])]), invalid, "not a recognised image")
    expect_error(lambda: client.infer("pixels", good, parameters={"max_detections": 0}), invalid, "max_detections")
    too_many = uint8_input(np.zeros((9, SIZE, SIZE, 3), np.uint8))
    expect_error(lambda: client.infer("pixels", [too_many]), invalid, "batch-size must be <= 8")
    unknown_output = [tg.InferRequestedOutput("nope")]
    expect_error(lambda: client.infer("pixels", good, outputs=unknown_output), invalid, "unexpected inference output")
    # model control mode none (the default): the engine refuses, as over HTTP (frontend/v2/repository.py)
    expect_error(lambda: client.load_model("pixels"), invalid, "explicit model load / unload is not allowed")
    expect_error(lambda: client.unload_model("pixels"), invalid, "explicit model load / unload is not allowed")
    expect_error(lambda: client.get_cuda_shared_memory_status(), grpc.StatusCode.UNIMPLEMENTED, "CUDA shared memory")
    # a message past RINGSERVE_MAX_BODY_BYTES (20 MiB) is refused by gRPC itself, before any work
    huge = tg.InferInput("image", [1, 21 * 1024 * 1024], "UINT8")
    huge.set_data_from_numpy(np.zeros((1, 21 * 1024 * 1024), np.uint8))
    expect_error(lambda: client.infer("pixels", [huge]), grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    # a batch of 8 full-size inputs is above gRPC's default 4 MiB and must pass
    assert client.infer("pixels", [uint8_input(np.zeros((8, SIZE, SIZE, 3), np.uint8))]).as_numpy("boxes").shape == (
        8,
        1,
        4,
    )
    assert client.is_server_ready()


def test_calls_are_in_the_metrics(app: Appliance, client: tg.InferenceServerClient) -> None:
    def count(method: str, code: str) -> float:
        text = httpx.get(f"{app.url}/metrics", timeout=10).text
        line = f'ringserve_grpc_requests_total{{code="{code}",method="/inference.GRPCInferenceService/{method}"}}'
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    ok, bad = count("ModelInfer", "OK"), count("ModelInfer", "INVALID_ARGUMENT")
    client.infer("pixels", [uint8_input(pixels(colour(3)))])
    with pytest.raises(InferenceServerException):
        client.infer("nope", [uint8_input(pixels(colour(3)))])
    assert (count("ModelInfer", "OK"), count("ModelInfer", "INVALID_ARGUMENT")) == (ok + 1, bad + 1)
    metrics = httpx.get(f"{app.url}/metrics", timeout=10).text
    assert 'ringserve_grpc_request_duration_seconds_count{method="/inference.GRPCInferenceService/ModelInfer"}' in (
        metrics
    )


def test_status_codes_follow_the_v2_http_status() -> None:
    assert CODE[400] == grpc.StatusCode.INVALID_ARGUMENT and CODE[503] == grpc.StatusCode.UNAVAILABLE
    assert CODE[501] == grpc.StatusCode.UNIMPLEMENTED and CODE[404] == grpc.StatusCode.NOT_FOUND


def grpc_listeners(app: Appliance) -> set[int]:
    found = set()
    for pid in app.worker_pids():
        with contextlib.suppress(psutil.NoSuchProcess):
            conns = psutil.Process(pid).net_connections(kind="tcp")
            if any(c.laddr.port == app.grpc_port and c.status == psutil.CONN_LISTEN for c in conns):
                found.add(pid)
    return found


def test_a_replaced_worker_serves_grpc_again(app: Appliance) -> None:
    victim = app.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in app.worker_pids() and len(app.worker_pids()) == 2, 60, "the worker's replacement")
    app.wait_all_workers_ready()
    wait_for(lambda: grpc_listeners(app) == set(app.worker_pids()), 30, "the replacement to listen for gRPC")
    own = [("grpc.use_local_subchannel_pool", 1)]
    for i in range(8):  # new connections, spread over both workers again
        with contextlib.closing(tg.InferenceServerClient(app.grpc_url, channel_args=own)) as c:
            result = c.infer("pixels", [uint8_input(pixels(colour(i)))])
            np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(i))]], atol=1e-6)


def test_engine_down_is_unavailable_then_recovers(app: Appliance, client: tg.InferenceServerClient) -> None:
    """Last user of the module's appliance: kill -9 the engine."""
    os.kill(app.engine_pid(), signal.SIGKILL)
    expect_error(lambda: client.infer("pixels", [uint8_input(pixels(colour(2)))]), grpc.StatusCode.UNAVAILABLE, "")
    wait_for(client.is_server_ready, 60, "gRPC readiness after the engine restart")
    app.wait_all_workers_ready()
    result = client.infer("pixels", [uint8_input(pixels(colour(2)))])
    np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(2))]], atol=1e-6)


# --------------------------------------------------------------------------- API key
def test_api_key_is_metadata(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    with Appliance(repo, workers=1, env={"RINGSERVE_API_KEY": "s3cret"}) as app:
        client = tg.InferenceServerClient(app.grpc_url)
        try:
            assert client.is_server_live() and client.is_server_ready()  # probes stay open
            good = [uint8_input(pixels(colour(1)))]
            expect_error(lambda: client.infer("pixels", good), grpc.StatusCode.UNAUTHENTICATED, "API key")
            expect_error(
                lambda: client.infer("pixels", good, headers={"x-api-key": "wrong"}),
                grpc.StatusCode.UNAUTHENTICATED,
                "API key",
            )
            for headers in ({"x-api-key": "s3cret"}, {"authorization": "Bearer s3cret"}):
                result = client.infer("pixels", good, headers=headers)
                np.testing.assert_allclose(result.as_numpy("boxes"), [[raw_box(colour(1))]], atol=1e-6)
            expect_error(lambda: client.get_model_metadata("pixels"), grpc.StatusCode.UNAUTHENTICATED, "API key")
            replies: queue.Queue[InferenceServerException | None] = queue.Queue()
            client.start_stream(callback=lambda result, error: replies.put(error))
            # The stream is refused as it opens, maybe before this request is queued on it.
            with contextlib.suppress(InferenceServerException):
                client.async_stream_infer("pixels", good)
            error = replies.get(timeout=30)
            assert error is not None and "API key" in error.message()
            client.stop_stream()
            assert httpx.get(f"{app.url}/health/ready", timeout=5).status_code == 200
        finally:
            client.close()


def test_explicit_load_and_unload_over_grpc(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    tiny_classifier(repo)
    env = {"RINGSERVE_MODEL_CONTROL": "explicit", "RINGSERVE_UNLOAD_GRACE_S": "0.2"}
    with Appliance(repo, workers=1, env=env) as app:
        client = tg.InferenceServerClient(app.grpc_url)
        try:
            image = tg.InferInput("image", [1, TINY, TINY, 3], "UINT8")
            image.set_data_from_numpy(np.zeros((1, TINY, TINY, 3), np.uint8))
            assert client.is_model_ready("tinyclass")
            client.unload_model("tinyclass")
            assert not client.is_model_ready("tinyclass") and client.is_model_ready("pixels")
            states = {m.name: m.state for m in client.get_model_repository_index().models}
            assert states == {"tinyclass": "UNAVAILABLE", "pixels": "READY"}
            with grpc.insecure_channel(app.grpc_url) as channel:  # tritonclient has no 'ready' argument
                ready = rpc.GRPCInferenceServiceStub(channel).RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
            assert [m.name for m in ready.models] == ["pixels"]
            expect_error(lambda: client.infer("tinyclass", [image]), grpc.StatusCode.INVALID_ARGUMENT, "unknown model")
            client.load_model("tinyclass")
            assert client.is_model_ready("tinyclass")
            assert client.infer("tinyclass", [image]).as_numpy("logits").shape == (1, 4)
            expect_error(lambda: client.load_model("nothing-here"), grpc.StatusCode.INVALID_ARGUMENT, "repository")
            expect_error(lambda: client.load_model("../etc"), grpc.StatusCode.INVALID_ARGUMENT, "invalid model name")
        finally:
            client.close()


def test_grpc_port_zero_turns_it_off(tmp_path: Path) -> None:
    import asyncio

    from frontend.grpc import serve
    from frontend.settings import Settings

    server = asyncio.run(serve(Settings(grpc_port=0, run_dir=tmp_path), None, None))  # type: ignore[arg-type]
    assert server.server is None
    asyncio.run(server.close())
