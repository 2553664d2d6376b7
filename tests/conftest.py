from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from ipc.shm import pid_alive
from tests.harness import segments
from tests.models import write_pixel_detector


def _ours_or_orphan(name: str) -> bool:
    """A segment this test leaked: its owner is dead, or is still a process this test started."""
    pid = int(name.split("-")[2])
    if not pid_alive(pid):
        return True
    try:
        return any(p.pid == os.getpid() for p in psutil.Process(pid).parents())
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def no_leaks():
    """The test must leave no ringserve segment behind (other sessions' live ones are not ours)."""
    before = segments()
    yield
    left = sorted(s for s in segments() - before if _ours_or_orphan(s))
    assert not left, f"segments left in /dev/shm: {left}"


@pytest.fixture
def pixel_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    return repo
