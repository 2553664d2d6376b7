"""``ringserve serve``: the engine plus the HTTP workers, supervised in the foreground.

Signal handlers only set a flag. The engine is restarted with capped exponential backoff; a start
that stays up for STABLE_S resets the backoff. SIGTERM/SIGINT: the HTTP workers stop accepting and
drain first (the engine keeps serving them), then the engine stops; nothing is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq
from loguru import logger

from engine import control
from engine.frontend_cmd import FrontendArgs, HttpWorkers, frontend_env, worker_count
from ipc import messages as m
from ipc.metrics_dir import metrics_dir, wipe
from ipc.shm import ShmTooSmall, remove_orphans, ring_bytes, shm_free_bytes
from ipc.sockets import (
    STARTS_FILE,
    RunDirBusy,
    engine_address,
    lock_run_dir,
    make_socket,
    prepare_run_dir,
    socket_path,
)

STABLE_S = 30.0
READY_TIMEOUT_S = 300.0


def wait_engine_ready(address: str, proc: subprocess.Popen[bytes] | None, timeout: float) -> m.Ready:
    """Ask the engine for Ready until it answers, it dies, or ``timeout`` passes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    # Not IMMEDIATE: the Hello waits in the socket until the engine has bound and connected.
    sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False, hwm=4)
    try:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"engine exited with {proc.returncode} before it was ready")
            with contextlib.suppress(zmq.Again):
                sock.send(m.encode(m.Hello(pid=os.getpid())), zmq.NOBLOCK)
            if sock.poll(timeout=500):
                msg = m.decode(sock.recv())
                if isinstance(msg, m.Ready):
                    return msg
    finally:
        sock.close()
    raise TimeoutError(f"the engine did not answer on {address} within {timeout:.0f}s")


class Launcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_dir: Path = args.run_dir
        self.address = engine_address(self.run_dir)
        self.stopping = threading.Event()
        self.engine: subprocess.Popen[bytes] | None = None
        self.frontend: HttpWorkers | None = None
        self.restarts = 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping.set()

    def _engine_cmd(self) -> list[str]:
        a = self.args
        return [
            sys.executable,
            "-m",
            "engine",
            "engine",
            "--repo",
            str(a.repo.resolve()),
            "--run-dir",
            str(self.run_dir),
            "--models",
            a.models,
            "--threads",
            str(a.threads),
            "--instances",
            str(a.instances),
            "--cpu-max-batch",
            str(a.cpu_max_batch),
            "--providers",
            a.providers,
            "--exit-with-parent",  # a launcher killed with SIGKILL leaves no engine behind
            *control.argv(a),
        ]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, **frontend_env(self.run_dir, self.args.host))
        env["RINGSERVE_MODEL_REPO"] = str(self.args.repo.resolve())  # workers: data/ lies beside it
        return env

    def _http_workers(self) -> HttpWorkers:
        a = self.args
        front = FrontendArgs(a.host, a.port, a.workers, a.drain_timeout, self.run_dir, a.worker_hang_timeout)
        return HttpWorkers(front, self._env(), True)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env=self._env(), start_new_session=True)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        prepare_run_dir(self.run_dir)
        try:
            self._run_dir_lock = lock_run_dir(self.run_dir, "appliance.lock")
        except RunDirBusy as exc:  # before touching anything of the appliance that holds it
            logger.error("{}", exc)
            return 1
        wipe(metrics_dir(self.run_dir))  # one scrape = this run of the whole box
        (self.run_dir / STARTS_FILE).unlink(missing_ok=True)  # restarts count from this run
        for name in remove_orphans():
            logger.warning("removed orphan segment {}", name)
        try:
            self.engine = self._spawn(self._engine_cmd())
            ready = wait_engine_ready(self.address, self.engine, READY_TIMEOUT_S)
            logger.info("engine ready: {} on {}", [f"{x.name}/{x.version}" for x in ready.models], ready.providers)
            if self.stopping.is_set():
                return 0
            self._check_shm(ready.slot_bytes)
            self.frontend = self._http_workers()
            try:
                self.frontend.start()
            except OSError as exc:  # the port: in use, or not ours to bind
                logger.error("cannot listen on {}:{}: {}", self.args.host, self.args.port, exc)
                return 1
            logger.info("serving on http://{}:{}", self.args.host, self.args.port)
            return self._supervise()
        except (RuntimeError, TimeoutError, ShmTooSmall) as exc:
            logger.error("{}", exc)
            return 1
        finally:
            self._shutdown()

    def _check_shm(self, slot_bytes: int) -> None:
        """Every worker's ring must fit in /dev/shm, or the box would be up but unable to serve."""
        workers = worker_count(self.args.workers)
        slots = int(os.environ.get("RINGSERVE_RING_SLOTS", "32"))
        needed, free = workers * ring_bytes(slots, slot_bytes), shm_free_bytes()
        if needed > free:
            raise ShmTooSmall(free, needed)
        mb = 2**20
        logger.info("rings: {} x {:.1f} MB of {:.1f} MB free in /dev/shm", workers, needed / workers / mb, free / mb)

    def _supervise(self) -> int:
        """Until SIGTERM/SIGINT: replace dead HTTP workers, restart the engine after its backoff
        (the workers are still watched while it waits)."""
        a = self.args
        first = min(0.5, a.restart_backoff_max)
        backoff, started = first, time.monotonic()
        deaths: list[float] = []  # engine exits within the last restart window
        restart_at: float | None = None
        while not self.stopping.wait(0.1):
            assert self.engine is not None and self.frontend is not None
            if self.frontend.check() is not None:
                return 1
            now = time.monotonic()
            if restart_at is not None:
                if now >= restart_at:
                    restart_at, started = None, now
                    self.engine = self._spawn(self._engine_cmd())
                continue
            if self.engine.poll() is None:
                continue
            deaths = [t for t in deaths if now - t < a.restart_window] + [now]
            if len(deaths) > a.max_restarts:
                logger.error(
                    "engine exited with {}: {} exits within {:.0f}s (--max-restarts {} --restart-window {:.0f}); "
                    "giving up",
                    self.engine.returncode,
                    len(deaths),
                    a.restart_window,
                    a.max_restarts,
                    a.restart_window,
                )
                return 3
            self.restarts += 1
            if now - started > STABLE_S:
                backoff = first
            logger.error(
                "engine exited with {}; restart #{} in {:.1f}s", self.engine.returncode, self.restarts, backoff
            )
            restart_at = now + backoff
            backoff = min(backoff * 2, a.restart_backoff_max)
        return 0

    def _shutdown(self) -> None:
        drain = self.args.drain_timeout
        if self.frontend is not None:
            self.frontend.stop(drain + 5)
        _stop(self.engine, "engine", 10)
        path = socket_path(self.address)
        if path is not None:
            path.unlink(missing_ok=True)
        for name in remove_orphans():
            logger.warning("removed orphan segment {}", name)
        logger.info("stopped")


def _stop(proc: subprocess.Popen[bytes] | None, what: str, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    logger.info("stopping {} (pid {})", what, proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("{} did not stop in {:.0f}s; killing", what, timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of the group may outlive its leader
    except ProcessLookupError:
        pass
    proc.wait()
