from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import segments
from tests.models import write_pixel_detector


@pytest.fixture
def no_leaks():
    """The test must leave no ringserve segment behind that it created."""
    before = segments()
    yield
    left = segments() - before
    assert not left, f"segments left in /dev/shm: {sorted(left)}"


@pytest.fixture
def pixel_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    return repo
