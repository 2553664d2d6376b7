"""Rate limits across all workers (issue 17, point 3): limits' algorithms over our SQLite storage."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from limits import parse

from frontend.state.db import Database, StoreError
from frontend.state.ratelimit import MIGRATIONS, STRATEGIES, RateLimits, SQLiteStorage, parse_limits
from tests.harness import Appliance
from tests.state_models import counter_by_pid, data_dir, metric, png

LIMIT = 30


def _db(tmp_path: Path) -> Database:
    return Database(tmp_path / "ratelimit.db", MIGRATIONS, name="ratelimit")


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_counts_exactly_on_sqlite(tmp_path: Path, strategy: str) -> None:
    """Threads with connections of their own, as workers would: exactly the allowed count passes."""
    limits = RateLimits(_db(tmp_path), "10/minute", strategy)
    other = RateLimits(
        Database(tmp_path / "ratelimit.db", MIGRATIONS, name="ratelimit", threads=4), "10/minute", strategy
    )
    try:
        results: list[bool] = []
        lock = threading.Lock()

        def hit(_: int) -> None:
            verdict = (limits if _ % 2 else other).db.call_sync((limits if _ % 2 else other).hit, "ip:1")
            with lock:
                results.append(verdict.allowed)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(hit, range(30)))
        assert results.count(True) == 10
        refused = limits.db.call_sync(limits.hit, "ip:1")
        assert not refused.allowed and 1 <= refused.retry_after_s <= 60 and refused.limit == "10 per 1 minute"
        assert limits.db.call_sync(limits.hit, "ip:2").allowed  # another client has its own budget
    finally:
        limits.db.close()
        other.db.close()


def test_a_refusal_by_one_limit_takes_nothing_from_the_others(tmp_path: Path) -> None:
    limits = RateLimits(_db(tmp_path), "100/minute;3/second")
    try:
        allowed = [limits.db.call_sync(limits.hit, "k").allowed for _ in range(10)]
        assert allowed.count(True) == 3

        def held(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM rl_entry").fetchone()[0])

        assert limits.db.call_sync(held) == 6  # 3 per limit: the 7 refused hits rolled back
    finally:
        limits.db.close()


def test_a_failed_check_lets_this_workers_requests_through_unchecked_for_a_while(tmp_path: Path) -> None:
    """A locked file costs one check SQLite's busy timeout; the next ones are let through at once
    (not each waiting the timeout), and checking resumes by itself once the pause is over."""
    db = Database(tmp_path / "ratelimit.db", MIGRATIONS, name="ratelimit", busy_timeout_ms=200)
    limits = RateLimits(db, "10/minute")

    async def scenario() -> tuple[str, str, bool]:
        assert (await limits.check("k")).allowed  # the file exists, the DB thread has its connection
        lock = sqlite3.connect(tmp_path / "ratelimit.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(StoreError) as first:
                await limits.check("k")
            with pytest.raises(StoreError) as second:
                await limits.check("k")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the pause ends; the next check is counted again
            try:
                return str(first.value), str(second.value), (await limits.check("k")).allowed
            except StoreError:
                await asyncio.sleep(0.05)
        raise AssertionError("checks did not resume after the pause")

    try:
        first, second, resumed = asyncio.run(scenario())
        assert "locked" in first, first
        assert "not checked" in second, second
        assert resumed

        def held(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM rl_entry").fetchone()[0])

        assert db.call_sync(held) == 2  # the first and the resumed check; the others counted nothing
    finally:
        db.close()


def test_storage_speaks_limits_interface(tmp_path: Path) -> None:
    db = _db(tmp_path)
    try:

        def run(conn: sqlite3.Connection) -> tuple[int, int, bool]:
            s = SQLiteStorage(conn)
            first, second = s.incr("a", 60), s.incr("a", 60)
            s.clear("a")
            return first, second, s.check()

        assert db.call_sync(run) == (1, 2, True)
    finally:
        db.close()


def test_a_bad_limit_is_refused_with_the_setting_named() -> None:
    with pytest.raises(ValueError, match="RINGSERVE_RATE_LIMIT"):
        parse_limits("twenty per sec")
    assert [str(i) for i in parse_limits("20/second;600/minute")] == [str(parse("20/second")), str(parse("600/minute"))]


def _burst(url: str, n: int, body: bytes, source: str = "127.0.0.1") -> list[httpx.Response]:
    """``n`` requests at once, each on a connection of its own (so they spread over the workers)."""

    def one(_: int) -> httpx.Response:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=30) as c:
            return c.post(f"{url}/api/v1/predict", content=body, headers={"Content-Type": "image/png"})

    with ThreadPoolExecutor(32) as pool:
        return list(pool.map(one, range(n)))


def test_burst_of_three_times_the_limit_over_four_workers(pixel_repo: Path, no_leaks: None) -> None:
    env = {"RINGSERVE_RATE_LIMIT": f"{LIMIT}/minute"}
    with Appliance(pixel_repo, workers=4, env=env) as app:
        body = png((200, 40, 40))
        answers = _burst(app.url, 3 * LIMIT, body)
        codes = [r.status_code for r in answers]
        odd = [r.text for r in answers if r.status_code not in (200, 429)]  # what went wrong, if any
        trouble = [line for line in app.log().splitlines() if "WARNING" in line or "ERROR" in line]
        assert codes.count(200) == LIMIT, (codes, odd[:3], trouble[-20:])
        assert codes.count(429) == 2 * LIMIT, codes
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.json()["error"] == "rate_limited"
        assert refused.json()["request_id"] == refused.headers["x-request-id"]
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        # the requests were answered by several workers, each counting in the one shared window
        per_pid = counter_by_pid(app.run_dir / "metrics", "ringserve_rate_limit", outcome="refused")
        assert len([p for p, n in per_pid.items() if n > 0]) >= 2, per_pid
        # health, metrics and the console are not limited; another client has its budget
        assert httpx.get(f"{app.url}/health").status_code == 200
        assert _burst(app.url, 1, body, source="127.0.0.2")[0].status_code == 200

        # a locked rate-limit database lets requests through, quickly, counted and warned about
        conn = sqlite3.connect(data_dir(pixel_repo) / "ratelimit.db", isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            started = time.monotonic()
            locked = _burst(app.url, 4, body, source="127.0.0.3")
            assert [r.status_code for r in locked] == [200] * 4
            assert time.monotonic() - started < 5
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        scrape = httpx.get(f"{app.url}/metrics").text
        assert metric(scrape, "ringserve_rate_limit_total", outcome="error") >= 4
        assert metric(scrape, "ringserve_rate_limit_total", outcome="refused") == 2 * LIMIT
        assert "rate limit not checked" in app.log()
