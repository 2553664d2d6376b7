"""The HTTP workers of ``ringserve serve`` and ``ringserve frontend`` (which supervisord.conf runs):
one builder of their command line and one pool that runs them, so the two cannot drift apart.

The port is bound once, here, and every worker inherits the listening socket (``--fd``): the
kernel hands each new connection to whichever worker accepts it first. There is no uvicorn
supervisor process and no multiprocessing resource tracker beside the workers (their 24 MB of
PSS were a tenth of the Lite0 appliance's). The workers are started by module path
(``frontend.worker``), never imported here: the engine side does not depend on the frontend.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from ipc.metrics_dir import ENV as METRICS_ENV
from ipc.metrics_dir import metrics_dir

STARTUP_FAILURE = 3  # frontend/worker.py: the worker's app could not start
BACKLOG = 2048  # uvicorn's own default
# A worker's first byte comes once its app has started (imports, the app, its lifespan: 2-3 s on
# this box, more on a loaded one): until then it gets at least this long, whatever hang_timeout is.
START_GRACE_S = 60.0


@dataclass(frozen=True)
class FrontendArgs:
    host: str
    port: int
    workers: int  # 0: one per core
    drain_timeout: float
    run_dir: Path
    hang_timeout: float = 30.0  # a worker whose event loop is silent this long is replaced; 0: never


@dataclass
class _Worker:
    proc: subprocess.Popen[bytes]
    alive: int  # the read end of the pipe its event loop writes a byte to every second
    started: float  # time.monotonic() of its start
    heard: float | None = None  # ... of its last byte; None before its first


def worker_count(workers: int) -> int:
    return workers or len(os.sched_getaffinity(0))


def worker_argv(a: FrontendArgs, fd: int, alive_fd: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "frontend.worker",
        "--fd",
        str(fd),
        "--drain-timeout",
        str(a.drain_timeout),
        "--alive-fd",
        str(alive_fd),
    ]


def frontend_env(run_dir: Path, host: str) -> dict[str, str]:
    """What the workers must agree on with the engine (the run directory and the metrics directory)
    and with their pool (the HTTP host, which their gRPC server binds too)."""
    return {"RINGSERVE_RUN_DIR": str(run_dir), METRICS_ENV: str(metrics_dir(run_dir)), "RINGSERVE_HOST": host}


def listen(host: str, port: int) -> socket.socket:
    """The workers' listening socket, inheritable (as uvicorn binds it: SO_REUSEADDR, its backlog)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class HttpWorkers:
    """W worker processes on one listening socket. A worker that dies is replaced at once (as
    uvicorn's supervisor did), and so is one whose event loop has not written to its pipe for
    ``hang_timeout`` seconds (killed first: stopped, or stuck in a call that never returns); one
    that exits with STARTUP_FAILURE stops the pool, since every replacement would fail the same
    way. ``own_groups``: each worker leads a process group of its own, so a terminal's Ctrl-C
    reaches only the caller, which drains the workers before it stops the engine (``ringserve
    serve``); otherwise they stay in the caller's group, which supervisord signals and kills as a
    whole (``stopasgroup``, ``killasgroup``)."""

    def __init__(self, a: FrontendArgs, env: dict[str, str], own_groups: bool) -> None:
        self.args = a
        self.env = env
        self.own_groups = own_groups
        self.sock: socket.socket | None = None
        self.workers: list[_Worker] = []

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def start(self) -> None:
        self.sock = listen(self.args.host, self.args.port)
        self.workers = [self._spawn() for _ in range(worker_count(self.args.workers))]

    def _spawn(self) -> _Worker:
        assert self.sock is not None
        fd = self.sock.fileno()
        read, write = os.pipe()
        os.set_blocking(read, False)
        try:
            proc = subprocess.Popen(
                worker_argv(self.args, fd, write),
                env=self.env,
                pass_fds=(fd, write),
                start_new_session=self.own_groups,
            )
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
        return _Worker(proc, read, time.monotonic())

    def _silent(self, w: _Worker, now: float) -> float | None:
        """How long the worker's event loop has been silent, when that is past its limit."""
        if _heard(w.alive):
            w.heard = now
        if not self.args.hang_timeout:
            return None
        if w.heard is None:
            silent, limit = now - w.started, max(self.args.hang_timeout, START_GRACE_S)
        else:
            silent, limit = now - w.heard, self.args.hang_timeout
        return silent if silent > limit else None

    def check(self) -> int | None:
        """Replace every worker that died or hangs; the exit code the pool must stop with, if one
        could not start."""
        now = time.monotonic()
        for i, w in enumerate(self.workers):
            code = w.proc.poll()
            if code is None:
                silent = self._silent(w, now)
                if silent is None:
                    continue
                logger.error("HTTP worker {} has not run its event loop for {:.0f}s; killing it", w.proc.pid, silent)
                self._kill(w)
                code = w.proc.returncode
            elif code == STARTUP_FAILURE:
                logger.error("HTTP worker {} could not start (exit {}); stopping", w.proc.pid, code)
                return code
            os.close(w.alive)
            self.workers[i] = self._spawn()
            logger.error("HTTP worker {} exited with {}; started {}", w.proc.pid, code, self.workers[i].proc.pid)
        return None

    def _kill(self, w: _Worker) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.own_groups:
                os.killpg(w.proc.pid, signal.SIGKILL)  # nothing of its group may outlive it
            elif w.proc.poll() is None:
                w.proc.kill()
        w.proc.wait()

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker (each stops accepting and drains), SIGKILL what is left after ``timeout``."""
        if self.sock is not None:
            self.sock.close()  # the workers' own copies close as they stop accepting
        alive = [w.proc for w in self.workers if w.proc.poll() is None]
        if alive:
            logger.info("stopping HTTP workers (pids {})", [p.pid for p in alive])
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        deadline = time.monotonic() + timeout
        for proc in alive:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("HTTP worker {} did not stop in {:.0f}s; killing", proc.pid, timeout)
        for w in self.workers:
            self._kill(w)
            os.close(w.alive)
        self.workers = []


def _heard(fd: int) -> bool:
    """Whether the worker wrote to its pipe since the last look (what it wrote is read away)."""
    heard = False
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            heard = True
    return heard


def run_frontend(a: FrontendArgs) -> int:
    """``ringserve frontend``: the workers in the foreground, until SIGTERM or SIGINT (supervisord)."""
    from ipc.sockets import prepare_run_dir

    prepare_run_dir(a.run_dir)
    env = dict(os.environ, **frontend_env(a.run_dir, a.host))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stopping.set())
    workers = HttpWorkers(a, env, own_groups=False)
    try:
        workers.start()
    except OSError as exc:
        logger.error("cannot listen on {}:{}: {}", a.host, a.port, exc)
        return 1
    logger.info("serving on http://{}:{} ({} workers)", a.host, a.port, len(workers.workers))
    code = 0
    try:
        while not stopping.wait(0.1):
            if workers.check() is not None:
                code = 1
                break
    finally:
        workers.stop(a.drain_timeout + 5)
    return code
