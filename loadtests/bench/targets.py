"""The HTTP targets: ringserve (a), and the common FastAPI pattern in one (b) or W (c) processes.

Each target is started as a process group of its own on 127.0.0.1 and a free port, waited for
until every worker answers, and stopped with SIGTERM (then SIGKILL to its group). Nothing it
leaves behind survives: ringserve's run directory and any ring segment of its processes are removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from loadtests.bench.workloads import ROOT, Workload


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cores() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class Target:
    key: str  # "ringserve", "b-default", "b-1thread", "b-tuned", "c"
    label: str
    cmd: list[str]
    env: dict[str, str]
    workers: int  # processes that answer HTTP (to wait for)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rs-bench-target-")))
    pids_seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.scratch / "server.log"

    def log_tail(self, n: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def start(self, timeout: float = 180.0) -> None:
        cmd = [part.replace("{port}", str(self.port)).replace("{scratch}", str(self.scratch)) for part in self.cmd]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.key} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._answering():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.key} was not ready within {timeout:.0f}s:\n{self.log_tail()}")

    def _answering(self) -> bool:
        """Every HTTP worker answered once (a fresh connection may land on any of them)."""
        try:
            for _ in range(4 * self.workers):
                with httpx.Client(timeout=2.0) as fresh:
                    r = fresh.get(f"{self.url}/health")
                if r.status_code != 200:
                    return False
                body = r.json()
                if "engine" in body and not body["engine"].get("connected"):
                    return False
                if "worker" in body and not body["worker"].get("ring_slots"):
                    return False
                self.pids_seen.add(int(body.get("pid") or body.get("worker", {}).get("pid", 0)))
        except (httpx.HTTPError, ValueError):
            return False
        return len(self.pids_seen) >= self.workers

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc is None:
            return
        tree: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        pids = {self.proc.pid, *(p.pid for p in tree)}
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own group: nothing may outlive the leader
        self.proc.wait()
        psutil.wait_procs([p for p in tree if p.is_running()], timeout=5)
        for seg in Path("/dev/shm").glob(f"ringserve-{os.getuid()}-*"):
            with contextlib.suppress(ValueError, IndexError, OSError):
                if int(seg.name.split("-")[2]) in pids:
                    seg.unlink()
        shutil.rmtree(self.scratch, ignore_errors=True)


def ringserve(workload: Workload, workers: int) -> Target:
    """(a) ``ringserve serve --workers W`` on the workload's repository, as shipped."""
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "serve",
        "--repo",
        str(workload.repo),
        "--models",
        workload.model,
        "--run-dir",
        "{scratch}/run",
        "--workers",
        str(workers),
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
    ]
    env = {"RINGSERVE_DEFAULT_MODEL": workload.model}
    return Target("ringserve", f"(a) ringserve, {workers} workers", cmd, env, workers)


def baseline(workload: Workload, key: str, workers: int) -> Target:
    """(b) one uvicorn process, ORT default or tuned (one intra-op thread, as issue 15 defines the
    plain FastAPI server, or one per core); (c) ``uvicorn --workers W``, tuned."""
    n = cores()
    if key == "b-default":
        label, mode, threads = "(b) FastAPI, 1 process, ORT defaults", "default", 0
    elif key == "b-1thread":
        label, mode, threads = "(b) FastAPI, 1 process, ORT tuned (1 thread)", "tuned", 1
    elif key == "b-tuned":
        label, mode, threads = f"(b) FastAPI, 1 process, ORT tuned ({n} threads)", "tuned", n
    elif key == "c":
        # A model copy per worker: the cores are split between the copies, as a careful operator
        # would set them (each copy with all the cores would oversubscribe the box W times).
        threads = max(1, n // workers)
        label, mode = f"(c) FastAPI, uvicorn --workers {workers}, ORT tuned ({threads} thread(s) each)", "tuned"
    else:
        raise ValueError(key)
    procs = workers if key == "c" else 1
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "loadtests.bench.baseline:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--workers",
        str(procs),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    env = {
        "RINGSERVE_BENCH_MODEL_DIR": str(workload.directory),
        "RINGSERVE_BENCH_ORT": mode,
        "RINGSERVE_BENCH_THREADS": str(threads),
    }
    return Target(key, label, cmd, env, procs)
