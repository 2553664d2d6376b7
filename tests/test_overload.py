"""Backpressure and deadlines on a live appliance: fast 503s with Retry-After, 504s, no hang, no lost slot.

One appliance: one worker with a ring of 4 slots and a request deadline of 3 s, and four models:
``pixels`` (normal), ``held`` (the batcher waits 1.2 s for company, so requests hold their slots),
``slow`` (each run takes a while, one image per batch, a queue of 2) and ``late`` (answers after 4.5 s,
past every deadline).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from ipc.shm import pid_alive
from tests.harness import Appliance, segments, wait_for
from tests.models import expected_box, pixel_detector_onnx, write_pixel_detector
from tests.test_appliance import colour, png

SLOTS = 4
TIMEOUT_S = 3.0
HELD_MS = 1200.0
LATE_MS = 4500.0


def slow_detector_onnx(size: int = 64, side: int = 512, rounds: int = 8) -> onnx.ModelProto:
    """The pixel detector plus ``rounds`` side x side matrix products that depend on the input (so
    they cannot be folded away) and add exactly 0 to the score: same answers, slow runs."""
    model = pixel_detector_onnx(size)
    graph = model.graph
    [scores_node] = [n for n in graph.node if n.output[0] == "scores"]
    scores_node.output[0] = "scores_fast"
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((side, side)))  # orthogonal: stays bounded
    graph.initializer.extend(
        [
            numpy_helper.from_array(q.astype(np.float32), "Q"),
            numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero_f"),
        ]
    )
    nodes = [
        helper.make_node("ReduceSum", ["m"], ["s"], keepdims=0),
        helper.make_node("Mul", ["Q", "s"], ["h0"]),
    ]
    for i in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "Q"], [f"h{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"h{rounds}"], ["hs"], keepdims=0),
        helper.make_node("Mul", ["hs", "zero_f"], ["nothing"]),
        helper.make_node("Add", ["scores_fast", "nothing"], ["scores"]),
    ]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


@dataclass
class Outcome:
    status: int
    seconds: float
    body: dict
    retry_after: str | None


async def _burst(url: str, n: int, **params: str) -> list[Outcome]:
    """``n`` requests at once, each with its own image; every one must end (a hang fails the test)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:

        async def one(i: int) -> Outcome:
            started = time.monotonic()
            r = await client.post(url, content=png(colour(i)), params=params, headers={"content-type": "image/png"})
            return Outcome(r.status_code, time.monotonic() - started, r.json(), r.headers.get("retry-after"))

        return list(await asyncio.gather(*(one(i) for i in range(n))))


def burst(app: Appliance, model: str, n: int, **params: str) -> list[Outcome]:
    return asyncio.run(_burst(f"{app.url}/api/v1/models/{model}/predict", n, **params))


def health(app: Appliance) -> dict:
    return httpx.get(f"{app.url}/health", timeout=5).json()


def ring_in_use(app: Appliance) -> int:
    return int(health(app)["worker"]["ring_in_use"])


def assert_served_again(app: Appliance) -> None:
    """Once the load is gone: no slot held, and every request is answered, correctly."""
    wait_for(lambda: ring_in_use(app) == 0, 15, "every ring slot to come back")
    with httpx.Client(timeout=10) as client:
        for i in range(8):
            r = client.post(f"{app.url}/api/v1/predict", content=png(colour(i)), headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            assert r.json()["detections"][0]["bbox"] == pytest.approx(expected_box(colour(i), 96, 64), abs=0.6)
    h = health(app)
    assert h["status"] == "healthy" and h["engine"]["losses_seen_by_worker"] == 0, h
    assert h["worker"]["ring_in_use"] == 0 and h["worker"]["in_flight"] == 0, h


def assert_overloaded(o: Outcome) -> None:
    assert o.status == 503, o
    assert set(o.body) == {"error", "detail", "request_id"}, o
    assert o.body["error"] == "overload", o
    assert o.retry_after is not None and int(o.retry_after) >= 1, o


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    before = segments()
    repo: Path = tmp_path_factory.mktemp("overload") / "repo"
    write_pixel_detector(repo)
    # The batcher holds every request of these two for the whole delay (wait_alone).
    write_pixel_detector(repo, "held", max_batch_size=64, delay_ms=HELD_MS, wait_alone=True)
    write_pixel_detector(repo, "late", max_batch_size=64, delay_ms=LATE_MS, wait_alone=True)
    slow = write_pixel_detector(repo, "slow", max_batch_size=1, delay_ms=0.0, queue_limit=2)
    onnx.save(slow_detector_onnx(), str(slow / "1" / "model.onnx"))
    env = {
        "RINGSERVE_RING_SLOTS": str(SLOTS),
        "RINGSERVE_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "RINGSERVE_CPU_MAX_BATCH": "0",  # the models' own max_batch_size: "held" keeps all its requests
        "RINGSERVE_INSTANCES": "1",  # one run at a time: "slow"'s queue of 2 fills before the ring of 4
    }
    with Appliance(repo, workers=1, env=env) as appliance:
        yield appliance
        log = appliance.log()
        assert "Traceback" not in log and "unhandled error" not in log, log[-4000:]
    left = sorted(s for s in segments() - before if not pid_alive(int(s.split("-")[2])))
    assert not left, f"segments left in /dev/shm: {left}"


def test_full_ring_answers_503_at_once(app: Appliance) -> None:
    """20 requests at once, 4 slots, each slot held 1.2 s by the batcher: 4 run, 4 more wait for a
    slot (a ring's worth), the rest are refused now."""
    outcomes = burst(app, "held", 20)
    # a waiting request that gets its slot late may run out of its 3 s: 504, never a hang
    assert {o.status for o in outcomes} <= {200, 503, 504}, outcomes
    served = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status == 503]
    assert len(served) >= SLOTS, outcomes
    assert len(refused) >= 20 - 3 * SLOTS, outcomes  # a few may arrive after the first slots came back
    for o in refused:
        assert_overloaded(o)
        assert "ring slots" in o.body["detail"] and "wait for one" in o.body["detail"], o
        assert o.seconds < HELD_MS / 1000, f"a refusal waited {o.seconds:.2f}s: it queued for a slot"
    assert_served_again(app)


def test_full_engine_queue_answers_503_at_once(app: Appliance) -> None:
    """A model whose queue holds 2 while one slow run goes on: the engine refuses, the worker says 503."""
    outcomes = burst(app, "slow", 16)
    assert {o.status for o in outcomes} <= {200, 503}, [o for o in outcomes if o.status not in (200, 503)]
    refused = [o for o in outcomes if o.status == 503]
    for o in refused:
        assert_overloaded(o)
    by_engine = [o for o in refused if "queue of slow is full" in o.body["detail"]]
    assert by_engine, [o.body["detail"] for o in refused]
    for o in [o for o in outcomes if o.status == 200]:
        assert o.body["detections"], o
    assert_served_again(app)


def test_deadline_504_keeps_the_slot_until_the_engine_lets_go(app: Appliance) -> None:
    """timeout_s 0.3 on a request the batcher holds 1.2 s: 504 at once, but its slot stays taken
    until the engine answers (the engine may still read the pixels), and only then comes back."""
    assert ring_in_use(app) == 0
    started = time.monotonic()
    r = httpx.post(
        f"{app.url}/api/v1/models/held/predict", json={"image_b64": _b64(png((1, 2, 3))), "timeout_s": 0.3}, timeout=10
    )
    answered = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"] == "timeout"
    assert 0.25 <= answered < HELD_MS / 1000, answered
    assert ring_in_use(app) == 1, "the timed-out request's slot was given back before the engine answered"
    wait_for(lambda: ring_in_use(app) == 0, 10, "the engine to answer and free the slot")
    freed = time.monotonic() - started
    assert freed >= HELD_MS / 1000 * 0.9, f"the slot came back after {freed:.2f}s, before the engine let go"
    assert_served_again(app)


def test_per_request_timeout_cannot_exceed_the_server_deadline(app: Appliance) -> None:
    """timeout_s=100 on a model that answers after 4.5 s: 504 at REQUEST_TIMEOUT_S (3 s), not later."""
    started = time.monotonic()
    r = httpx.post(
        f"{app.url}/api/v1/models/late/predict",
        content=png((4, 5, 6)),
        params={"timeout_s": "100"},
        headers={"content-type": "image/png"},
        timeout=20,
    )
    answered = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert TIMEOUT_S * 0.9 <= answered < LATE_MS / 1000, answered
    assert ring_in_use(app) == 1
    wait_for(lambda: ring_in_use(app) == 0, 10, "the engine to answer and free the slot")
    assert time.monotonic() - started >= LATE_MS / 1000 * 0.9
    assert_served_again(app)


def test_timed_out_slots_fill_the_ring_then_come_back(app: Appliance) -> None:
    """Four requests that time out hold all four slots until the engine lets go of them (1.2 s).
    The next request waits for a slot and is served once one comes back, not refused while the
    engine has room; one that cannot wait that long is a 504 at its own deadline, not a hang."""
    started = time.monotonic()
    outcomes = burst(app, "held", SLOTS, timeout_s="0.3")
    assert [o.status for o in outcomes] == [504] * SLOTS, outcomes
    assert ring_in_use(app) == SLOTS
    [impatient] = burst(app, "pixels", 1, timeout_s="0.2")
    assert impatient.status == 504 and impatient.body["error"] == "timeout", impatient
    assert "ring slot" in impatient.body["detail"] and impatient.seconds < 1.0, impatient
    [waited] = burst(app, "pixels", 1)
    assert waited.status == 200 and waited.body["detections"], waited
    assert time.monotonic() - started >= HELD_MS / 1000 * 0.9  # it had to wait for the engine
    assert_served_again(app)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
