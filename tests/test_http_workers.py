"""The HTTP workers' pool (engine/frontend_cmd.py): the launcher binds the port once and every
worker inherits the socket. A port it cannot bind, and workers whose app cannot start, end
``ringserve serve`` with a clear error, and nothing of it is left running. A worker whose event
loop stops running is killed and replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.harness import ROOT, Appliance, free_port, wait_for


def _serve(repo: Path, run_dir: Path, port: int, env: dict[str, str] | None = None) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "engine", "serve", "--repo", str(repo), "--run-dir", str(run_dir)]
    cmd += ["--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
    before = {p.pid for p in psutil.process_iter()}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    left = [p for p in psutil.process_iter() if p.pid not in before and str(run_dir) in " ".join(_cmd(p))]
    assert not left, f"left running: {[_cmd(p) for p in left]}"
    return done.returncode, done.stdout + done.stderr


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def test_a_port_in_use_ends_serve_with_the_reason(pixel_repo: Path, tmp_path: Path, no_leaks: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = _serve(pixel_repo, tmp_path / "run", port)
    assert code == 1, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Address already in use" in out, out
    assert "engine ready" in out and "stopped" in out, out  # the engine it started was stopped again


def test_workers_that_cannot_start_end_serve_instead_of_restarting_forever(
    pixel_repo: Path, tmp_path: Path, no_leaks: None
) -> None:
    env = dict(os.environ, RINGSERVE_MAX_BODY_BYTES="10")  # below the workers' lower bound (1024)
    code, out = _serve(pixel_repo, tmp_path / "run", free_port(), env)
    assert code == 1, out
    assert "the HTTP worker cannot start" in out and "max_body_bytes" in out, out
    assert "could not start (exit 3); stopping" in out, out
    assert "; started " not in out, out  # no replacement worker was started for it


def test_a_worker_whose_event_loop_stopped_is_killed_and_replaced(pixel_repo: Path, no_leaks: None) -> None:
    with Appliance(pixel_repo, workers=2, args=("--worker-hang-timeout", "2")) as app:
        # Running workers are left alone: each tells the pool every second that its loop runs.
        steady = set(app.worker_pids())
        time.sleep(3)  # the fault under test is time: longer than the hang timeout, nothing stopped
        assert set(app.worker_pids()) == steady and "has not run its event loop" not in app.log()
        victim = app.worker_pids()[0]
        os.kill(victim, signal.SIGSTOP)  # alive, but its loop never runs again
        try:
            wait_for(
                lambda: victim not in app.worker_pids() and len(app.worker_pids()) == 2,
                30,
                "the stopped worker to be replaced",
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        assert f"HTTP worker {victim} has not run its event loop for" in app.log(), app.log()
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
        app.wait_all_workers_ready(30)
        for _ in range(6):  # fresh connections: whichever worker accepts, it answers
            with httpx.Client(timeout=10) as fresh:
                assert fresh.get(f"{app.url}/health/ready").status_code == 200
