"""The container's process manager: the real supervisord running supervisord.conf on a tiny model."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from tests.harness import ROOT, free_ports, is_worker, segments, wait_for
from tests.models import expected_box

BIN = Path(sys.executable).parent  # supervisord, supervisorctl and python of this environment
CONF = ROOT / "supervisord.conf"


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


class Supervisord:
    """``supervisord -n -c supervisord.conf`` in the foreground with its own run dir and port."""

    def __init__(self, repo: Path, **env: str) -> None:
        self.port, grpc_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        # short: the engine socket's path must fit in sun_path (108 bytes)
        self.run_dir = Path(tempfile.mkdtemp(prefix="rs-sv-"))
        self.log_path = self.run_dir.with_suffix(".log")
        # No RINGSERVE_RUN_DIR: supervisord.conf needs no variable. supervisord keeps its pid file
        # and socket in its working directory (run_dir), the engine socket goes to the default
        # run dir, here under XDG_RUNTIME_DIR=run_dir so that this box is alone in it.
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "RINGSERVE_RUN_DIR"},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "XDG_RUNTIME_DIR": str(self.run_dir),
            "RINGSERVE_MODEL_REPO": str(repo),
            "RINGSERVE_DEFAULT_MODEL": "pixels",
            "RINGSERVE_HOST": "127.0.0.1",
            "RINGSERVE_PORT": str(self.port),
            "RINGSERVE_GRPC_PORT": str(grpc_port),  # never the shared default 8001 (SO_REUSEPORT)
            "RINGSERVE_WORKERS": "2",
            "RINGSERVE_PROVIDERS": "cpu",
            "RINGSERVE_ORT_THREADS": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, psutil.Process] = {}  # every process of the tree, to check none outlives it

    def __enter__(self) -> Supervisord:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(BIN / "supervisord"), "-n", "-c", str(CONF)],
            cwd=self.run_dir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.remember()
        if self.proc.poll() is None:  # the test failed before its shutdown: stop everything by pid
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=10)
        for p in alive:
            p.kill()
        self._log.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "supervisorctl"), "-c", str(CONF), *args],
            cwd=self.run_dir,  # where supervisord keeps its socket
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def pid(self, program: str) -> int:
        """The pid supervisord has for ``program``; 0 while it is not running or not reachable."""
        out = self.ctl("pid", program)
        return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else 0

    def remember(self) -> None:
        assert self.proc is not None
        try:
            for p in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    def assert_nothing_left(self) -> None:
        """No process of the tree, no socket, no pid file, no segment of its workers."""
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=10)
        assert not alive, f"processes left: {alive}\n{self.log()}"
        assert not list(self.run_dir.rglob("*.sock")), "sockets left in the run dirs"
        assert not (self.run_dir / "supervisord.pid").exists()
        # no_leaks checks all of /dev/shm; this names ours, should other processes use it meanwhile
        ours = {name for name in segments() if int(name.split("-")[2]) in self.seen}
        assert not ours, f"segments left: {ours}"

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def predict_ok(self, rgb: tuple[int, int, int]) -> bool:
        r = httpx.post(
            f"{self.url}/api/v1/predict", content=png(rgb), headers={"content-type": "image/png"}, timeout=10
        )
        if r.status_code == 503:  # no engine (yet): the only acceptable failure
            return False
        assert r.status_code == 200, r.text
        [det] = r.json()["detections"]
        assert det["bbox"] == pytest.approx(expected_box(rgb, 96, 64), abs=0.6), (rgb, det)
        return True

    def worker_pids(self) -> set[int]:
        return {c.pid for c in psutil.Process(self.pid("frontend")).children() if is_worker(c)}


def _engines_seen(url: str, asks: int) -> dict[int, str]:
    """Worker pid -> the engine instance it is connected to ("" when none), from /health on fresh
    connections: each lands on whichever worker accepts it."""
    seen = {}
    for _ in range(asks):
        try:
            body = httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            continue
        seen[body["worker"]["pid"]] = body["engine"]["instance"] if body["engine"]["connected"] else ""
    return seen


def wait_all_on_one_engine(sv: Supervisord, workers: set[int], not_this: str = "") -> str:
    """Wait until every worker is connected to the same engine (not ``not_this``); its instance id."""
    latest: dict[int, str] = {}

    def agreed() -> bool:
        latest.update(_engines_seen(sv.url, 4 * len(workers)))
        instances = {latest.get(pid) for pid in workers}
        return len(instances) == 1 and instances.pop() not in (None, "", not_this)

    try:
        wait_for(agreed, 30, f"workers {sorted(workers)} to be connected to one engine (not {not_this!r})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {latest}\n{sv.log()[-6000:]}") from None
    return latest[min(workers)]


@pytest.mark.timeout(90)
def test_serves_survives_an_engine_kill_and_shuts_down_clean(pixel_repo: Path, no_leaks: None) -> None:
    with Supervisord(pixel_repo) as sv:
        wait_for(sv.ready, 45, "the appliance under supervisord to be ready", every=0.1)
        engine, uvicorn = sv.pid("engine"), sv.pid("frontend")
        workers = sv.worker_pids()
        assert engine and uvicorn and len(workers) == 2, (engine, uvicorn, workers, sv.ctl("status").stdout)
        # /health/ready answers for the worker that took the connection; wait for the other one too
        old_instance = wait_all_on_one_engine(sv, workers)
        assert sv.predict_ok((200, 100, 50))
        sv.remember()

        os.kill(engine, signal.SIGKILL)
        wait_for(lambda: sv.pid("engine") not in (0, engine), 20, "supervisord to start a new engine", every=0.2)
        new_engine = sv.pid("engine")
        wait_for(lambda: sv.predict_ok((10, 220, 90)), 30, "an answer from the new engine", every=0.1)

        # Every worker came back to the new engine by itself, and none was restarted for it.
        wait_all_on_one_engine(sv, workers, not_this=old_instance)
        for i in range(8):
            assert sv.predict_ok(((i * 37) % 256, (i * 91 + 13) % 256, (i * 53 + 101) % 256))
        assert sv.pid("frontend") == uvicorn
        assert sv.worker_pids() == workers
        assert sv.pid("engine") == new_engine
        assert "exited: engine (terminated by SIGKILL" in sv.log()

        sv.remember()
        assert sv.ctl("shutdown").returncode == 0
        assert sv.proc is not None
        assert sv.proc.wait(45) == 0, sv.log()
        sv.assert_nothing_left()
        log = sv.log()
        assert "stopped: frontend" in log and "stopped: engine" in log
        # the HTTP workers drain while the engine still answers them: the frontend stops first
        assert log.index("stopped: frontend") < log.index("stopped: engine")


@pytest.mark.timeout(90)
def test_an_engine_that_cannot_start_takes_the_box_down(pixel_repo: Path, no_leaks: None) -> None:
    """startretries used up -> FATAL -> the event listener stops supervisord: the container exits."""
    with Supervisord(pixel_repo, RINGSERVE_ORT_THREADS="not-a-number") as sv:
        proc = sv.proc
        assert proc is not None

        def exited() -> bool:
            sv.remember()
            return proc.poll() is not None

        wait_for(exited, 60, "supervisord to give up and exit")
        log = sv.log()
        assert "gave up: engine entered FATAL state" in log, log
        assert "processname:engine" in log and "shutting supervisord down" in log, log
        sv.assert_nothing_left()
