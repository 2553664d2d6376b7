"""The shared-memory ring with real segments, and the engine's view of them from another process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ipc.errors import BadInput, QueueFull
from ipc.ring import MappedRing, Ring
from ipc.shm import remove_orphans

_READ = """
import sys
from ipc.ring import MappedRing
ring = MappedRing(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
print(int(ring.view(1, (4, 4, 3)).sum()))
"""

_STDLIB_ATTACH = """
import sys
from multiprocessing import shared_memory
seg = shared_memory.SharedMemory(name=sys.argv[1])
seg.close()
"""


def _run(code: str, *args: object) -> str:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=root, check=True, capture_output=True, text=True, timeout=30
    ).stdout


def test_segment_is_private_and_slots_cycle(no_leaks: None) -> None:
    ring = Ring(3, 100)
    try:
        assert (ring.path.stat().st_mode & 0o777) == 0o600
        assert ring.slot_bytes == 4096
        taken = [ring.acquire() for _ in range(3)]
        with pytest.raises(QueueFull):
            ring.acquire()
        slot, gen = taken[0]
        assert not ring.release(slot, gen + 1), "a stale generation must not free a slot"
        assert ring.release(slot, gen)
        assert not ring.release(slot, gen), "a slot cannot be freed twice"
        assert ring.in_use == 2
        ring.release_all()
        assert ring.in_use == 0
    finally:
        ring.close()
    assert not ring.path.exists()


def test_segment_survives_the_engine_side_exiting(no_leaks: None) -> None:
    ring = Ring(2, 48)
    try:
        view = ring.view(1, (4, 4, 3))
        view[...] = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
        assert _run(_READ, ring.name, ring.slots, ring.slot_bytes).strip() == str(sum(range(48)))
        assert ring.path.exists(), "the reader's exit must not unlink the worker's segment"
        assert ring.view(1, (4, 4, 3)).sum() == sum(range(48))
    finally:
        ring.close()


def test_the_stdlib_trap_is_real(no_leaks: None) -> None:
    """Why MappedRing uses mmap: Python 3.11's SharedMemory attach unlinks the creator's segment."""
    if sys.version_info >= (3, 13):
        pytest.skip("Python 3.13 can attach without the resource tracker")
    ring = Ring(1, 16)
    try:
        _run(_STDLIB_ATTACH, ring.name)
        assert not ring.path.exists(), "expected the resource tracker to unlink the segment"
    finally:
        ring.close()


def test_mapped_ring_rejects_bad_names_and_sizes(no_leaks: None) -> None:
    ring = Ring(2, 64)
    try:
        with pytest.raises(BadInput):
            MappedRing("../../etc/passwd", 1, 1)
        with pytest.raises(BadInput):
            MappedRing(ring.name, 3, ring.slot_bytes)
        mapped = MappedRing(ring.name, 2, ring.slot_bytes)
        with pytest.raises(BadInput):
            mapped.view(2, (1,))
        with pytest.raises(BadInput):
            mapped.view(0, (ring.slot_bytes + 1,))
        mapped.close()
    finally:
        ring.close()


def test_orphans_of_dead_pids_are_removed(no_leaks: None) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    orphan = Path(f"/dev/shm/ringserve-{os.getuid()}-{child.pid}-0")
    orphan.write_bytes(b"x")
    mine = Ring(1, 8)
    try:
        removed = remove_orphans()
        assert orphan.name in removed
        assert not orphan.exists()
        assert mine.path.exists(), "a live process's segment must be kept"
    finally:
        mine.close()
