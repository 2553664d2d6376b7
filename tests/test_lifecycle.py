"""Models change while the appliance serves: poll mode under load, a broken version that fails
alone, explicit load/unload through tritonclient with the memory handed back, warm-up, policies."""

from __future__ import annotations

import io
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import psutil
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tritonclient.utils import InferenceServerException

from engine.repository import load_config
from engine.watch import snapshot, stable
from tests.harness import Appliance, segments, wait_for
from tests.models import pixel_detector_onnx, write_pixel_detector
from tests.test_yolo import serving

FAST = {"RINGSERVE_POLL_INTERVAL_S": "0.3", "RINGSERVE_UNLOAD_GRACE_S": "0.5"}


def png(rgb: tuple[int, int, int] = (200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


def latest_only(directory: Path, n: int = 1) -> None:
    with (directory / "model.toml").open("a") as f:
        f.write(f"[version_policy]\nlatest = {n}\n")


def add_version(directory: Path, version: int) -> None:
    (directory / str(version)).mkdir()
    onnx.save(pixel_detector_onnx(64), str(directory / str(version) / "model.onnx"))


def served(app: Appliance, model: str = "pixels") -> list[int]:
    body = httpx.get(f"{app.url}/health", timeout=5).json()
    return sorted(int(k.split("/")[1]) for k in body["models"] if k.split("/")[0] == model)


class Traffic:
    """A client that keeps sending requests for the latest version and counts what came back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.versions: Counter[int] = Counter()
        self.failures: list[str] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        data = png()
        with httpx.Client(timeout=30) as client:
            while not self._halt.is_set():
                r = client.post(self.url, content=data, headers={"content-type": "image/png"})
                if r.status_code == 200:
                    self.versions[r.json()["model"]["version"]] += 1
                else:
                    self.failures.append(f"{r.status_code} {r.text}")
                ready = client.get(self.url.split("/api/")[0] + "/health/ready")
                if ready.status_code != 200:  # a swap never makes the appliance unready
                    self.failures.append(f"/health/ready {ready.status_code} {ready.text}")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(timeout=30)

    def total(self) -> int:
        return sum(self.versions.values()) + len(self.failures)


@pytest.fixture
def poll_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    latest_only(write_pixel_detector(repo, versions=(1,)))
    return repo


def test_poll_mode_swaps_versions_under_load_without_a_failure(poll_repo: Path) -> None:
    """v2 added: it loads beside v1, takes over "latest", v1 goes; v2 removed: v1 comes back."""
    model = poll_repo / "pixels"
    env = {**FAST, "RINGSERVE_MODEL_CONTROL": "poll"}
    with serving(Appliance(poll_repo, workers=2, env=env)) as app:
        with Traffic(f"{app.url}/api/v1/models/pixels/predict") as traffic:
            wait_for(lambda: traffic.versions[1] >= 20, 30, "requests answered by v1")
            add_version(model, 2)
            wait_for(lambda: served(app) == [2], 30, "v2 to replace v1")
            seen = traffic.total()
            wait_for(lambda: traffic.total() >= seen + 20, 30, "requests after the swap")
            assert traffic.versions[2] > 0
            shutil.rmtree(model / "2")
            wait_for(lambda: served(app) == [1], 30, "v1 to come back when v2 is removed")
            seen = traffic.versions[1]
            wait_for(lambda: traffic.versions[1] >= seen + 20, 30, "requests answered by v1 again")
        assert not traffic.failures, traffic.failures[:5]
        # Each replaced version was unloaded once its grace had passed.
        wait_for(lambda: "pixels/1 unloaded" in app.log() and "pixels/2 unloaded" in app.log(), 30, "unloads")


def test_a_broken_version_fails_alone(poll_repo: Path) -> None:
    model = poll_repo / "pixels"
    env = {**FAST, "RINGSERVE_MODEL_CONTROL": "poll"}
    with serving(Appliance(poll_repo, workers=1, env=env)) as app:
        with Traffic(f"{app.url}/api/v1/predict") as traffic:
            (model / "2").mkdir()
            (model / "2" / "model.onnx").write_bytes(b"this is not an onnx graph")

            def degraded() -> bool:
                body = httpx.get(f"{app.url}/health", timeout=5).json()
                return body["status"] == "degraded" and "pixels/2" in body["failed_models"]

            wait_for(degraded, 30, "/health degraded with the broken version")
            body = httpx.get(f"{app.url}/health", timeout=5).json()
            assert "not a readable ONNX model" in body["failed_models"]["pixels/2"]
            assert body["models"] == ["pixels/1"] and httpx.get(f"{app.url}/health/ready").status_code == 200
            index = httpx.post(f"{app.url}/v2/repository/index", timeout=10).json()
            broken = [row for row in index if row.get("version") == "2"]
            assert broken and broken[0]["state"] == "UNAVAILABLE" and "ONNX" in broken[0]["reason"], index
            seen = traffic.versions[1]
            wait_for(lambda: traffic.versions[1] >= seen + 20, 30, "v1 serving on")
            # Fixed files are tried again, and the good v2 replaces v1.
            onnx.save(pixel_detector_onnx(64), str(model / "2" / "model.onnx"))
            wait_for(lambda: served(app) == [2], 30, "the repaired v2")
            wait_for(lambda: httpx.get(f"{app.url}/health").json()["status"] == "healthy", 30, "healthy again")
        assert not traffic.failures, traffic.failures[:5]
        assert traffic.versions[2] > 0


def big_model(mb: int) -> onnx.ModelProto:
    """A raw model holding ``mb`` MB of weights it really reads (a Gather the optimiser cannot fold)."""
    n = mb * (1 << 20) // 4
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 8, 8, 3])
    y = helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["N"])
    weights = numpy_helper.from_array(np.arange(n, dtype=np.float32), "weights")
    axes = numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMax", ["image", "axes"], ["peak"], keepdims=0),
        helper.make_node("Cast", ["peak"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["weights", "index"], ["picked"], axis=0),
    ]
    graph = helper.make_graph(nodes, "big", [x], [y], [weights, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def write_big(repo: Path, mb: int = 96) -> None:
    (repo / "big" / "1").mkdir(parents=True)
    onnx.save(big_model(mb), str(repo / "big" / "1" / "model.onnx"))
    (repo / "big" / "model.toml").write_text('task = "raw"\n[input]\nheight = 8\nwidth = 8\n')


@pytest.fixture
def explicit(tmp_path: Path) -> Iterator[Appliance]:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    write_big(repo)
    env = {"RINGSERVE_MODEL_CONTROL": "explicit", "RINGSERVE_UNLOAD_GRACE_S": "0.2"}
    with serving(Appliance(repo, workers=2, env=env)) as app:
        yield app


def pss(pid: int) -> int:
    return int(psutil.Process(pid).memory_full_info().pss)


def test_explicit_load_and_unload_through_tritonclient_free_the_memory(explicit: Appliance) -> None:
    client = triton.InferenceServerClient(explicit.url.removeprefix("http://"))
    engine = explicit.engine_pid()
    assert client.is_model_ready("big") and client.is_model_ready("pixels")
    client.unload_model("big")
    assert not client.is_model_ready("big")
    assert client.is_model_ready("pixels") and client.is_server_ready()
    states = {(r["name"], r.get("version")): r for r in client.get_model_repository_index()}
    assert states[("big", "1")]["state"] == "UNAVAILABLE" and states[("pixels", "1")]["state"] == "READY"
    # The first cycle maps a malloc arena for each new thread that ran the model, once: about
    # 6 MB that stays and is reused (with MALLOC_ARENA_MAX=1 it is not there). Measure after it.
    client.load_model("big")
    client.unload_model("big")
    before = pss(engine)
    client.load_model("big")
    assert client.is_model_ready("big")
    loaded = pss(engine)
    assert loaded - before > 60 << 20, (before, loaded)  # the weights are in the engine
    pixels = np.full((1, 8, 8, 3), 7, dtype=np.uint8)
    inp = triton.InferInput("image", [1, 8, 8, 3], "UINT8")
    inp.set_data_from_numpy(pixels)
    assert client.infer("big", [inp]).as_numpy("picked").tolist() == [7.0]
    client.unload_model("big")
    after = pss(engine)
    figures = f"engine PSS before load {before >> 20} MB, loaded {loaded >> 20} MB, after unload {after >> 20} MB"
    print(figures)  # the figures of the note (pytest -rA shows them)
    assert after <= before * 1.10, figures
    for _ in range(2):  # and no growth from one cycle to the next
        client.load_model("big")
        client.unload_model("big")
    assert pss(engine) <= before * 1.10, (figures, pss(engine) >> 20)
    with pytest.raises(InferenceServerException, match="not in the repository"):
        client.load_model("nothing-here")
    with pytest.raises(InferenceServerException):
        client.infer("big", [inp])
    # /health/ready follows the required models (by default the default model, "pixels").
    client.load_model("big")
    client.unload_model("pixels")
    r = httpx.get(f"{explicit.url}/health/ready")
    assert r.status_code == 503 and "pixels" in r.json()["reason"], r.text
    health = httpx.get(f"{explicit.url}/health").json()
    assert health["model_states"]["pixels/1"]["state"] == "UNAVAILABLE" and health["missing_required_models"] == [
        "pixels"
    ]
    client.load_model("pixels")
    assert httpx.get(f"{explicit.url}/health/ready").status_code == 200
    assert httpx.get(f"{explicit.url}/health").json()["model_states"]["pixels/1"] == {"state": "READY"}
    r = httpx.post(f"{explicit.url}/v2/repository/models/..%2Fetc/load")
    assert 400 <= r.status_code < 500
    r = httpx.post(f"{explicit.url}/v2/repository/models/big/load", content=b"[1, 2")
    assert r.status_code == 400 and "error" in r.json()


def test_load_and_unload_are_refused_outside_explicit_mode(poll_repo: Path) -> None:
    with serving(Appliance(poll_repo, workers=1, env={"RINGSERVE_MODEL_CONTROL": "poll"})) as app:
        client = triton.InferenceServerClient(app.url.removeprefix("http://"))
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not allowed"):
            client.unload_model("pixels")
        assert client.is_model_ready("pixels")


# ----------------------------------------------------------------- without processes
def test_version_policies(tmp_path: Path) -> None:
    d = write_pixel_detector(tmp_path, versions=(1, 2, 3))
    assert load_config(d).served_versions() == (1, 2, 3)
    base = (d / "model.toml").read_text()
    for policy, want in (("latest = 2", (2, 3)), ("specific = [1, 3, 9]", (1, 3)), ("all = true", (1, 2, 3))):
        (d / "model.toml").write_text(f"{base}[version_policy]\n{policy}\n")
        assert load_config(d).served_versions() == want, policy
    (d / "model.toml").write_text(f"{base}[version_policy]\nspecific = [1, 9]\n")
    assert "pixels/9" in snapshot(tmp_path, None).errors
    for bad in ("latest = 0", "latest = 1\nall = true", "specific = []", "all = false"):
        (d / "model.toml").write_text(f"{base}[version_policy]\n{bad}\n")
        with pytest.raises(ValueError, match="version_policy"):
            load_config(d)


def test_warmup_fields(tmp_path: Path) -> None:
    d = write_pixel_detector(tmp_path, max_batch_size=4)
    cfg = load_config(d)
    assert (cfg.warmup_runs, cfg.warmup_sizes(), cfg.warmup_data) == (1, (1, 4), "zeros")
    base = (d / "model.toml").read_text()
    (d / "model.toml").write_text(f'{base}[warmup]\nruns = 2\nbatch_sizes = [2]\ndata = "random"\n')
    cfg = load_config(d)
    assert (cfg.warmup_runs, cfg.warmup_sizes(), cfg.warmup_data) == (2, (2,), "random")
    (d / "model.toml").write_text(f"{base}[warmup]\nbatch_sizes = [5]\n")
    with pytest.raises(ValueError, match=r"warmup\.batch_sizes"):
        load_config(d)


def test_a_change_counts_once_it_has_settled(tmp_path: Path) -> None:
    d = write_pixel_detector(tmp_path)
    first = snapshot(tmp_path, None)
    add_version(d, 2)
    moving = snapshot(tmp_path, None)
    assert stable(first, moving, first) == first, "seen once: not yet"
    settled = stable(moving, snapshot(tmp_path, None), first)
    assert sorted(settled.wants["pixels"]) == [1, 2]
    (d / "model.toml").write_text("task = [broken")
    broken = snapshot(tmp_path, None)
    again = stable(broken, snapshot(tmp_path, None), settled)
    assert sorted(again.wants["pixels"]) == [1, 2] and "pixels" in again.errors, "a broken toml keeps what serves"
    shutil.rmtree(d)
    gone = snapshot(tmp_path, None)
    assert "pixels" not in stable(gone, snapshot(tmp_path, None), again).wants


def test_a_model_bigger_than_the_rings_is_served_by_every_worker_and_disturbs_no_other(
    poll_repo: Path, no_leaks: None
) -> None:
    """A new model whose input does not fit the workers' ring slots: each worker replaces its ring
    while serving (the old one drains, then is unlinked) and serves it; the other model's requests
    never fail meanwhile and /health/ready stays 200 (see README)."""
    env = {**FAST, "RINGSERVE_MODEL_CONTROL": "poll"}
    with serving(Appliance(poll_repo, workers=2, env=env)) as app:
        app.wait_all_workers_ready()
        workers = set(app.worker_pids())
        with Traffic(f"{app.url}/api/v1/models/pixels/predict") as traffic:
            wait_for(lambda: traffic.versions[1] >= 20, 30, "requests answered by pixels")
            write_pixel_detector(poll_repo, "wide", size=320)
            serving_wide: set[int] = set()

            def every_worker_serves_wide() -> bool:
                body = httpx.get(f"{app.url}/health", timeout=5).json()
                if "wide/1" in body["models"]:
                    serving_wide.add(body["worker"]["pid"])
                return workers <= serving_wide

            wait_for(every_worker_serves_wide, 60, "every worker to serve the wide model")
            for _ in range(10):  # whichever worker takes it
                r = httpx.post(
                    f"{app.url}/api/v1/models/wide/predict", content=png(), headers={"content-type": "image/png"}
                )
                assert r.status_code == 200 and r.json()["model"]["name"] == "wide", r.text
            seen = traffic.versions[1]
            wait_for(lambda: traffic.versions[1] >= seen + 20, 30, "pixels serving on")
        assert not traffic.failures, traffic.failures[:5]
        assert app.log().count("replaced ring") >= len(workers), "each worker replaced its ring while serving"
        # Each worker's replaced ring was unlinked once its slots were back: one segment per worker.
        wait_for(
            lambda: (
                sorted(int(s.split("-")[2]) for s in segments() if int(s.split("-")[2]) in workers) == sorted(workers)
            ),
            10,
            "one ring per worker",
        )
        body = httpx.get(f"{app.url}/health").json()
        assert body["status"] == "healthy" and {"pixels/1", "wide/1"} <= set(body["models"]), body
