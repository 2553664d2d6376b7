"""Kill -9 the engine or a worker, SIGTERM the appliance, all under concurrent load."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import Appliance, segments, wait_for
from tests.models import expected_box, write_pixel_detector
from tests.test_appliance import colour, png


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0: connection-level error
    body: dict | None
    i: int


class Load:
    """Threads that each send requests one after another until stopped."""

    def __init__(self, url: str, threads: int = 8) -> None:
        self.url = url
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)
            assert not t.is_alive(), "a load thread hung"

    def _run(self, k: int) -> None:
        with httpx.Client(timeout=20) as client:
            i = k
            while not self.stop.is_set():
                i += 1000
                started = time.monotonic()
                try:
                    r = client.post(
                        f"{self.url}/api/v1/predict", content=png(colour(i)), headers={"content-type": "image/png"}
                    )
                    status, body = r.status_code, r.json()
                except httpx.TransportError:
                    status, body = 0, None
                with self._lock:
                    self.outcomes.append(Outcome(started, time.monotonic(), status, body, i))

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def served_since(self, count: int, n: int) -> bool:
        return self.count() >= count + n

    def check_answers(self) -> None:
        for o in self.outcomes:
            if o.status == 200:
                assert o.body is not None
                assert o.body["detections"][0]["bbox"] == pytest.approx(expected_box(colour(o.i), 96, 64), abs=0.6)
            elif o.status:
                assert o.status in (503, 504), o
                assert o.body is not None and set(o.body) == {"error", "detail", "request_id"}


def test_engine_kill_fails_in_flight_fast_and_recovers(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    # A long queue delay keeps requests in flight inside the engine when it dies.
    write_pixel_detector(repo, max_batch_size=64, delay_ms=300.0, wait_alone=True)
    # ... as long as the batches may hold all of them (the model's own max_batch_size)
    with Appliance(repo, workers=2, env={"RINGSERVE_CPU_MAX_BATCH": "0"}) as app:
        with Load(app.url, threads=12) as load:
            wait_for(lambda: load.count() >= 24, 30, "some load")
            engine = app.engine_pid()
            os.kill(engine, signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: any(o.status == 503 for o in load.outcomes), 10, "a 503")
            app.wait_ready(30)
            assert app.engine_pid() != engine
            before = load.count()
            wait_for(
                lambda: any(o.status == 200 and o.started > killed + 0.1 for o in load.outcomes[before:]),
                30,
                "a correct answer after the restart",
            )
        in_flight = [o for o in load.outcomes if o.started < killed < o.ended]
        assert in_flight, "no request was in flight at the kill"
        slowest = max(o.ended - killed for o in in_flight)
        assert slowest < 1.5, f"an in-flight request waited {slowest:.2f}s after the kill"
        assert all(o.status in (200, 503, 504) for o in load.outcomes), {o.status for o in load.outcomes}
        load.check_answers()
        health = httpx.get(f"{app.url}/health").json()
        assert health["engine"]["restarts"] == 1
        assert health["status"] == "degraded"


def test_worker_kill_is_replaced_and_its_segment_reclaimed(pixel_repo: Path, no_leaks: None) -> None:
    with Appliance(pixel_repo, workers=2) as app:
        wait_for(lambda: len(app.worker_pids()) == 2, 30, "two workers")
        wait_for(lambda: len(segments()) >= 2, 30, "two rings")
        with Load(app.url, threads=6) as load:
            wait_for(lambda: load.count() >= 20, 30, "some load")
            victim = app.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: victim not in app.worker_pids() and len(app.worker_pids()) == 2,
                30,
                "the launcher to replace the worker",
            )
            dead = {s for s in segments() if s.split("-")[2] == str(victim)}
            # The replacement worker removes segments of dead pids when it starts.
            wait_for(lambda: not (dead & segments()), 30, "the dead worker's segment to be removed")
            before = load.count()
            wait_for(lambda: sum(o.status == 200 for o in load.outcomes[before:]) >= 20, 30, "service after")
        load.check_answers()
        statuses = {o.status for o in load.outcomes}
        assert statuses <= {200, 0}, statuses  # only the killed worker's connections may break


def test_sigterm_drains_accepted_requests_and_leaves_nothing(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo, max_batch_size=8, delay_ms=50.0)
    app = Appliance(repo, workers=2).start()
    procs = [app.proc, *app.tree()]
    with Load(app.url, threads=8) as load:
        wait_for(lambda: load.count() >= 40, 30, "some load")
        stopped = time.monotonic()
        app.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        app.proc.wait(10)  # type: ignore[union-attr]
        assert time.monotonic() - stopped < 10
    _gone, alive = psutil.wait_procs([p for p in procs if isinstance(p, psutil.Process)], timeout=5)
    assert not alive, f"left running: {alive}"
    # Every request the appliance answered was answered properly; refused connections after the
    # listener closed are not accepted requests.
    answered = [o for o in load.outcomes if o.status]
    assert answered and all(o.status == 200 for o in answered), {o.status for o in answered}
    load.check_answers()
    assert not (app.run_dir / "engine.sock").exists()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{app.url}/health/live", timeout=2)
    app._log.close()


def _losses(app: Appliance) -> dict[int, int]:
    """Engine losses seen by each worker that answered one of a few /health calls."""
    seen: dict[int, int] = {}
    for _ in range(12):
        body = httpx.get(f"{app.url}/health", timeout=5).json()
        seen[body["worker"]["pid"]] = body["engine"]["losses_seen_by_worker"]
    return seen


def test_a_paused_worker_does_not_take_its_own_pause_for_the_engines_death(pixel_repo: Path, no_leaks: None) -> None:
    """A worker stopped (SIGSTOP: as a starved or swapped-in process) for longer than the heartbeat
    timeout finds the engine's heartbeats waiting when it runs again: its requests are answered and
    it loses nothing. Before, it declared the engine lost on every such pause and failed its
    in-flight requests with 503. An engine that stops is still seen as lost."""
    pause_s = 1.0  # the fault's length (> heartbeat_timeout_s, 0.6), not a wait for a condition
    with Appliance(pixel_repo, workers=2) as app:
        victim = app.worker_pids()[0]
        with Load(app.url, threads=6) as load:
            wait_for(lambda: load.count() >= 20, 30, "some load")
            for _ in range(3):
                os.kill(victim, signal.SIGSTOP)
                time.sleep(pause_s)
                os.kill(victim, signal.SIGCONT)
                wait_for(functools.partial(load.served_since, load.count(), 10), 30, "service after the pause")
        load.check_answers()
        assert {o.status for o in load.outcomes} == {200}, [o for o in load.outcomes if o.status != 200][:3]
        wait_for(lambda: victim in _losses(app), 30, "the paused worker to answer /health")
        assert set(_losses(app).values()) == {0}, app.log()[-3000:]
        assert "engine lost" not in app.log()

        engine = app.engine_pid()
        os.kill(engine, signal.SIGSTOP)
        time.sleep(pause_s)
        os.kill(engine, signal.SIGCONT)
        wait_for(lambda: any(_losses(app).values()), 30, "a worker to have seen the engine's silence")
        assert "engine lost: no heartbeat" in app.log()
