"""Shared-memory rings: one segment per frontend worker, fixed-size slots of uint8 pixels.

The worker creates the segment (``/dev/shm/ringserve-<uid>-<pid>-<n>``, mode 0600), owns its free
list and is the only one to unlink it. The engine maps it with ``mmap`` directly: Python 3.11's
``multiprocessing.shared_memory`` would register the segment with the resource tracker, which
unlinks the *creator's* segment when the *attaching* process exits.
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
from collections import deque
from pathlib import Path

import numpy as np

from ipc.errors import BadInput, QueueFull

SHM_DIR = Path("/dev/shm")
PREFIX = "ringserve"
_ALIGN = 4096
_counter = itertools.count()
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(\d+)$")


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


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
    return sorted(p for p in SHM_DIR.glob(f"{PREFIX}-{uid}-*") if _NAME_RE.match(p.name))


def remove_orphans() -> list[str]:
    """Unlink this uid's segments whose creating process is gone. Returns their names."""
    removed = []
    for path in own_segments():
        match = _NAME_RE.match(path.name)
        assert match is not None
        if not pid_alive(int(match.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class Ring:
    """The worker's side: creates the segment and hands out free slots."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.slots = slots
        self.slot_bytes = _round_up(slot_bytes)
        self.name = f"{PREFIX}-{os.getuid()}-{os.getpid()}-{next(_counter)}"
        self.path = SHM_DIR / self.name
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.slots * self.slot_bytes)
            self._mmap = mmap.mmap(fd, self.slots * self.slot_bytes)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self._free: deque[int] = deque(range(self.slots))
        self.generation = [0] * self.slots

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)

    def acquire(self) -> tuple[int, int]:
        """A free slot and its new generation; ``QueueFull`` when every slot is taken."""
        if not self._free:
            raise QueueFull(f"all {self.slots} ring slots of this worker are in use")
        slot = self._free.popleft()
        self.generation[slot] += 1
        return slot, self.generation[slot]

    def release(self, slot: int, generation: int) -> bool:
        """Free a slot if ``generation`` is its current one (a stale reply frees nothing)."""
        if not 0 <= slot < self.slots or self.generation[slot] != generation:
            return False
        if slot in self._free:
            return False
        self._free.append(slot)
        return True

    def release_all(self) -> None:
        """The engine that held our slots is gone: all of them are ours again."""
        for slot in range(self.slots):
            self.generation[slot] += 1
        self._free = deque(range(self.slots))

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        """A writable uint8 array over ``slot`` (no copy)."""
        return slot_view(self._buf, slot, self.slot_bytes, shape)

    def close(self) -> None:
        """Unmap and unlink. Only the creator calls this."""
        self._buf = np.empty(0, np.uint8)
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process
        self.path.unlink(missing_ok=True)


class MappedRing:
    """The engine's side: maps a worker's segment by name, never unlinks it."""

    def __init__(self, name: str, slots: int, slot_bytes: int) -> None:
        match = _NAME_RE.match(name)
        if match is None or int(match.group(1)) != os.getuid():
            raise BadInput(f"not a ringserve segment of this user: {name!r}")
        self.name = name
        self.owner_pid = int(match.group(2))
        fd = os.open(SHM_DIR / name, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if slots < 1 or slot_bytes < 1 or slots * slot_bytes != size:
                raise BadInput(f"segment {name} is {size} bytes, not {slots} x {slot_bytes}")
            self._mmap = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._buf = np.frombuffer(self._mmap, dtype=np.uint8)

    def view(self, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        return slot_view(self._buf, slot, self.slot_bytes, shape)

    def close(self) -> None:
        self._buf = np.empty(0, np.uint8)
        try:
            self._mmap.close()
        except BufferError:
            pass


def slot_view(buf: np.ndarray, slot: int, slot_bytes: int, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    if not 0 <= slot < buf.size // slot_bytes:
        raise BadInput(f"slot {slot} out of range")
    if size > slot_bytes or size <= 0:
        raise BadInput(f"shape {shape} does not fit a slot of {slot_bytes} bytes")
    start = slot * slot_bytes
    return buf[start : start + size].reshape(shape)
