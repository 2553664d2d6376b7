"""Async jobs across workers (issue 17, point 1): submitted on one, run and polled on any.

Real appliances (engine, uvicorn workers, shm, ZeroMQ, SQLite). The kill tests use a slow
detector (a Loop in the graph, tests/state_models.py), so a job of a few images is still running
when its worker or the engine is killed with SIGKILL.
"""

from __future__ import annotations

import base64
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.harness import Appliance, wait_for
from tests.models import expected_box
from tests.state_models import data_dir, metric, png, query, write_slow_detector

RED, GREEN = (200, 40, 40), (40, 200, 90)


def _fresh(method: str, url: str, **kw: Any) -> httpx.Response:
    """Each call on a connection of its own: consecutive calls land on any worker."""
    with httpx.Client(timeout=30, headers={"Connection": "close"}) as c:
        return c.request(method, url, **kw)


def _wait_job(app: Appliance, job_id: str, timeout: float = 60, **headers: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def finished() -> bool:
        r = _fresh("GET", f"{app.url}/api/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        seen.update(r.json())
        return seen["status"] in ("done", "failed", "cancelled")

    wait_for(finished, timeout, f"job {job_id} to finish (last: {seen})")
    return seen


def _batch_body(*images: bytes) -> dict[str, Any]:
    return {"images": [{"image_b64": base64.b64encode(i).decode()} for i in images]}


def test_jobs_across_workers_answer_the_sync_body(pixel_repo: Path, no_leaks: None) -> None:
    with Appliance(pixel_repo, workers=2) as app:
        image = png(RED)
        sync = _fresh("POST", f"{app.url}/api/v1/predict", content=image, headers={"Content-Type": "image/png"})
        assert sync.status_code == 200

        r = _fresh("POST", f"{app.url}/api/v1/predict/async", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert set(accepted) == {"job_id", "status_url"}
        assert accepted["status_url"] == f"/api/v1/jobs/{accepted['job_id']}" == r.headers["location"]
        job = _wait_job(app, accepted["job_id"])
        assert job["status"] == "done" and job["progress"] == {"done": 1, "total": 1}
        result, expected = job["result"], sync.json()
        assert set(result) == set(expected)
        assert result["request_id"] == r.headers["x-request-id"]
        assert result["detections"] == expected["detections"]
        assert result["detections"][0]["bbox"] == pytest.approx(expected_box(RED, 96, 72), abs=0.5)
        assert result["model"] == expected["model"] and result["image"] == {"width": 96, "height": 72}

        # the batch route's body, a bad image in its place, submitted on some worker, polled on others
        body = _batch_body(png(RED), b"not an image", png(GREEN))
        body["images"].insert(2, {"image_b64": "%%%"})
        r = _fresh("POST", f"{app.url}/api/v1/predict/batch/async", json=body)
        assert r.status_code == 202, r.text
        job = _wait_job(app, r.json()["job_id"])
        assert job["status"] == "done" and job["progress"] == {"done": 4, "total": 4}
        sync_batch = _fresh("POST", f"{app.url}/api/v1/predict/batch", json=body).json()
        assert [sorted(x) for x in job["result"]["results"]] == [sorted(x) for x in sync_batch["results"]]
        assert [x.get("error") for x in job["result"]["results"]] == [None, "bad_input", "bad_input", None]
        assert job["result"]["results"][3]["detections"] == sync_batch["results"][3]["detections"]

        # per-model route, the same 4xx as the sync routes at submission, unknown and finished jobs
        r = _fresh("POST", f"{app.url}/api/v1/models/pixels/versions/1/predict/async", json={"image_b64": "%%%"})
        assert r.status_code == 400 and r.json()["error"] == "bad_input"
        r = _fresh(
            "POST", f"{app.url}/api/v1/models/nope/predict/async", content=image, headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 404
        r = _fresh(
            "POST",
            f"{app.url}/api/v1/models/pixels/predict/async",
            json={"image_b64": base64.b64encode(b"xx").decode()},
        )
        failed = _wait_job(app, r.json()["job_id"])
        assert failed["status"] == "failed" and failed["error"].startswith("bad_input")
        assert failed["result"]["error"] == "bad_input" and failed["result"]["request_id"] == r.headers["x-request-id"]
        assert _fresh("GET", f"{app.url}/api/v1/jobs/0123").status_code == 404
        gone = _fresh("DELETE", f"{app.url}/api/v1/jobs/{accepted['job_id']}")
        assert gone.status_code == 409 and gone.json()["error"] == "job_finished"

        scrape = httpx.get(f"{app.url}/metrics").text
        assert metric(scrape, "ringserve_jobs_total", event="submitted") == 3  # not the refused bodies
        assert metric(scrape, "ringserve_jobs_total", event="done") == 2
        assert metric(scrape, "ringserve_jobs_total", event="failed") == 1
        # the shared database sits beside the model repository by default, schema versioned
        assert query(data_dir(pixel_repo) / "jobs.db", "SELECT version FROM schema_version") == [(1,)]


def test_job_visible_only_with_a_key_and_cancellable(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_slow_detector(repo, iterations=200_000)  # ~0.25 s per image
    env = {"RINGSERVE_API_KEY": "k-1", "RINGSERVE_DATA_DIR": str(tmp_path / "state")}
    with Appliance(repo, workers=2, env=env, default_model="slow") as app:
        key = {"X-API-Key": "k-1"}
        body = _batch_body(*(png(RED) for _ in range(12)))
        assert _fresh("POST", f"{app.url}/api/v1/predict/batch/async", json=body).status_code == 401
        r = _fresh("POST", f"{app.url}/api/v1/predict/batch/async", json=body, headers=key)
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        assert _fresh("GET", f"{app.url}/api/v1/jobs/{job_id}").status_code == 401
        wait_for(
            lambda: _fresh("GET", f"{app.url}/api/v1/jobs/{job_id}", headers=key).json()["progress"]["done"] >= 1,
            30,
            "the job to make progress",
        )
        r = _fresh("DELETE", f"{app.url}/api/v1/jobs/{job_id}", headers=key)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        stopped_at = r.json()["progress"]["done"]
        # the runner notices within a third of the lease, and records nothing more
        wait_for(lambda: f"job {job_id}: cancelled or taken over; stopping" in app.log(), 10, "the runner to stop")
        after = _fresh("GET", f"{app.url}/api/v1/jobs/{job_id}", headers=key).json()
        assert after["status"] == "cancelled" and after["progress"]["done"] <= stopped_at + 4
        assert (tmp_path / "state" / "jobs.db").exists()  # RINGSERVE_DATA_DIR is honoured


def _lease_owner(db: Path, job_id: str) -> int | None:
    rows = query(db, "SELECT lease_owner FROM job WHERE id = ? AND status = 'running'", job_id)
    return int(str(rows[0][0]).split("-")[0]) if rows and rows[0][0] else None


def test_worker_killed_mid_job_is_taken_over(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_slow_detector(repo, iterations=120_000)  # ~0.15 s per image, one at a time
    env = {"RINGSERVE_JOB_LEASE_S": "1.5"}
    with Appliance(repo, workers=2, env=env, default_model="slow") as app:
        images = [png((10 * i, 100, 50)) for i in range(16)]
        r = _fresh("POST", f"{app.url}/api/v1/predict/batch/async", json=_batch_body(*images))
        job_id = r.json()["job_id"]
        db = data_dir(repo) / "jobs.db"
        owner: list[int] = []

        def running_with_progress() -> bool:
            pid = _lease_owner(db, job_id)
            done = query(db, "SELECT done FROM job WHERE id = ?", job_id)[0][0]
            if pid is not None and int(done) >= 2:  # type: ignore[call-overload]
                owner.append(pid)
                return True
            return False

        wait_for(running_with_progress, 30, "the job to run on a worker", every=0.02)
        victim = owner[0]
        assert victim in app.worker_pids()
        os.kill(victim, signal.SIGKILL)
        job = _wait_job(app, job_id, timeout=60)
        assert job["status"] == "done", job
        assert job["progress"] == {"done": 16, "total": 16}
        results = job["result"]["results"]
        assert [x["index"] for x in results] == list(range(16)) and not any("error" in x for x in results)
        assert results[5]["detections"][0]["bbox"] == pytest.approx(expected_box((50, 100, 50), 96, 72), abs=0.5)
        attempts = query(db, "SELECT attempts FROM job WHERE id = ?", job_id)[0][0]
        assert attempts == 2
        assert "taking it over (attempt 2)" in app.log()
        wait_for(lambda: len(app.worker_pids()) == 2 and victim not in app.worker_pids(), 30, "a new worker")
        app.wait_all_workers_ready(30)


def test_engine_killed_mid_job_retries_then_fails_with_a_reason(tmp_path: Path, no_leaks: None) -> None:
    repo = tmp_path / "repo"
    write_slow_detector(repo, iterations=120_000)
    env = {"RINGSERVE_JOB_ATTEMPTS": "5"}
    with Appliance(repo, workers=2, env=env, default_model="slow") as app:
        images = [png((10 * i, 60, 50)) for i in range(10)]
        r = _fresh("POST", f"{app.url}/api/v1/predict/batch/async", json=_batch_body(*images))
        job_id = r.json()["job_id"]
        wait_for(
            lambda: _fresh("GET", f"{app.url}/api/v1/jobs/{job_id}").json()["progress"]["done"] >= 2, 30, "progress"
        )
        os.kill(app.engine_pid(), signal.SIGKILL)  # the launcher restarts it
        job = _wait_job(app, job_id, timeout=90)
        assert job["status"] == "done", job
        assert job["progress"] == {"done": 10, "total": 10}
        assert not any("error" in x for x in job["result"]["results"])
        scrape = httpx.get(f"{app.url}/metrics").text
        assert metric(scrape, "ringserve_jobs_total", event="retried") >= 1

        # an engine that stops answering (SIGSTOP): the job is retried, then failed with the reason
        engine = psutil.Process(app.engine_pid())
        r = _fresh("POST", f"{app.url}/api/v1/predict/async", content=images[0], headers={"Content-Type": "image/png"})
        engine.suspend()
        try:
            job = _wait_job(app, r.json()["job_id"], timeout=90)
        finally:
            engine.resume()
        assert job["status"] == "failed", job
        assert job["error"].startswith("gave up after 5 attempts: engine_down"), job["error"]


def test_job_caps_and_retention(tmp_path: Path) -> None:
    """Past the cap of stored jobs (or bytes) a job is refused; finished jobs go after the retention."""
    from frontend.state import jobs
    from frontend.state.db import Database

    db = Database(tmp_path / "jobs.db", jobs.MIGRATIONS, name="jobs")

    def submit(data: bytes, max_jobs: int = 2, max_bytes: int = 100) -> str:
        return db.call_sync(
            lambda c: jobs.submit(
                c,
                owner="",
                kind="single",
                model="m",
                version=1,
                request_id="r",
                client="-",
                items=[jobs.NewItem(data, {})],
                max_jobs=max_jobs,
                max_bytes=max_bytes,
            )
        )

    try:
        first = submit(b"x" * 60)
        with pytest.raises(jobs.JobsFull, match="bytes"):
            submit(b"x" * 60)
        submit(b"x" * 10)
        with pytest.raises(jobs.JobsFull, match="2 jobs"):
            submit(b"x")
        job, _ = db.call_sync(jobs.claim, "w1", 10.0, 3)
        assert job is not None and job.id == first and job.pending[0][1] == b"x" * 60
        assert db.call_sync(jobs.complete, first, "w1", "done", None, {"ok": 1})
        assert db.call_sync(jobs.sweep, 3600.0) == 0
        assert db.call_sync(jobs.sweep, -1.0) == 1  # finished "more than -1 s ago": gone
        assert db.call_sync(jobs.view, first) is None
        submit(b"x")  # room again
    finally:
        db.close()
