"""Issue 14, point 5: other local users cannot stop the appliance through /dev/shm, and no worker
background task ends without being logged and recovered."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from frontend.background import Supervised
from ipc import ring as ring_mod
from ipc.ring import Ring
from tests.harness import Appliance
from tests.models import write_pixel_detector
from tests.shm_ns import private_shm, shm_of, why_not

NO_NAMESPACE = why_not()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.skipif(bool(NO_NAMESPACE), reason=NO_NAMESPACE or "-")
def test_foreign_files_with_our_names_are_skipped_not_fatal(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    uid, dead = os.getuid(), _dead_pid()
    a_dir = f"/dev/shm/ringserve-{uid}-{dead}-aa"  # not a regular file: unlink would fail
    foreign = f"/dev/shm/ringserve-{uid}-{dead}-bb"  # looks like ours, belongs to another user
    setup = f"mkdir {a_dir} && touch {foreign} && chown 65534 {foreign}"
    with Appliance(repo, workers=2, prefix=private_shm(16, setup)) as app:
        assert app.proc is not None
        assert httpx.post(
            f"{app.url}/api/v1/predict", content=_png(), headers={"content-type": "image/png"}, timeout=10
        ).is_success
        shm = shm_of(app.proc.pid)
        assert (shm / Path(a_dir).name).is_dir() and (shm / Path(foreign).name).is_file()
        log = app.log()
        assert f"skipping {a_dir}" in log and f"skipping {foreign}" in log and "owner uid 65534" in log, log


def _png() -> bytes:
    from tests.test_appliance import png

    return png((10, 20, 30))


def test_ring_names_are_random_and_creation_retries_on_eexist(monkeypatch: pytest.MonkeyPatch, no_leaks: None) -> None:
    taken = f"ringserve-{os.getuid()}-{os.getpid()}-0badcafe"
    squatter = Path("/dev/shm") / taken
    squatter.write_bytes(b"")  # pre-created by someone else under the name we would draw next
    tokens = iter(["0badcafe", "0badcafe", "600dcafe"])
    monkeypatch.setattr(ring_mod, "_token", lambda: next(tokens))
    try:
        ring = Ring(2, 100)
        try:
            assert ring.name.endswith("-600dcafe")
            assert squatter.read_bytes() == b"", "the other file is left alone"
        finally:
            ring.close()
    finally:
        squatter.unlink()
    monkeypatch.undo()
    a, b = Ring(1, 10), Ring(1, 10)
    try:
        assert a.name != b.name and a.name.rsplit("-", 1)[1] != b.name.rsplit("-", 1)[1]
    finally:
        a.close()
        b.close()


def test_a_background_task_that_ends_is_restarted() -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("boom")
        await asyncio.sleep(3600)

    async def main() -> None:
        tasks = Supervised()
        tasks.start(flaky, "flaky")
        for _ in range(100):
            if len(runs) >= 3:
                break
            await asyncio.sleep(0.01)  # polling the loop, bounded
        await tasks.close()

    asyncio.run(main())
    assert len(runs) == 3
