"""Box-wide V2 statistics (Triton's statistics extension) from per-worker counter files.

Each worker owns one file, ``<group>/stats/<pid>.bin``: a fixed array of records, one per model
version, of float64 counters mapped with ``mmap`` and updated in place after every V2 request, so
a reader in another worker sees them at once without any locking. A reader sums every file of the
group, including those of workers that have exited, so the counts never go backwards.

A worker sees its own requests only, not the engine's batches: it learns the size ``n`` of the
batch each image ran in, and adds ``1/n`` execution. Summed over the workers this is the number of
model executions of V2 requests, exact when the model serves only V2 traffic (REST requests that
shared a batch are not counted here; they are in /metrics).
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from loguru import logger

FIELDS = (
    "last_inference",
    "inference_count",
    "execution_count",
    "success_count",
    "success_ns",
    "fail_count",
    "fail_ns",
    "queue_count",
    "queue_ns",
    "compute_input_count",
    "compute_input_ns",
    "compute_infer_count",
    "compute_infer_ns",
    "compute_output_count",
    "compute_output_ns",
)
_I = {name: i for i, name in enumerate(FIELDS)}
MAX_BATCH = 128  # batch sizes above this one are counted under it
RECORDS = 32  # model versions per worker file
RECORD = np.dtype(
    [
        ("used", "<i8"),  # written last: a reader ignores a record being created
        ("version", "<i8"),
        ("name", "S248"),
        ("counters", "<f8", (len(FIELDS),)),
        ("batch", "<f8", (MAX_BATCH, 2)),  # per batch size: executions, compute_infer ns
    ]
)


@dataclass(frozen=True)
class Sample:
    """One V2 request that succeeded: its images and where its time went (nanoseconds)."""

    total_ns: float
    queue_ns: float
    input_ns: float
    infer_ns: float
    output_ns: float
    batches: list[tuple[int, float]]  # per image: (engine batch size, engine time in ns)


class StatsWriter:
    """This worker's counter file, created on first use."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / f"{os.getpid()}.bin"
        self._records: np.ndarray | None = None
        self._index: dict[tuple[str, int], int] = {}
        self._warned = False

    def _open(self) -> np.ndarray:
        if self._records is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            size = RECORDS * RECORD.itemsize
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:  # a reused pid continues its predecessor's file
                    os.ftruncate(fd, size)
                self._mmap = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            self._records = np.ndarray((RECORDS,), dtype=RECORD, buffer=self._mmap)
            for i in np.flatnonzero(self._records["used"]):
                name = bytes(self._records["name"][i]).decode()
                self._index[(name, int(self._records["version"][i]))] = int(i)
        return self._records

    def _slot(self, name: str, version: int) -> int | None:
        try:
            records = self._open()
        except OSError as exc:  # statistics must never fail a request
            if not self._warned:
                logger.error("V2 statistics unavailable: cannot map {}: {}", self.path, exc)
                self._warned = True
            return None
        slot = self._index.get((name, version))
        if slot is not None:
            return slot
        encoded = name.encode()
        free = np.flatnonzero(records["used"] == 0)
        if len(free) == 0 or len(encoded) > RECORD["name"].itemsize:
            if not self._warned:
                logger.warning("V2 statistics: no room for {}/{} in {}", name, version, self.path)
                self._warned = True
            return None
        slot = int(free[0])
        records["version"][slot] = version
        records["name"][slot] = encoded
        records["used"][slot] = 1
        self._index[(name, version)] = slot
        return slot

    def success(self, name: str, version: int, s: Sample) -> None:
        slot = self._slot(name, version)
        if slot is None:
            return
        records = self._open()
        c = records["counters"][slot]
        c[_I["last_inference"]] = max(c[_I["last_inference"]], time.time() * 1000)
        c[_I["inference_count"]] += len(s.batches)
        for key, ns in (
            ("success", s.total_ns),
            ("queue", s.queue_ns),
            ("compute_input", s.input_ns),
            ("compute_infer", s.infer_ns),
            ("compute_output", s.output_ns),
        ):
            c[_I[f"{key}_count"]] += 1
            c[_I[f"{key}_ns"]] += ns
        batch = records["batch"][slot]
        for size, infer_ns in s.batches:
            share = 1.0 / max(size, 1)
            c[_I["execution_count"]] += share
            row = min(max(size, 1), MAX_BATCH) - 1
            batch[row, 0] += share
            batch[row, 1] += infer_ns * share

    def failure(self, name: str, version: int, total_ns: float) -> None:
        slot = self._slot(name, version)
        if slot is None:
            return
        c = self._open()["counters"][slot]
        c[_I["last_inference"]] = max(c[_I["last_inference"]], time.time() * 1000)
        c[_I["fail_count"]] += 1
        c[_I["fail_ns"]] += total_ns


@dataclass
class Totals:
    counters: np.ndarray = field(default_factory=lambda: np.zeros(len(FIELDS)))
    batch: np.ndarray = field(default_factory=lambda: np.zeros((MAX_BATCH, 2)))


def read_totals(directory: Path) -> dict[tuple[str, int], Totals]:
    """Counters of every worker of the group, summed per model version."""
    totals: dict[tuple[str, int], Totals] = {}
    for path in sorted(directory.glob("*.bin")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        records = np.frombuffer(raw, dtype=RECORD, count=len(raw) // RECORD.itemsize)
        for r in records[records["used"] == 1]:
            key = (bytes(r["name"]).decode(errors="replace"), int(r["version"]))
            t = totals.setdefault(key, Totals())
            last = max(t.counters[0], r["counters"][0])
            t.counters += r["counters"]
            t.counters[0] = last
            t.batch += r["batch"]
    return totals


def _duration(count: float, ns: float) -> dict[str, int]:
    return {"count": round(count), "ns": round(ns)}


def model_stat(name: str, version: int, t: Totals | None) -> dict[str, object]:
    """One ``$model_stat`` object of the statistics extension."""
    t = t or Totals()
    c = {f: float(t.counters[i]) for i, f in enumerate(FIELDS)}
    stats = {
        key: _duration(c[f"{key}_count"], c[f"{key}_ns"])
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    }
    stats["cache_hit"] = _duration(0, 0)
    stats["cache_miss"] = _duration(0, 0)
    batch_stats = []
    for row in range(MAX_BATCH):
        executions = round(float(t.batch[row, 0]))
        if executions:
            # The engine measures one duration per batch (copy in, run, decode): compute_infer.
            batch_stats.append(
                {
                    "batch_size": row + 1,
                    "compute_input": _duration(executions, 0),
                    "compute_infer": _duration(executions, float(t.batch[row, 1])),
                    "compute_output": _duration(executions, 0),
                }
            )
    return {
        "name": name,
        "version": str(version),
        "last_inference": round(c["last_inference"]),
        "inference_count": round(c["inference_count"]),
        "execution_count": round(c["execution_count"]),
        "inference_stats": stats,
        "batch_stats": batch_stats,
    }
