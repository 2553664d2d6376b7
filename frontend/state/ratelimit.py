"""Per-client rate limits that hold across all workers: the ``limits`` package's algorithms over
a storage of ours on SQLite (``ratelimit.db``).

``limits`` ships storages for memory (per process: useless with N workers), Redis, Memcached and
MongoDB (a server the box does not have). :class:`SQLiteStorage` gives its strategies what they
need on one box: counters with an expiry (fixed window, sliding-window counter) and timestamped
entries (moving window, the default: an exact sliding log). One check hits every configured
limit (``20/second;600/minute``) inside ONE ``BEGIN IMMEDIATE`` transaction, so the workers'
checks are serialised by SQLite's write lock and a refusal by the second limit rolls back the hit
on the first: a burst lets through exactly the allowed count, whichever workers it lands on.

A check that fails (the file locked past the busy timeout, full, corrupt; no answer within the
check's bound) lets its request through, and so does every check of this worker for the next
``PAUSE_AFTER_ERROR_S``: a locked file costs one request the busy timeout, not every request. The
bounds are far above what a check takes under contention (a few ms for the write lock, however
many workers queue for it), so a burst on a busy box is counted exactly, never let through by a
timeout that only measured the queue.
"""

from __future__ import annotations

import math
import sqlite3
import time
from dataclasses import dataclass
from math import floor

from limits import RateLimitItem, parse_many
from limits.storage.base import MovingWindowSupport, SlidingWindowCounterSupport, Storage, TimestampedSlidingWindow
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)

from frontend.state.db import Database, StoreError

MIGRATIONS = [
    [
        "CREATE TABLE rl_counter (key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires REAL NOT NULL)",
        "CREATE TABLE rl_entry (key TEXT NOT NULL, at REAL NOT NULL)",
        "CREATE INDEX rl_entry_key_at ON rl_entry (key, at)",
    ]
]
BUSY_TIMEOUT_MS = 1000  # SQLite's wait for the write lock that another worker holds
CHECK_TIMEOUT_S = 2.0  # a check's whole bound, its wait behind this worker's other checks included
PAUSE_AFTER_ERROR_S = 1.0  # after a failed check, this worker lets requests through unchecked
STRATEGIES: dict[str, type[RateLimiter]] = {
    "moving-window": MovingWindowRateLimiter,
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


class SQLiteStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    """A ``limits`` storage on one SQLite connection; the caller owns the transaction."""

    STORAGE_SCHEME = ["ringserve-sqlite"]

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        super().__init__(None)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    # counters (fixed window, sliding-window counter)
    def _value(self, key: str, now: float) -> tuple[int, float]:
        row = self.conn.execute("SELECT value, expires FROM rl_counter WHERE key = ?", (key,)).fetchone()
        if row is None or row[1] <= now:
            return 0, now
        return int(row[0]), float(row[1])

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        value, expires = self._value(key, now)
        if value == 0:
            expires = now + expiry
        self.conn.execute(
            "INSERT INTO rl_counter (key, value, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires = excluded.expires",
            (key, value + amount, expires),
        )
        return value + amount

    def decr(self, key: str, amount: int = 1) -> int:
        value, _ = self._value(key, time.time())
        self.conn.execute("UPDATE rl_counter SET value = ? WHERE key = ?", (max(value - amount, 0), key))
        return max(value - amount, 0)

    def get(self, key: str) -> int:
        return self._value(key, time.time())[0]

    def get_expiry(self, key: str) -> float:
        now = time.time()
        value, expires = self._value(key, now)
        return expires if value else now

    def check(self) -> bool:
        return self.conn.execute("SELECT 1").fetchone() is not None

    def reset(self) -> int | None:
        count = self.conn.execute("SELECT (SELECT COUNT(*) FROM rl_counter) + (SELECT COUNT(*) FROM rl_entry)")
        n = int(count.fetchone()[0])
        self.conn.execute("DELETE FROM rl_counter")
        self.conn.execute("DELETE FROM rl_entry")
        return n

    def clear(self, key: str) -> None:
        self.conn.execute("DELETE FROM rl_counter WHERE key = ?", (key,))
        self.conn.execute("DELETE FROM rl_entry WHERE key = ?", (key,))

    # timestamped entries (moving window)
    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        now = time.time()
        self.conn.execute("DELETE FROM rl_entry WHERE key = ? AND at <= ?", (key, now - expiry))
        held = self.conn.execute("SELECT COUNT(*) FROM rl_entry WHERE key = ?", (key,)).fetchone()[0]
        if held + amount > limit:
            return False
        self.conn.executemany("INSERT INTO rl_entry (key, at) VALUES (?, ?)", [(key, now)] * amount)
        return True

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        row = self.conn.execute(
            "SELECT MIN(at), COUNT(*) FROM rl_entry WHERE key = ? AND at > ?", (key, now - expiry)
        ).fetchone()
        return (float(row[0]), int(row[1])) if row[1] else (now, 0)

    # two counters per window (sliding-window counter), as limits' own storages do it
    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        previous, previous_ttl, current, _ = self.get_sliding_window(key, expiry)
        if floor(previous * previous_ttl / expiry + current) + amount > limit:
            return False
        _, current_key = self.sliding_window_keys(key, expiry, time.time())
        self.incr(current_key, 2 * expiry, amount)  # no race to undo: the transaction is exclusive
        return True

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        now = time.time()
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        previous, current = self.get(previous_key), self.get(current_key)
        previous_ttl = 0.0 if previous == 0 else (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        for k in self.sliding_window_keys(key, expiry, time.time()):
            self.clear(k)


class _Paused(StoreError):
    """Not checked: a recent check of this worker failed (it does not extend the pause)."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after_s: int = 0  # when refused: whole seconds until the limit that refused has room
    limit: str = ""


class RateLimits:
    """The configured limits over one shared database; :meth:`hit` runs on a DB thread."""

    def __init__(self, db: Database, spec: str, strategy: str = "moving-window") -> None:
        self.db = db
        self.items: list[RateLimitItem] = parse_limits(spec)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown rate limit strategy {strategy!r}; one of {sorted(STRATEGIES)}")
        self.strategy = STRATEGIES[strategy]
        self._sweep_at = 0.0
        self._paused_until = 0.0  # monotonic; written on the event loop, read on the DB threads too

    def hit(self, conn: sqlite3.Connection, client: str) -> Verdict:
        self._not_paused()  # a check queued before the error that paused us does not wait its turn
        limiter = self.strategy(SQLiteStorage(conn))
        conn.execute("BEGIN IMMEDIATE")
        try:
            for item in self.items:
                if not limiter.hit(item, client):
                    conn.execute("ROLLBACK")
                    reset = limiter.get_window_stats(item, client).reset_time
                    return Verdict(False, max(1, math.ceil(reset - time.time())), str(item))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._sweep(conn)
        return Verdict(True)

    def _sweep(self, conn: sqlite3.Connection) -> None:
        """Drop what no window can count any more (clients that stopped sending), now and then."""
        now = time.time()
        if now < self._sweep_at:
            return
        self._sweep_at = now + 60
        longest = max(item.get_expiry() for item in self.items)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM rl_entry WHERE at <= ?", (now - longest,))
        conn.execute("DELETE FROM rl_counter WHERE expires <= ?", (now,))
        conn.execute("COMMIT")

    async def check(self, client: str, timeout: float = CHECK_TIMEOUT_S) -> Verdict:
        """The client's verdict; :class:`StoreError` when it could not be checked (let it through)."""
        self._not_paused()
        try:
            return await self.db.call(self.hit, client, timeout=timeout)
        except _Paused:
            raise
        except StoreError:
            self._paused_until = max(self._paused_until, time.monotonic() + PAUSE_AFTER_ERROR_S)
            raise

    def _not_paused(self) -> None:
        if (left := self._paused_until - time.monotonic()) > 0:
            raise _Paused(f"{self.db.name}: not checked for {left:.1f} s more, after a failed check")


def parse_limits(spec: str) -> list[RateLimitItem]:
    """``20/second;600/minute`` -> limits' items; ValueError with the offending text."""
    try:
        items = parse_many(spec.strip())
    except ValueError:
        raise ValueError(f"RINGSERVE_RATE_LIMIT={spec!r} is not a rate limit (e.g. '20/second;600/minute')") from None
    if not items or any(item.amount < 1 for item in items):
        raise ValueError(f"RINGSERVE_RATE_LIMIT={spec!r}: every limit needs an amount of at least 1")
    return items
