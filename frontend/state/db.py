"""One SQLite file shared by every HTTP worker: WAL mode, a schema version table, migrations.

Each feature (jobs, cache, rate limits, prediction log) has a file of its own under
``RINGSERVE_DATA_DIR``, so a slow batch of log inserts never holds the lock a rate-limit check
waits for, and a corrupt log file harms nothing but the log. Every worker opens every file.

A :class:`Database` runs its calls on its own threads (one connection per thread), never on the
event loop, and every call is bounded in time: the caller gets :class:`StoreError` past its
timeout or on any SQLite/OS error (locked, full disk, corrupt file), and decides what that means
for its feature. Transactions are short and explicit (``BEGIN IMMEDIATE`` for writes, so two
workers never deadlock upgrading a read lock).

Migrations: ``migrations[i]`` is the list of statements that takes the schema from version ``i``
to ``i + 1``. The first worker to open the file applies the missing ones inside one write
transaction; the others wait on the lock, then find nothing left to do.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from loguru import logger

T = TypeVar("T")
Migrations = Sequence[Sequence[str]]
REOPEN_AFTER_S = 5.0  # a file that failed to open is not tried again on every call
WARN_EVERY_S = 30.0


class StoreError(Exception):
    """The database could not do what was asked in time (locked, full, corrupt, closed)."""


class Database:
    def __init__(
        self,
        path: Path,
        migrations: Migrations,
        *,
        name: str,
        threads: int = 1,
        busy_timeout_ms: int = 2000,
    ) -> None:
        self.path = path
        self.name = name
        self.migrations = migrations
        self.busy_timeout_ms = busy_timeout_ms
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"db-{name}")
        self._local = threading.local()
        self._failed_open = 0.0
        self._warned: dict[str, float] = {}  # per kind of warning: one kind never hides another
        self._closed = False
        self._inline: sqlite3.Connection | None = None
        self._inline_failed = 0.0
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        return len(self.migrations)

    # ------------------------------------------------------------ in the DB threads
    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError(f"{self.name}: closed")
        if time.monotonic() - self._failed_open < REOPEN_AFTER_S:
            raise StoreError(f"{self.name}: the database could not be opened recently")
        try:
            conn = open_db(self.path, self.migrations, self.busy_timeout_ms)
        except (sqlite3.Error, OSError) as exc:
            self._failed_open = time.monotonic()
            raise StoreError(f"{self.name}: cannot open {self.path}: {exc}") from exc
        self._local.conn = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            conn.close()

    def _run(self, fn: Callable[..., T], args: tuple[object, ...]) -> T:
        conn = self._connection()
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as exc:  # locked, busy, disk full, I/O: the file stays usable
            _rollback(conn)
            raise StoreError(f"{self.name}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # corrupt, not a database: reopen later
            self._drop_connection()
            self._failed_open = time.monotonic()
            raise StoreError(f"{self.name}: {exc}") from exc
        except OSError as exc:
            _rollback(conn)
            raise StoreError(f"{self.name}: {exc}") from exc

    # ------------------------------------------------------------ on the event loop
    async def call(self, fn: Callable[..., T], *args: object, timeout: float = 5.0) -> T:
        """``fn(connection, *args)`` on a DB thread; :class:`StoreError` on failure or past ``timeout``."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool, self._run, fn, args)
        except RuntimeError as exc:  # the pool is shut down
            raise StoreError(f"{self.name}: closed") from exc
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise StoreError(f"{self.name}: no answer within {timeout * 1000:.0f} ms") from None

    def read_now(self, fn: Callable[..., T], *args: object) -> T:
        """A short read on the calling thread (the event loop): bounded because its connection never
        waits for a lock (busy timeout 0, a WAL reader blocks no one and is blocked by no writer);
        :class:`StoreError` at once where it would have to wait. For point lookups on the request
        path, where a hop to a DB thread would cost more than the read."""
        conn = self._inline
        if conn is None:
            # Opened by the DB threads first (they create and migrate the file); this one only reads.
            if self._closed or time.monotonic() - self._inline_failed < 1.0:
                raise StoreError(f"{self.name}: not open for reads")
            try:
                uri = f"file:{self.path}?mode=ro"
                conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 0")
                conn.execute("PRAGMA query_only = ON")
            except (sqlite3.Error, OSError) as exc:
                self._inline_failed = time.monotonic()
                raise StoreError(f"{self.name}: cannot open {self.path}: {exc}") from exc
            self._inline = conn
        try:
            return fn(conn, *args)
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self.name}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            self._inline = None
            conn.close()
            self._inline_failed = time.monotonic()
            raise StoreError(f"{self.name}: {exc}") from exc

    def call_sync(self, fn: Callable[..., T], *args: object) -> T:
        """The same, from a thread that is not the event loop (tests, scripts)."""
        return self._pool.submit(self._run, fn, args).result()

    def warn(self, what: str, exc: BaseException) -> None:
        """A warning at most every WARN_EVERY_S per database and kind (the counters say how many)."""
        now = time.monotonic()
        kind = re.sub(r"\d+", "#", what)  # "3 entries dropped" and "5 entries dropped" are one kind
        if now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[kind] = now
            logger.warning("{} ({}): {}", what, self.name, exc)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


def open_db(path: Path, migrations: Migrations, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection in autocommit mode (explicit transactions), WAL, migrated to the last version."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        mode = _journal_mode_wal(conn, busy_timeout_ms)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across a process crash
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, migrations)
    except BaseException:
        conn.close()
        raise
    path.chmod(0o600)
    return conn


def _journal_mode_wal(conn: sqlite3.Connection, busy_timeout_ms: int) -> str:
    """Switch to WAL, retried until the busy timeout: SQLite answers "locked" at once, without its
    busy handler, while another connection is switching the same new file (workers starting together)."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    pause = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def migrate(conn: sqlite3.Connection, migrations: Migrations) -> int:
    """Apply the missing migrations in one write transaction; returns the schema version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        current = 0 if row is None else int(row[0])
        if current > len(migrations):
            raise sqlite3.DatabaseError(
                f"schema version {current} is newer than this ringserve knows ({len(migrations)})"
            )
        for steps in migrations[current:]:
            for statement in steps:
                conn.execute(statement)
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (len(migrations),))
        elif current != len(migrations):
            conn.execute("UPDATE schema_version SET version = ?", (len(migrations),))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return len(migrations)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.debug("rollback failed: {}", exc)
