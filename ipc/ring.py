"""Shared-memory rings: one segment per frontend worker, fixed-size slots of uint8 pixels.

The worker creates the segment (``/dev/shm/ringserve-<uid>-<pid>-<random>``, mode 0600), owns its
free list and is the only one to unlink it. Its memory is reserved at creation (posix_fallocate):
a /dev/shm too small is a clear error then, never a SIGBUS at the first write past the free space.
The engine maps it with ``mmap`` directly: Python 3.11's
``multiprocessing.shared_memory`` would register the segment with the resource tracker, which
unlinks the *creator's* segment when the *attaching* process exits.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import secrets
import stat
from collections import deque

import numpy as np
from loguru import logger

from ipc.errors import BadInput, QueueFull
from ipc.shm import NAME_RE, PREFIX, SHM_DIR, ShmTooSmall, round_up, shm_free_bytes

_CREATE_TRIES = 8


def _token() -> str:
    return secrets.token_hex(4)


def _create(size: int) -> tuple[str, int]:
    """A new segment of ``size`` reserved bytes under a fresh random name (retried on EEXIST)."""
    for _ in range(_CREATE_TRIES):
        name = f"{PREFIX}-{os.getuid()}-{os.getpid()}-{_token()}"
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            logger.warning("{} already exists (not ours); trying another name", SHM_DIR / name)
            continue
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(SHM_DIR / name)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise ShmTooSmall(shm_free_bytes(), size) from None
            raise
        return name, fd
    raise FileExistsError(errno.EEXIST, f"no free ring name in {SHM_DIR} after {_CREATE_TRIES} tries")


class Ring:
    """The worker's side: creates the segment and hands out free slots."""

    def __init__(self, slots: int, slot_bytes: int, first_generation: int = 0) -> None:
        """``first_generation``: above every generation of a ring this one replaces, so that a reply's
        (slot, generation) names one ring of the worker's."""
        if slots < 1 or slot_bytes < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.slots = slots
        self.slot_bytes = round_up(slot_bytes)
        self.name, fd = _create(self.slots * self.slot_bytes)
        self.path = SHM_DIR / self.name
        try:
            self._mmap = mmap.mmap(fd, self.slots * self.slot_bytes)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self._buf = np.frombuffer(self._mmap, dtype=np.uint8)
        self._free: deque[int] = deque(range(self.slots))
        self.generation = [first_generation] * self.slots

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
        match = NAME_RE.match(name)
        if match is None or int(match.group(1)) != os.getuid():
            raise BadInput(f"not a ringserve segment of this user: {name!r}")
        self.name = name
        self.owner_pid = int(match.group(2))
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise BadInput(f"segment {name} is not a regular file of this user")
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
    size = math.prod(shape)  # not np.prod: this runs for every request, and NumPy's costs microseconds
    if not 0 <= slot < buf.size // slot_bytes:
        raise BadInput(f"slot {slot} out of range")
    if size > slot_bytes or size <= 0:
        raise BadInput(f"shape {shape} does not fit a slot of {slot_bytes} bytes")
    start = slot * slot_bytes
    return buf[start : start + size].reshape(shape)
