"""The shared-memory segments of the rings as files: names, sizes, free space, orphans.

What the launcher needs to check /dev/shm and clear what dead workers left, without numpy (the
rings themselves are ipc/ring.py).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from loguru import logger

SHM_DIR = Path("/dev/shm")
PREFIX = "ringserve"
ALIGN = 4096
NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-([0-9a-f]+)$")
MB = 1024 * 1024


class ShmTooSmall(OSError):
    """/dev/shm cannot hold the rings; the message says by how much and what to change."""

    def __init__(self, free: int, needed: int) -> None:
        super().__init__(
            errno.ENOSPC,
            f"{SHM_DIR} has {free / MB:.1f} MB free, the rings need {needed / MB:.1f} MB: raise --shm-size "
            "or lower RINGSERVE_RING_SLOTS / WORKERS",
        )
        self.free = free
        self.needed = needed

    def __str__(self) -> str:
        return str(self.strerror)


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize


def ring_bytes(slots: int, slot_bytes: int) -> int:
    """The size of a ring of ``slots`` slots for inputs of ``slot_bytes`` bytes."""
    return slots * round_up(slot_bytes)


def round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def own_segments() -> list[Path]:
    """Segments of this uid, dead owners or not."""
    uid = os.getuid()
    return sorted(p for p in SHM_DIR.glob(f"{PREFIX}-{uid}-*") if NAME_RE.match(p.name))


def remove_orphans() -> list[str]:
    """Unlink this uid's segments whose creating process is gone. Returns their names.

    /dev/shm is shared with every local user: a name that looks like ours but is not a regular file
    of this uid, or one we may not unlink, is skipped with a warning, never a crash.
    """
    removed = []
    uid = os.getuid()
    for path in own_segments():
        match = NAME_RE.match(path.name)
        if match is None or pid_alive(int(match.group(2))):
            continue
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            logger.warning("skipping {}: not a segment of uid {} (owner uid {})", path, uid, st.st_uid)
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove orphan segment {}: {}", path, exc)
            continue
        removed.append(path.name)
    return removed
