"""Issue 14, points 4 and 9: ready means the send path works after an engine restart, and
``ringserve serve`` gives up on an engine that keeps dying.

Before: for up to the heartbeat timeout after the engine's connection closed, a worker still said
ready, and an infer then failed with 503 "the engine's socket queue is full" (the DEALER, IMMEDIATE,
had no connection to queue on). Now readiness follows the connection (ZMQ socket monitor).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import Appliance, wait_for
from tests.test_appliance import colour, png

KILLS = 50
FAST = (
    "--restart-backoff-max",
    "0.05",
    "--max-restarts",
    "1000",
    "--providers",
    "cpu",
    "--threads",
    "1",
    "--instances",
    "1",
)


def _engine(app: Appliance) -> int | None:
    try:
        return app.engine_pid()
    except (AssertionError, psutil.Error):
        return None


def _predict(client: httpx.Client, url: str, i: int) -> httpx.Response:
    return client.post(f"{url}/api/v1/predict", content=png(colour(i)), headers={"content-type": "image/png"})


def wait_workers_on(app: Appliance, old_instance: str, timeout: float) -> None:
    """Every worker reports itself ready on an engine instance other than ``old_instance``."""
    seen: set[int] = set()

    def all_ready() -> bool:
        try:
            body = httpx.get(f"{app.url}/health", timeout=2).json()
        except httpx.HTTPError:
            return False
        if body["status"] != "unhealthy" and body["engine"]["instance"] not in (None, old_instance):
            seen.add(body["worker"]["pid"])
        return set(app.worker_pids()) <= seen

    wait_for(all_ready, timeout, "every worker ready on the new engine")


class LightLoad:
    def __init__(self, url: str, threads: int = 2) -> None:
        self.url = url
        self.stop = threading.Event()
        self.statuses: list[tuple[int, str]] = []
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = k
            while not self.stop.is_set():
                i += 7
                try:
                    r = _predict(client, self.url, i)
                    self.statuses.append((r.status_code, r.json().get("detail", "")))
                except httpx.TransportError as exc:  # a hang shows here as a timeout
                    self.statuses.append((0, repr(exc)))
                time.sleep(0.02)  # light load: a request every 20 ms per thread, not a flood

    def __enter__(self) -> LightLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(20)
            assert not t.is_alive(), "a load thread hung"


@pytest.mark.timeout(400)
def test_fifty_engine_kills_under_light_load(pixel_repo: Path, no_leaks: None) -> None:
    started = time.monotonic()
    with Appliance(pixel_repo, workers=2, args=FAST) as app, LightLoad(app.url) as load, httpx.Client(timeout=10) as c:
        for k in range(KILLS):
            instance = httpx.get(f"{app.url}/health", timeout=5).json()["engine"]["instance"]
            old = app.engine_pid()
            os.kill(old, signal.SIGKILL)
            wait_for(lambda old=old: _engine(app) not in (None, old), 30, f"engine restart #{k + 1}")
            wait_workers_on(app, instance, 30)
            for i in range(4):  # right after every worker said ready: served, no 503
                r = _predict(c, app.url, k * 10 + i)
                assert r.status_code == 200, (k, r.status_code, r.text)
    elapsed = time.monotonic() - started
    bad = [s for s in load.statuses if s[0] not in (200, 503)]
    queue_full = [s for s in load.statuses if s[0] == 503 and "socket queue is full" in s[1]]
    assert not bad, bad[:5]
    assert not queue_full, queue_full[:5]
    assert sum(s[0] == 200 for s in load.statuses) > KILLS
    details = sorted({s[1] for s in load.statuses if s[0] == 503})
    print(f"{KILLS} engine kills in {elapsed:.1f}s; load: {len(load.statuses)} requests; 503s: {details}")


def test_serve_gives_up_after_too_many_restarts_in_the_window(pixel_repo: Path, no_leaks: None) -> None:
    args = ("--max-restarts", "2", "--restart-window", "120", "--restart-backoff-max", "0.05")
    app = Appliance(pixel_repo, workers=2, args=args).start()
    procs = app.tree()
    try:
        for k in range(3):
            old = app.engine_pid()
            os.kill(old, signal.SIGKILL)
            if k < 2:
                wait_for(lambda old=old: _engine(app) not in (None, old), 30, "an engine restart")
        assert app.proc is not None
        assert app.proc.wait(30) == 3
        assert "3 exits within 120s (--max-restarts 2 --restart-window 120); giving up" in app.log(), app.log()
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive, f"left running: {alive}"
    finally:
        app.kill()
        app.cleanup()
