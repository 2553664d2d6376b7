"""The console's numbers: box-wide snapshots of the metric files, and this worker's recent reads."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

WINDOW_S = 10.0  # rates and p99 over about this much of the recent past
MIN_SPAN_S = 0.25  # a baseline younger than this gives a meaningless rate
INFERENCE_ROUTES = ("/predict", "/predict/batch", "/infer")  # what "requests" counts: not health, stats...


@dataclass
class Snapshot:
    """The box-wide counters at one moment (cumulative, as in the metric files)."""

    at: float
    requests: float = 0.0
    errors: float = 0.0
    images: float = 0.0
    batches: float = 0.0
    batch_images: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count
    queue_depth: dict[str, float] = field(default_factory=dict)  # "model/version" -> waiting
    rings: dict[int, list[float]] = field(default_factory=dict)  # worker pid -> [in use, slots]
    restarts: float = 0.0


def read_snapshot(at: float | None = None, path: Path | None = None) -> Snapshot:
    """Read every process's metric files, in ``path`` or this process's metrics directory
    (prometheus_client is imported late: see metrics_dir)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=None if path is None else str(path))
    return snapshot_of(
        ((s.name, s.labels, s.value) for f in registry.collect() for s in f.samples),
        time.monotonic() if at is None else at,
    )


def snapshot_of(samples: Iterable[tuple[str, dict[str, str], float]], at: float) -> Snapshot:
    snap = Snapshot(at)
    for name, labels, value in samples:
        inference = str(labels.get("route", "")).endswith(INFERENCE_ROUTES)
        if name == "ringserve_http_requests_total" and inference:
            snap.requests += value
        elif name == "ringserve_http_request_duration_seconds_bucket" and inference:
            le = float(labels["le"])
            snap.latency_buckets[le] = snap.latency_buckets.get(le, 0.0) + value
        elif name == "ringserve_errors_total":
            snap.errors += value
        elif name == "ringserve_inference_images_total":
            snap.images += value
        elif name == "ringserve_batch_size_count":
            snap.batches += value
        elif name == "ringserve_batch_size_sum":
            snap.batch_images += value
        elif name == "ringserve_queue_depth":
            key = f"{labels.get('model')}/{labels.get('version')}"
            snap.queue_depth[key] = snap.queue_depth.get(key, 0.0) + value
        elif name in ("ringserve_ring_slots_in_use", "ringserve_ring_slots") and "pid" in labels:
            ring = snap.rings.setdefault(int(labels["pid"]), [0.0, 0.0])
            ring[name == "ringserve_ring_slots"] = value
        elif name == "ringserve_engine_restarts":
            snap.restarts = max(snap.restarts, value)
    return snap


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets (upper bound -> count), or None if empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):  # in the +Inf bucket: the highest finite bound is all we know
                return lower
            return lower + (le - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = le, count
    return lower


class History:
    """This worker's recent reads. The baseline of a new read is the newest one at least ``window_s`` older
    (the oldest one kept while there is none), so a rate covers about one window however often it is read."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.snapshots: deque[Snapshot] = deque(maxlen=256)
        self.lock = threading.Lock()  # sync routes run in the threadpool

    def add(self, snap: Snapshot) -> Snapshot | None:
        with self.lock:
            return self._add(snap)

    def _add(self, snap: Snapshot) -> Snapshot | None:
        # Reads older than the newest one past the window go; after a quiet spell that one is the baseline.
        while len(self.snapshots) > 1 and snap.at - self.snapshots[1].at >= self.window_s:
            self.snapshots.popleft()
        baseline = next((s for s in self.snapshots if snap.at - s.at >= MIN_SPAN_S), None)
        self.snapshots.append(snap)
        return baseline
