"""The batcher's waiting rule with two instances: a batch waits for company only while the other
instance runs, and stops waiting when that run ends (not when max_queue_delay_ms runs out)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np

from engine.batcher import Answer, Batcher, Job
from engine.models import load
from engine.repository import scan
from ipc import messages as m
from tests.harness import wait_for
from tests.models import write_pixel_detector

DELAY_MS = 5000.0  # far longer than a run of the slow model


def test_a_batch_waiting_for_company_runs_when_the_other_instance_finishes(tmp_path: Path) -> None:
    write_pixel_detector(tmp_path / "repo", size=8, delay_ms=DELAY_MS, busy=40)  # a run of some 100s of ms
    [cfg], _ = scan(tmp_path / "repo")
    model = load(cfg, 1, ["CPUExecutionProvider"], 1)
    replies: queue.Queue[tuple[str, m.Message, float]] = queue.Queue()

    def reply(answers: list[Answer]) -> None:
        for job, msg in answers:
            replies.put((job.msg.req_id, msg, time.perf_counter()))

    batcher = Batcher(model, reply, instances=2)
    batcher.start()

    def submit(req_id: str, slot: int) -> float:
        msg = m.Infer(req_id, cfg.name, 1, slot, 1, 8, 8, time.time() + 60)
        sent = time.perf_counter()
        batcher.submit(Job(b"w", msg, np.full((8, 8, 3), 200, np.uint8), sent))
        batcher.wake()
        return sent

    try:
        submit("first", 0)
        wait_for(lambda: batcher.depth == 0, 10, "an instance to take the first request")  # and run it
        second_sent = submit("second", 1)
        got = [replies.get(timeout=30) for _ in range(2)]
    finally:
        batcher.stop()
        batcher.join(5)
    assert [req_id for req_id, _, _ in got] == ["first", "second"]
    (_, first, _), (_, second, second_at) = got
    assert isinstance(first, m.Result) and isinstance(second, m.Result)
    assert first.batch_size == second.batch_size == 1
    # The second waited for company while the first ran, then ran at once: it was answered one run
    # after the first, far sooner than its delay.
    assert second_at - second_sent < DELAY_MS / 1000 / 2, (second_at - second_sent, first.inference_ms)
    assert second.queue_ms < DELAY_MS / 2, second.queue_ms
