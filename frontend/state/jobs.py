"""Async jobs in ``jobs.db``: submitted by one worker, leased and run by any, polled through any.

A job is one or more images (``job_item`` rows: the encoded bytes and their parameters) and, per
image, its answer once computed, so a job taken over after its worker died resumes where it was.
A worker *leases* a job (``lease_owner``, ``lease_expires``) and renews the lease while it runs
it; a lease that expires (SIGKILL, a hung worker) lets any worker claim the job again. Every claim
counts an attempt; past ``attempts`` the job is ``failed`` with the reason, so no accepted job is
pending for ever. A transient error (engine restarting, queues full) puts the job back to
``pending`` with a backoff (``not_before``).

All functions here run on the database's threads (``Database.call``); each is one short
transaction.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass

import orjson

MIGRATIONS = [
    [
        """CREATE TABLE job (
            id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            kind TEXT NOT NULL,
            model TEXT NOT NULL,
            version INTEGER,
            request_id TEXT NOT NULL,
            client TEXT NOT NULL,
            status TEXT NOT NULL,
            total INTEGER NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            result BLOB,
            error TEXT,
            bytes INTEGER NOT NULL,
            created REAL NOT NULL,
            finished REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            not_before REAL NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_expires REAL
        )""",
        "CREATE INDEX job_runnable ON job (status, not_before)",
        "CREATE INDEX job_finished ON job (finished)",
        """CREATE TABLE job_item (
            job_id TEXT NOT NULL REFERENCES job (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            data BLOB,
            params BLOB NOT NULL,
            answer BLOB,
            PRIMARY KEY (job_id, idx)
        )""",
    ]
]
ACTIVE = ("pending", "running")
FINISHED = ("done", "failed", "cancelled")


class JobsFull(Exception):
    """The stored jobs reached their cap (count or bytes)."""


@dataclass(frozen=True)
class NewItem:
    data: bytes | None  # None: the item failed already at submission, ``answer`` says why
    params: dict[str, object]
    answer: dict[str, object] | None = None


@dataclass(frozen=True)
class Claimed:
    id: str
    kind: str
    model: str
    version: int | None
    request_id: str
    client: str
    attempt: int
    total: int
    pending: list[tuple[int, bytes, dict[str, object]]]  # (index, image, params) still to run
    taken_over: bool  # its previous worker's lease had expired


@dataclass(frozen=True)
class JobView:
    id: str
    owner: str
    status: str
    done: int
    total: int
    result: object | None
    error: str | None


def _begin(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def submit(
    conn: sqlite3.Connection,
    *,
    owner: str,
    kind: str,
    model: str,
    version: int | None,
    request_id: str,
    client: str,
    items: list[NewItem],
    max_jobs: int,
    max_bytes: int,
) -> str:
    job_id = uuid.uuid4().hex
    size = sum(len(i.data or b"") for i in items)
    done = sum(i.answer is not None for i in items)
    _begin(conn)
    try:
        count, stored = conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM job").fetchone()
        if count >= max_jobs or stored + size > max_bytes:
            raise JobsFull(f"{count} jobs, {stored} bytes stored (caps {max_jobs} jobs, {max_bytes} bytes)")
        conn.execute(
            "INSERT INTO job (id, owner, kind, model, version, request_id, client, status, total, done, bytes,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            (job_id, owner, kind, model, version, request_id, client, len(items), done, size, time.time()),
        )
        conn.executemany(
            "INSERT INTO job_item (job_id, idx, data, params, answer) VALUES (?, ?, ?, ?, ?)",
            [
                (job_id, i, it.data, orjson.dumps(it.params), None if it.answer is None else orjson.dumps(it.answer))
                for i, it in enumerate(items)
            ],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return job_id


def claim(conn: sqlite3.Connection, worker: str, lease_s: float, max_attempts: int) -> tuple[Claimed | None, int]:
    """Lease the oldest runnable job (pending, or running with an expired lease).

    Returns the job (None when there is none) and how many jobs were failed for too many attempts.
    """
    now = time.time()
    failed = 0
    runnable = "(status = 'pending' AND not_before <= ?) OR (status = 'running' AND lease_expires < ?)"
    if conn.execute(f"SELECT 1 FROM job WHERE {runnable} LIMIT 1", (now, now)).fetchone() is None:
        return None, 0  # the common case, every poll of every worker: a read, no write lock
    _begin(conn)
    try:
        while True:
            row = conn.execute(
                "SELECT id, kind, model, version, request_id, client, attempts, total, status, error FROM job"
                f" WHERE {runnable} ORDER BY created LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                conn.execute("COMMIT")
                return None, failed
            job_id, kind, model, version, request_id, client, attempts, total, status, error = row
            if attempts >= max_attempts:
                why = "its worker stopped renewing the lease (killed or hung)" if status == "running" else error
                _finish(conn, job_id, "failed", f"gave up after {attempts} attempts: {why}", None)
                failed += 1
                continue
            conn.execute(
                "UPDATE job SET status = 'running', attempts = attempts + 1, lease_owner = ?, lease_expires = ?"
                " WHERE id = ?",
                (worker, now + lease_s, job_id),
            )
            pending = [
                (int(i), bytes(d), orjson.loads(p))
                for i, d, p in conn.execute(
                    "SELECT idx, data, params FROM job_item WHERE job_id = ? AND answer IS NULL ORDER BY idx",
                    (job_id,),
                )
            ]
            conn.execute("COMMIT")
            job = Claimed(
                job_id, kind, model, version, request_id, client, attempts + 1, total, pending, status == "running"
            )
            return job, failed
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def renew(conn: sqlite3.Connection, job_id: str, worker: str, lease_s: float) -> bool:
    """Extend our lease; False when the job is no longer ours to run (cancelled, taken over)."""
    cur = conn.execute(
        "UPDATE job SET lease_expires = ? WHERE id = ? AND lease_owner = ? AND status = 'running'",
        (time.time() + lease_s, job_id, worker),
    )
    return cur.rowcount == 1


def record(conn: sqlite3.Connection, job_id: str, worker: str, answers: list[tuple[int, dict[str, object]]]) -> bool:
    """Store answers of some images; False (and nothing stored) when the job is not ours any more."""
    _begin(conn)
    try:
        owned = conn.execute(
            "SELECT 1 FROM job WHERE id = ? AND lease_owner = ? AND status = 'running'", (job_id, worker)
        ).fetchone()
        if owned is None:
            conn.execute("ROLLBACK")
            return False
        blobs = [(orjson.dumps(a), job_id, i) for i, a in answers]
        conn.executemany("UPDATE job_item SET answer = ?, data = NULL WHERE job_id = ? AND idx = ?", blobs)
        conn.execute(
            "UPDATE job SET done = (SELECT COUNT(*) FROM job_item WHERE job_id = ? AND answer IS NOT NULL)"
            " WHERE id = ?",
            (job_id, job_id),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return True


def answers(conn: sqlite3.Connection, job_id: str) -> list[dict[str, object]]:
    rows = conn.execute("SELECT answer FROM job_item WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
    return [orjson.loads(a) for (a,) in rows if a is not None]


def complete(
    conn: sqlite3.Connection, job_id: str, worker: str, status: str, error: str | None, result: object
) -> bool:
    _begin(conn)
    owned = conn.execute(
        "SELECT 1 FROM job WHERE id = ? AND lease_owner = ? AND status = 'running'", (job_id, worker)
    ).fetchone()
    if owned is not None:
        _finish(conn, job_id, status, error, result)
    conn.execute("COMMIT")
    return owned is not None


def retry_later(conn: sqlite3.Connection, job_id: str, worker: str, delay_s: float, why: str) -> bool:
    """A transient failure: back to pending, runnable again after ``delay_s``."""
    cur = conn.execute(
        "UPDATE job SET status = 'pending', not_before = ?, error = ?, lease_owner = NULL, lease_expires = NULL"
        " WHERE id = ? AND lease_owner = ? AND status = 'running'",
        (time.time() + delay_s, why, job_id, worker),
    )
    return cur.rowcount == 1


def _finish(conn: sqlite3.Connection, job_id: str, status: str, error: str | None, result: object) -> None:
    blob = None if result is None else orjson.dumps(result)
    conn.execute(
        "UPDATE job SET status = ?, error = ?, result = ?, finished = ?, lease_owner = NULL, lease_expires = NULL,"
        " bytes = ? WHERE id = ?",
        (status, error, blob, time.time(), len(blob or b""), job_id),
    )
    conn.execute("DELETE FROM job_item WHERE job_id = ?", (job_id,))  # inputs and partial answers


def view(conn: sqlite3.Connection, job_id: str) -> JobView | None:
    row = conn.execute("SELECT owner, status, done, total, result, error FROM job WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    owner, status, done, total, result, error = row
    return JobView(job_id, owner, status, done, total, None if result is None else orjson.loads(result), error)


def cancel(conn: sqlite3.Connection, job_id: str) -> bool:
    _begin(conn)
    row = conn.execute("SELECT status FROM job WHERE id = ?", (job_id,)).fetchone()
    active = row is not None and row[0] in ACTIVE
    if active:
        _finish(conn, job_id, "cancelled", "cancelled by the client", None)
    conn.execute("COMMIT")
    return active


def sweep(conn: sqlite3.Connection, retention_s: float) -> int:
    """Delete finished jobs older than the retention time."""
    _begin(conn)
    cur = conn.execute("DELETE FROM job WHERE finished IS NOT NULL AND finished < ?", (time.time() - retention_s,))
    conn.execute("COMMIT")
    return cur.rowcount
