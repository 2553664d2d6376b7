"""The prediction log (``predictions.db``, ``RINGSERVE_PREDICTION_LOG=1``).

:class:`LoggingService` wraps the per-image service: each answered prediction is appended to a
bounded in-memory queue (a deque; nothing else happens on the request path). A background task
writes the queue in batches, one transaction each, and applies the retention (age and row
count). When the queue is full (the database is slower than the traffic) or the database fails
(full disk, locked past its timeout, corrupt), entries are dropped, counted in
``ringserve_prediction_log{outcome="dropped_*"}`` and warned about; a prediction never waits for
the log nor fails because of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from frontend.service import ImageRequest, ImageResult
from frontend.state.db import Database, StoreError
from frontend.state.gate import CLIENT
from ipc.errors import RingserveError

MIGRATIONS = [
    [
        """CREATE TABLE prediction (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT NOT NULL,
            at REAL NOT NULL,
            client TEXT NOT NULL,
            route TEXT NOT NULL,
            model TEXT NOT NULL,
            version INTEGER NOT NULL,
            task TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            cached INTEGER NOT NULL,
            batch_size INTEGER NOT NULL,
            timings TEXT NOT NULL,
            labels TEXT NOT NULL
        )""",
        "CREATE INDEX prediction_at ON prediction (at)",
        "CREATE INDEX prediction_model ON prediction (model, id)",
    ]
]
FLUSH_EVERY_S = 0.5
BATCH = 500
SWEEP_EVERY_S = 60.0


@dataclass(frozen=True)
class Entry:
    at: float
    client: str
    route: str
    result: ImageResult


def _row(e: Entry) -> tuple[object, ...]:
    r = e.result
    items = r.detections if r.task in ("ssd", "yolo") else r.classes
    labels = [
        {
            "label": d.label,
            "class_id": d.class_id,
            "confidence": d.confidence,
            **({"bbox": d.bbox} if hasattr(d, "bbox") else {}),
        }
        for d in items
    ]
    t = r.timings
    timings = {"decode_ms": t.decode_ms, "queue_ms": t.queue_ms, "inference_ms": t.inference_ms, "total_ms": t.total_ms}
    return (
        r.request_id,
        e.at,
        e.client,
        e.route,
        r.model,
        r.version,
        r.task,
        r.width,
        r.height,
        int(bool(getattr(r, "cached", False))),
        r.batch_size,
        orjson.dumps(timings).decode(),
        orjson.dumps(labels).decode(),
    )


def _insert(conn: sqlite3.Connection, entries: list[Entry]) -> int:
    rows = [_row(e) for e in entries]
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO prediction (request_id, at, client, route, model, version, task, width, height, cached,"
            " batch_size, timings, labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return len(rows)


def _retain(conn: sqlite3.Connection, max_age_s: float, max_rows: int) -> int:
    conn.execute("BEGIN IMMEDIATE")
    deleted = conn.execute("DELETE FROM prediction WHERE at < ?", (time.time() - max_age_s,)).rowcount
    deleted += conn.execute(
        "DELETE FROM prediction WHERE id <= (SELECT MAX(id) FROM prediction) - ?", (max_rows,)
    ).rowcount
    conn.execute("COMMIT")
    return deleted


class PredictionLog:
    def __init__(
        self, db: Database, queue_limit: int, max_age_s: float, max_rows: int, count: Callable[[str, int], None]
    ) -> None:
        self.db = db
        self.queue: deque[Entry] = deque()
        self.queue_limit = queue_limit
        self.max_age_s = max_age_s
        self.max_rows = max_rows
        self.count = count
        self._wake = asyncio.Event()

    def add(self, result: ImageResult) -> None:
        if len(self.queue) >= self.queue_limit:
            self.count("dropped_full", 1)
            return
        client = CLIENT.get()
        self.queue.append(
            Entry(time.time(), client.address if client else "-", client.route if client else "-", result)
        )
        if len(self.queue) >= BATCH:
            self._wake.set()

    async def flush(self) -> int:
        total = 0
        while self.queue:
            batch = [self.queue.popleft() for _ in range(min(BATCH, len(self.queue)))]
            try:
                written = await self.db.call(_insert, batch, timeout=10)
            except StoreError as exc:
                self.count("dropped_error", len(batch))
                self.db.warn(f"prediction log: {len(batch)} entries dropped", exc)
                return total
            self.count("written", written)
            total += written
        return total

    async def run(self) -> None:
        last_sweep = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S)
            self._wake.clear()
            wrote = await self.flush()
            if wrote or time.monotonic() - last_sweep > SWEEP_EVERY_S:  # both bounds hold after every batch
                last_sweep = time.monotonic()
                try:
                    await self.db.call(_retain, self.max_age_s, self.max_rows, timeout=30)
                except StoreError as exc:
                    self.db.warn("prediction log retention failed", exc)


class LoggingService:
    """The per-image service whose answers are also logged; anything else is the wrapped service's."""

    def __init__(self, inner: Any, log: PredictionLog) -> None:
        self.inner = inner
        self.log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def predict(self, req: ImageRequest) -> ImageResult:
        result: ImageResult = await self.inner.predict(req)
        self.log.add(result)
        return result

    async def predict_batch(self, reqs: Sequence[ImageRequest]) -> list[ImageResult | RingserveError]:
        results: list[ImageResult | RingserveError] = await self.inner.predict_batch(reqs)
        for r in results:
            if isinstance(r, ImageResult):
                self.log.add(r)
        return results
