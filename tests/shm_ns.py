"""A private /dev/shm of a chosen size for one process tree (a mount namespace, as root).

``private_shm(12)`` is a command prefix: ``unshare -m`` gives the command its own mount table, in
which a 12 MB tmpfs covers /dev/shm; nobody else on the box sees it or its files. The test reads the
namespace's /dev/shm through ``/proc/<pid>/root/dev/shm``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def why_not() -> str:
    """Empty when this machine can make private mount namespaces, else the reason it cannot."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"cannot mount a private tmpfs on /dev/shm (needs root or CAP_SYS_ADMIN): {probe.stderr.strip()}"
    return ""


def private_shm(size_mb: int, setup: str = "") -> tuple[str, ...]:
    """A prefix running the command with a ``size_mb`` MB /dev/shm; ``setup`` runs first, in it."""
    script = f'mount -t tmpfs -o size={size_mb}m tmpfs /dev/shm && {setup or ":"} && exec "$@"'
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")


def shm_of(pid: int) -> Path:
    return Path(f"/proc/{pid}/root/dev/shm")
