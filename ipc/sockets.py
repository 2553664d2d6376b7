"""The one socket factory and the run directory layout."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import zmq

# Finite high-water marks: a full queue is a 503 for the client, never an unbounded buffer.
DEFAULT_HWM = 1024
STARTS_FILE = "engine.starts"  # in the run dir: how often the engine started (its restarts + 1)


def default_run_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"ringserve-{os.getuid()}"


def prepare_run_dir(run_dir: Path) -> Path:
    """Create the private (0700) run directory that holds the engine socket.

    An existing one must be a real directory of this user: a symlink or another user's directory
    (say a pre-created ``/tmp/ringserve-<uid>``) would hand the socket to someone else.
    """
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(run_dir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionError(
            f"run directory {run_dir} is not a directory owned by uid {os.getuid()} (a symlink or another "
            "user's?); remove it or set RINGSERVE_RUN_DIR to a private directory"
        )
    os.chmod(run_dir, 0o700)
    return run_dir


class RunDirBusy(RuntimeError):
    """Another appliance (or engine) holds this run directory."""


def lock_run_dir(run_dir: Path, name: str) -> int:
    """Hold ``<run_dir>/<name>`` (flock) for the life of this process; returns the fd to keep open.

    A second holder is refused with the first one's pid, before it touches anything in the directory
    (the first one's metrics, its engine socket).
    """
    path = run_dir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise RunDirBusy(
            f"run directory {run_dir} is in use by pid {holder} ({name}); stop that one or use another "
            "--run-dir / RINGSERVE_RUN_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def engine_address(run_dir: Path) -> str:
    return f"ipc://{run_dir / 'engine.sock'}"


def socket_path(address: str) -> Path | None:
    return Path(address[len("ipc://") :]) if address.startswith("ipc://") else None


_S = TypeVar("_S", bound="zmq.Socket[Any]")  # zmq.Socket, or zmq.asyncio.Socket from its Context


def make_socket(
    ctx: zmq.Context[_S],
    address: str,
    kind: int,
    *,
    bind: bool,
    identity: bytes | None = None,
    hwm: int = DEFAULT_HWM,
    linger_ms: int = 0,
    immediate: bool = True,
    connect: bool = True,  # False: the caller connects (say after attaching a monitor)
) -> _S:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        # A reply to a worker that has gone must fail loudly, not vanish.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == zmq.DEALER:
        # Queue nothing for an engine that is not connected: the send fails and we answer 503.
        sock.setsockopt(zmq.IMMEDIATE, int(immediate))
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
    if bind:
        path = socket_path(address)
        if path is not None:
            path.unlink(missing_ok=True)
        sock.bind(address)
        if path is not None:
            os.chmod(path, 0o600)
    elif connect:
        sock.connect(address)
    return sock
