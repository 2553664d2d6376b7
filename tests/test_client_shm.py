"""Issue 14, point 7: client shared memory is capped, and a segment the client shrinks cannot crash
a worker (reads and writes go through pread/pwrite on the fd; nothing of it is mapped)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.harness import Appliance
from tests.models import write_pixel_detector

SIZE = 64
NBYTES = SIZE * SIZE * 3
ENV = {
    "RINGSERVE_ALLOW_CLIENT_SHM": "1",
    "RINGSERVE_CLIENT_SHM_MAX_REGIONS": "3",
    "RINGSERVE_CLIENT_SHM_MAX_BYTES": str(4 * NBYTES),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo = tmp_path_factory.mktemp("cshm") / "repo"
    write_pixel_detector(repo)
    with Appliance(repo, workers=2, env=ENV) as running:
        yield running


@pytest.fixture
def client(app: Appliance) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(f"127.0.0.1:{app.port}")
    yield c
    c.unregister_system_shared_memory()
    c.close()


def refused(call: object, *words: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()  # type: ignore[operator]
    assert "400" in str(info.value.status()) or "Bad Request" in str(info.value), info.value
    for word in words:
        assert word in str(info.value), info.value


def test_regions_and_bytes_are_capped(client: triton.InferenceServerClient) -> None:
    key = f"/rs-cap-{os.getpid()}"
    regions = [shm.create_shared_memory_region(f"r{k}", f"{key}-{k}", NBYTES) for k in range(4)]
    big = shm.create_shared_memory_region("big", f"{key}-big", 4 * NBYTES)
    try:
        for k in range(3):
            client.register_system_shared_memory(f"r{k}", f"{key}-{k}", NBYTES)
        refused(lambda: client.register_system_shared_memory("r3", f"{key}-3", NBYTES), "too many", "limit is 3")
        client.unregister_system_shared_memory("r0")
        refused(lambda: client.register_system_shared_memory("big", f"{key}-big", 4 * NBYTES), "would total")
        client.register_system_shared_memory("r3", f"{key}-3", NBYTES)  # under both caps again
        assert {r["name"] for r in client.get_system_shared_memory_status()} == {"r1", "r2", "r3"}
    finally:
        for region in (*regions, big):
            shm.destroy_shared_memory_region(region)


def test_a_shrunk_segment_is_a_400_never_a_sigbus(app: Appliance, client: triton.InferenceServerClient) -> None:
    workers = sorted(app.worker_pids())
    key = f"/rs-shrink-{os.getpid()}"
    region_in = shm.create_shared_memory_region("in", f"{key}-in", NBYTES)
    region_out = shm.create_shared_memory_region("out", f"{key}-out", 4096)
    try:
        shm.set_shared_memory_region(region_in, [np.full((1, SIZE, SIZE, 3), 9, np.uint8)])
        client.register_system_shared_memory("in", f"{key}-in", NBYTES)
        client.register_system_shared_memory("out", f"{key}-out", 4096)
        inp = triton.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
        inp.set_shared_memory("in", NBYTES)
        out = triton.InferRequestedOutput("boxes")
        out.set_shared_memory("out", 16)
        for _ in range(4):  # both workers read and write the regions (each keeps an fd on them)
            client.infer("pixels", [inp], outputs=[out])
        for name in (f"{key}-in", f"{key}-out"):
            os.truncate(Path("/dev/shm") / name.lstrip("/"), 0)  # the client shrinks them
        for _ in range(4):
            refused(lambda: client.infer("pixels", [inp]), "shrank")
            plain_in = triton.InferInput("image", [1, SIZE, SIZE, 3], "UINT8")
            plain_in.set_data_from_numpy(np.zeros((1, SIZE, SIZE, 3), np.uint8))
            refused(lambda plain_in=plain_in: client.infer("pixels", [plain_in], outputs=[out]), "shrank")
        assert sorted(app.worker_pids()) == workers, "a worker died"
        assert client.is_server_ready()
    finally:
        shm.destroy_shared_memory_region(region_in)
        shm.destroy_shared_memory_region(region_out)
