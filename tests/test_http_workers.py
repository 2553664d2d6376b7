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


def test_a_launcher_killed_with_sigkill_leaves_no_engine_or_worker_behind(pixel_repo: Path, no_leaks: None) -> None:
    app = Appliance(pixel_repo, workers=2).start()
    assert app.proc is not None
    children = app.tree()
    assert len(children) == 3
    os.kill(app.proc.pid, signal.SIGKILL)  # nothing of the launcher's own shutdown runs
    app.proc.wait()
    _gone, alive = psutil.wait_procs(children, timeout=30)  # they stop as on SIGTERM: drained, rings removed
    try:
        assert not alive, f"left running after the launcher died: {[p.cmdline() for p in alive]}"
        assert not (app.run_dir / "engine.sock").exists()
    finally:
        for p in alive:
            p.kill()
        app._log.close()
        app.cleanup()


def test_a_worker_gets_its_start_before_the_hang_timeout_counts(tmp_path: Path) -> None:
    """A worker's first byte comes only once its app has started (2-3 s here): with a hang timeout
    shorter than that, it must not be killed while it starts (the limit is START_GRACE_S then)."""
    from engine.frontend_cmd import START_GRACE_S, FrontendArgs, HttpWorkers, _Worker

    pool = HttpWorkers(FrontendArgs("127.0.0.1", 0, 1, 1.0, tmp_path, hang_timeout=2.0), {}, own_groups=True)
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        w = _Worker(proc=None, alive=read, started=100.0)  # type: ignore[arg-type]
        assert pool._silent(w, 100.0 + 10) is None  # starting: silent 10 s, within the start grace
        assert pool._silent(w, 100.0 + START_GRACE_S + 1) == START_GRACE_S + 1  # a start that never ends
        os.write(write, b"..")
        assert pool._silent(w, 200.0) is None and w.heard == 200.0  # its loop runs
        assert pool._silent(w, 201.5) is None  # silent 1.5 s: within 2
        assert pool._silent(w, 203.0) == 3.0  # silent 3 s: past the hang timeout
    finally:
        os.close(read)
        os.close(write)
