"""Start and stop the real appliance (``ringserve serve``) for integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def bare_engine(repo: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The engine alone (``python -m engine engine``) on ``repo``, answering Hello; its address and
    process. Afterwards it must still be running, and is stopped with SIGTERM."""
    from engine.launcher import wait_engine_ready
    from ipc.sockets import engine_address

    run_dir = Path(tempfile.mkdtemp(prefix="rs-"))  # short: the socket path must fit in sun_path
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "engine", "--repo", str(repo), "--run-dir", str(run_dir)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    address = engine_address(run_dir)
    try:
        wait_engine_ready(address, proc, 60)
        yield address, proc
        assert proc.poll() is None, "the engine died"
    finally:
        proc.terminate()
        proc.wait(10)


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: their sockets are all bound at once, so the kernel cannot hand
    out one port twice (two calls of ``free_port`` in a row can get the same one)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"ringserve-{os.getuid()}-*")}


class Appliance:
    def __init__(
        self,
        repo: Path,
        *,
        workers: int = 2,
        env: dict[str, str] | None = None,
        default_model: str = "pixels",
        args: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),  # run under this (say unshare + a private /dev/shm)
    ) -> None:
        self.repo = repo
        self.prefix = prefix
        self.workers = workers
        # never the default gRPC port 8001: SO_REUSEPORT would share it between appliances
        self.port, self.grpc_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.run_dir = Path(tempfile.mkdtemp(prefix="rs-"))
        self.env = {
            **os.environ,
            "RINGSERVE_DEFAULT_MODEL": default_model,
            "RINGSERVE_GRPC_PORT": str(self.grpc_port),
            **(env or {}),
        }
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.run_dir.with_suffix(".log")

    def start(self, timeout: float = 180) -> Appliance:
        cmd = [
            *self.prefix,
            sys.executable,
            "-m",
            "engine",
            "serve",
            "--repo",
            str(self.repo),
            "--run-dir",
            str(self.run_dir),
            "--workers",
            str(self.workers),
            "--port",
            str(self.port),
            *self.args,
        ]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self.wait_ready(timeout)
            if self.workers > 1:
                wait_for(lambda: len(self.worker_pids()) == self.workers, timeout, "all HTTP workers")
                self.wait_all_workers_ready(timeout)
        except BaseException:
            self.kill()  # a failed start must not leave the appliance running
            raise
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"ringserve serve exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(self.ready, timeout, "the appliance to be ready")

    def wait_all_workers_ready(self, timeout: float = 60) -> None:
        """Every current worker reports the engine connected (each request may land on any)."""
        seen: set[int] = set()

        def all_ready() -> bool:
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
            except httpx.HTTPError:
                return False
            body = r.json()
            if body["engine"]["connected"] and body["worker"]["ring_slots"]:
                seen.add(body["worker"]["pid"])
            return set(self.worker_pids()) <= seen

        wait_for(all_ready, timeout, "every worker to be connected to the engine")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ------------------------------------------------------------ processes
    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def engine_pid(self) -> int:
        for p in self.tree():
            if "engine" in p.cmdline()[2:4]:
                return p.pid
        raise AssertionError("no engine process")

    def worker_pids(self) -> list[int]:
        """The HTTP workers: children of ``ringserve serve`` itself (engine/frontend_cmd.py)."""
        assert self.proc is not None
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children() if is_worker(c)]
        except psutil.NoSuchProcess:
            return []

    @contextlib.contextmanager
    def only_worker(self, pid: int) -> Iterator[None]:
        """New connections reach HTTP worker ``pid`` alone: the others are paused (SIGSTOP) meanwhile.

        The workers share one listening socket, and the kernel gives a connection to whichever
        worker accepts it first: on an idle box one of them can win a hundred times in a row, so a
        test that needs a given worker cannot count on opening connections until it gets there.
        A pause of a few seconds is far below the pool's hang watch (RINGSERVE_WORKER_HANG_S, 30 s).
        """
        workers = self.worker_pids()
        assert pid in workers, f"{pid} is not an HTTP worker of this appliance ({workers})"
        others = [p for p in workers if p != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            yield
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole appliance (its own process group) and reap it."""
        if self.proc is None:
            return
        procs = self.tree()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        self.proc.wait()
        self._log.close()

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"ringserve serve did not stop in {timeout}s:\n{self.log()}") from None
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> Appliance:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        procs = self.tree()
        self.stop()
        _gone, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            p.kill()
        assert not alive, f"processes left after stop: {[p.pid for p in alive]}"
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


def is_worker(p: psutil.Process) -> bool:
    """An HTTP worker process (``python -m frontend.worker``)."""
    try:
        return "frontend.worker" in p.cmdline()
    except psutil.NoSuchProcess:
        return False
