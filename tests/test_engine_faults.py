"""Issue 14, point 2: no engine thread dies silently.

A V2 request naming no outputs asks for raw tensors; a model with a 0-d output cannot give them
per image, so the batcher fails after the session ran. Every such request must get an answer (an
internal error), its slot must come back and the thread must go on serving.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np

from engine.batcher import Answer, Batcher, Job
from engine.models import load
from engine.repository import scan
from engine.server import EXIT_THREAD_DIED
from ipc import messages as m
from tests.fault_models import write_scalar_output_detector
from tests.harness import Appliance, wait_for
from tests.test_appliance import png

SLOTS = 4  # fewer than the failing requests: a slot that is not freed shows as a 503 overload


def _v2_infer(url: str, rgb: int) -> httpx.Response:
    body = {"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": [rgb] * (64 * 64 * 3)}]}
    return httpx.post(f"{url}/v2/models/scalar/infer", json=body, timeout=10)


def test_failing_raw_extraction_answers_every_job_and_the_thread_goes_on(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_scalar_output_detector(repo)
    env = {"RINGSERVE_RING_SLOTS": str(SLOTS)}
    with Appliance(repo, workers=1, env=env, default_model="scalar") as app:
        for i in range(3 * SLOTS):
            r = _v2_infer(app.url, i)
            assert r.status_code == 500, (r.status_code, r.text)
            assert "engine failed" in r.json()["error"], r.text
        # Still served by the same engine (no restart), with every slot back.
        ok = httpx.post(
            f"{app.url}/api/v1/predict", content=png((200, 100, 50)), headers={"content-type": "image/png"}, timeout=10
        )
        assert ok.status_code == 200, (ok.text, app.log()[-4000:])
        health = httpx.get(f"{app.url}/health", timeout=5).json()
        assert health["status"] == "healthy", health
        assert health["worker"]["ring_in_use"] == 0, health
        assert health["engine"]["restarts"] == 0, health
        metrics = httpx.get(f"{app.url}/metrics", timeout=5).text
        assert 'ringserve_engine_errors_total{reason="internal"} 12.0' in metrics, metrics
        assert "ringserve_engine_thread_deaths_total 0.0" in metrics


class _Boom(BaseException):
    """Not an Exception: the per-batch guard lets it through, so the thread really ends."""


def test_a_thread_that_ends_anyway_is_reported(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_scalar_output_detector(repo, size=8)
    [cfg], _ = scan(repo)
    model = load(cfg, 1, ["CPUExecutionProvider"], 1)
    replied = threading.Event()

    def reply(answers: list[Answer]) -> None:
        replied.set()
        raise _Boom

    batcher = Batcher(model, reply)
    batcher.start()
    try:
        assert batcher.dead() == []
        msg = m.Infer("r", "scalar", 1, 0, 1, 8, 8, time.time() + 10)
        batcher.submit(Job(b"w", msg, np.zeros((8, 8, 3), np.uint8), time.perf_counter()))
        batcher.wake()
        wait_for(lambda: bool(batcher.dead()), 10, "the batcher thread to be seen dead")
        assert replied.is_set()
        assert batcher.dead() == ["batcher-scalar-1-0"]
    finally:
        batcher.stop()
        batcher.join(5)
    assert batcher.dead() == []  # a stopped batcher is not a dead one
    assert EXIT_THREAD_DIED != 0


def test_answers_that_cannot_be_handed_over_fail_their_batch_not_the_thread(tmp_path: Path) -> None:
    """Where handing a batch's answers over fails (the engine encodes them there), every job of the
    batch gets an error instead, and the instance serves the next batch."""
    repo = tmp_path / "repo"
    write_scalar_output_detector(repo, size=8)
    [cfg], _ = scan(repo)
    model = load(cfg, 1, ["CPUExecutionProvider"], 1)
    got: list[m.Result | m.Error] = []
    refuse = threading.Event()
    refuse.set()

    def reply(answers: list[Answer]) -> None:
        if refuse.is_set() and any(isinstance(msg, m.Result) for _, msg in answers):
            refuse.clear()
            raise TypeError("Encoding objects of type numpy.float32 is unsupported")
        got.extend(msg for _, msg in answers)

    batcher = Batcher(model, reply)
    batcher.start()
    try:
        for slot in range(2):
            msg = m.Infer(f"r{slot}", "scalar", 1, slot, 1, 8, 8, time.time() + 10)
            batcher.submit(Job(b"w", msg, np.zeros((8, 8, 3), np.uint8), time.perf_counter()))
            batcher.wake()
            wait_for(lambda n=slot + 1: len(got) == n, 10, f"the answer to r{slot}")  # type: ignore[misc]
    finally:
        batcher.stop()
        batcher.join(5)
    first, second = got
    assert isinstance(first, m.Error) and first.reason == "internal" and "numpy.float32" in first.detail, first
    assert isinstance(second, m.Result) and second.req_id == "r1", second
    assert batcher.dead() == []
