"""Triton's system shared memory extension: client-created POSIX segments named by key.

Registrations live in ``<group>/shm.json`` (written atomically under ``flock``), so a region
registered through one HTTP worker is usable by a request that another worker handles. Each worker
maps a region lazily, the first time a request names it, and checks its mappings against the
registry whenever it consults it: a region unregistered (or registered again under another key)
through any worker is unmapped by this one at its next shared-memory request or status call.

ringserve never creates or unlinks these segments; the client does. Nothing of them is mapped:
reads and writes go through the segment's fd (pread/pwrite), checked against the registered span
and the segment's current size, so a bad offset or a segment the client shrinks, even between the
check and the copy, is an error for that request, never a SIGBUS for the worker. The number of
regions and their registered bytes are capped (RINGSERVE_CLIENT_SHM_MAX_REGIONS / _MAX_BYTES).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from loguru import logger

from frontend.v2.errors import bad
from ipc.shm import PREFIX, SHM_DIR

DISABLED = (
    "client shared memory is disabled on this appliance; "
    "start it with RINGSERVE_ALLOW_CLIENT_SHM=1 (tritonserver: --allow-client-shm=true)"
)


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    serial: str  # new at every registration: the same name and key again may be a new segment

    def status(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class _Mapping:
    """An open fd on a client's segment (the name stays for the registry's sync logic)."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.fd = _open_segment(region)

    def check(self) -> None:
        """The segment still covers the region (a client may shrink it after registering)."""
        size = os.fstat(self.fd).st_size
        if size < self.region.offset + self.region.byte_size:
            raise bad(f"shared memory region '{self.region.name}' shrank to {size} bytes")

    def pread(self, start: int, size: int) -> memoryview:
        buf = bytearray(size)
        try:
            got = os.preadv(self.fd, [buf], start) if size else 0
        except OSError as exc:
            raise bad(f"shared memory region '{self.region.name}' cannot be read: {exc.strerror}") from None
        if got != size:  # shrunk after the check: a short read, not a fault
            raise bad(f"shared memory region '{self.region.name}' shrank while it was read")
        return memoryview(buf)

    def pwrite(self, start: int, data: bytes) -> None:
        if os.fstat(self.fd).st_size < start + len(data):
            raise bad(f"shared memory region '{self.region.name}' shrank before the output was written")
        # pwrite past the end of a shrunk file extends it rather than faulting: no SIGBUS either way
        view = memoryview(data)
        try:
            while view:
                view = view[os.pwrite(self.fd, view, start + len(data) - len(view)) :]
        except OSError as exc:
            raise bad(f"shared memory region '{self.region.name}' cannot be written: {exc.strerror}") from None

    def close(self) -> bool:
        os.close(self.fd)
        return True


def segment_path(key: str) -> Path:
    """/dev/shm path of a shm_open key (glibc strips leading slashes)."""
    name = key.lstrip("/")
    if not name or "/" in name or "\x00" in name or name in (".", "..") or len(name) > 255:
        raise bad(f"invalid shared memory key '{key}'")
    if name.startswith(f"{PREFIX}-"):
        raise bad(f"shared memory key '{key}' is reserved for ringserve's own rings")
    return SHM_DIR / name


def _open_segment(region: Region) -> int:
    path = segment_path(region.key)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise bad(f"unable to open shared memory region '{region.name}' (key '{region.key}'): {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size < region.offset + region.byte_size:
        os.close(fd)
        raise bad(
            f"shared memory key '{region.key}' is {info.st_size} bytes; the region needs "
            f"offset {region.offset} + byte_size {region.byte_size}"
        )
    return fd


class ShmRegistry:
    def __init__(self, directory: Path, enabled: bool, max_regions: int = 64, max_bytes: int = 1 << 30) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_bytes = max_bytes
        self.path = directory / "shm.json"
        self._lock_path = directory / "shm.lock"
        self._mapped: dict[str, _Mapping] = {}
        self._closing: list[_Mapping] = []

    # ----------------------------------------------------------------- registry file
    def _read(self) -> dict[str, Region]:
        try:
            raw = orjson.loads(self.path.read_bytes())
            return {n: Region(n, r["key"], r["offset"], r["byte_size"], r["serial"]) for n, r in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.error("unreadable shared memory registry {}: {}", self.path, exc)
            return {}

    def _write(self, regions: dict[str, Region]) -> None:
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps({n: {**r.status(), "serial": r.serial} for n, r in regions.items()}))
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Region]]:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self._read()
        finally:
            os.close(fd)  # releases the lock

    def _sync(self) -> dict[str, Region]:
        """Read the registry and drop this worker's mappings that it no longer lists."""
        regions = self._read()
        for name, mapping in list(self._mapped.items()):
            if regions.get(name) != mapping.region:
                del self._mapped[name]
                self._closing.append(mapping)
        self._closing = [m for m in self._closing if not m.close()]
        return regions

    # ----------------------------------------------------------------- API
    def status(self, name: str = "") -> list[dict[str, object]]:
        regions = self._sync() if self.enabled else {}
        if name:
            if name not in regions:
                raise bad(f"Unable to find system shared memory region: '{name}'")
            return [regions[name].status()]
        return [r.status() for r in regions.values()]

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not self.enabled:
            raise bad(DISABLED)
        if not name or len(name) > 256:
            raise bad("a shared memory region needs a name of 1 to 256 characters")
        region = Region(name, key, offset, byte_size, uuid.uuid4().hex)
        with self._locked() as regions:
            if name in regions:
                raise bad(f"shared memory region '{name}' already in manager")
            if len(regions) >= self.max_regions:
                raise bad(f"too many shared memory regions: {len(regions)} registered, the limit is {self.max_regions}")
            total = sum(r.byte_size for r in regions.values()) + byte_size
            if total > self.max_bytes:
                raise bad(
                    f"shared memory regions would total {total} bytes, the limit is {self.max_bytes} "
                    "(RINGSERVE_CLIENT_SHM_MAX_BYTES)"
                )
            mapping = _Mapping(region)  # proves the segment exists and is large enough
            regions[name] = region
            try:
                self._write(regions)
            except OSError:
                mapping.close()
                raise
        self._sync()
        self._mapped[name] = mapping
        logger.info("registered shared memory region {} (key {}, offset {}, {} bytes)", name, key, offset, byte_size)

    def unregister(self, name: str = "") -> None:
        if not self.enabled:
            return
        with self._locked() as regions:
            gone = [name] if name else list(regions)
            for n in gone:
                regions.pop(n, None)
            self._write(regions)
        self._sync()
        logger.info("unregistered shared memory region(s) {}", gone)

    def _mapping(self, name: str, offset: int, size: int, what: str) -> _Mapping:
        if not self.enabled:
            raise bad(DISABLED)
        regions = self._sync()
        region = regions.get(name)
        if region is None:
            raise bad(f"Unable to find shared memory region: '{name}'")
        if offset + size > region.byte_size:
            raise bad(
                f"{what}: offset {offset} + byte_size {size} exceeds shared memory region "
                f"'{name}' of {region.byte_size} bytes"
            )
        mapping = self._mapped.get(name)
        if mapping is None:
            mapping = self._mapped[name] = _Mapping(region)
        mapping.check()
        return mapping

    def check(self, name: str, offset: int, size: int, what: str) -> None:
        self._mapping(name, offset, size, what)

    def read(self, name: str, offset: int, size: int, what: str) -> memoryview:
        """A copy of the region's bytes, read with pread."""
        mapping = self._mapping(name, offset, size, what)
        return mapping.pread(mapping.region.offset + offset, size)

    def write(self, name: str, offset: int, capacity: int, data: bytes, what: str) -> None:
        if len(data) > capacity:
            raise bad(
                f"{what}: shared memory size specified with the request ({capacity} bytes) "
                f"should be at least {len(data)} bytes to hold the results"
            )
        mapping = self._mapping(name, offset, len(data), what)
        mapping.pwrite(mapping.region.offset + offset, data)
