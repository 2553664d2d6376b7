"""Issue 14, points 1 and 3: rings are reserved when made, and follow the models the engine serves.

The /dev/shm cases run in a private mount namespace with a small tmpfs (tests/shm_ns.py), so a full
/dev/shm is real and harms nobody else on the box.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import ROOT, Appliance, free_port, wait_for
from tests.models import expected_box, write_pixel_detector
from tests.shm_ns import private_shm, shm_of, why_not
from tests.test_appliance import png

NO_NAMESPACE = why_not()
needs_namespace = pytest.mark.skipif(bool(NO_NAMESPACE), reason=NO_NAMESPACE or "-")
RGB = (200, 100, 50)


def predict(app: Appliance, model: str) -> httpx.Response:
    return httpx.post(
        f"{app.url}/api/v1/models/{model}/predict", content=png(RGB), headers={"content-type": "image/png"}, timeout=10
    )


def each_worker(app: Appliance, check: Callable[[dict], bool], timeout: float, what: str) -> None:
    """``check`` holds for the /health body of every current worker (requests land on any)."""
    seen: set[int] = set()

    def all_of_them() -> bool:
        try:
            r = httpx.get(f"{app.url}/health", timeout=2)
        except httpx.HTTPError:
            return False
        body = r.json()
        if check(body):
            seen.add(body["worker"]["pid"])
        return set(app.worker_pids()) <= seen

    wait_for(all_of_them, timeout, what)


def restart_engine(app: Appliance) -> None:
    old = app.engine_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _engine_or_none(app) not in (None, old), 30, "a new engine")


def _engine_or_none(app: Appliance) -> int | None:
    try:
        return app.engine_pid()
    except (AssertionError, psutil.Error):  # between the old engine's death and the new one's start
        return None


@needs_namespace
def test_serve_refuses_when_the_rings_do_not_fit(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo, "big", size=640)  # 32 slots x 1.2 MB per worker
    run_dir = Path(tempfile.mkdtemp(prefix="rs-"))
    cmd = [*private_shm(12), sys.executable, "-m", "engine", "serve", "--repo", str(repo), "--run-dir", str(run_dir)]
    cmd += ["--workers", "3", "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=90)
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "/dev/shm has 12.0 MB free, the rings need 112.5 MB" in out, out
    assert "raise --shm-size or lower RINGSERVE_RING_SLOTS / WORKERS" in out, out
    assert "serving on" not in out, "no HTTP worker may start"


@needs_namespace
def test_a_ring_that_does_not_fit_is_unhealthy_with_the_reason_never_sigbus(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    with Appliance(repo, workers=2, prefix=private_shm(12)) as app:
        workers = sorted(app.worker_pids())
        assert len(list(shm_of(app.proc.pid).glob("ringserve-*"))) == 2  # type: ignore[union-attr]
        # The next engine also serves a 640x640 model: this worker's ring must grow to 39 MB.
        write_pixel_detector(repo, "big", size=640)
        restart_engine(app)

        def shm_full(body: dict) -> bool:
            return body["status"] == "unhealthy" and "/dev/shm has" in (body["reason"] or "")

        each_worker(app, shm_full, 60, "/health to say why the ring does not fit")
        body = httpx.get(f"{app.url}/health", timeout=5).json()
        assert "the rings need 37.5 MB" in body["reason"], body
        ready = httpx.get(f"{app.url}/health/ready", timeout=5)
        assert ready.status_code == 503 and "/dev/shm has" in ready.json()["reason"], ready.text
        r = predict(app, "pixels")
        assert r.status_code == 503 and "/dev/shm has" in r.json()["detail"], r.text
        assert sorted(app.worker_pids()) == workers, "a worker died (SIGBUS?)"
        assert "SIGBUS" not in app.log() and "died" not in app.log()

        # Without the big model the box recovers by itself, in the same workers.
        for f in sorted((repo / "big").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (repo / "big").rmdir()
        restart_engine(app)
        each_worker(app, lambda b: b["status"] != "unhealthy", 60, "the worker to serve again")
        r = predict(app, "pixels")
        assert r.status_code == 200, r.text
        assert sorted(app.worker_pids()) == workers


def test_rings_follow_the_models_after_an_engine_restart(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    with Appliance(repo, workers=2) as app:
        assert predict(app, "pixels").status_code == 200
        write_pixel_detector(repo, "big", size=256)  # a larger input than every ring's slots
        restart_engine(app)
        each_worker(
            app, lambda b: b["status"] != "unhealthy" and "big/1" in b["models"], 60, "every worker ready for big"
        )
        for _ in range(12):  # both workers, right after they said ready
            r = predict(app, "big")
            assert r.status_code == 200, r.text
            assert r.json()["detections"][0]["bbox"] == pytest.approx(expected_box(RGB, 96, 64), abs=0.6)
        assert "ring" in app.log() and "refused ring" in app.log()
