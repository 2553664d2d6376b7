"""The result cache (issue 17, point 2): a repeat is answered from cache.db by any worker."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from frontend.state import cache
from frontend.state.db import Database
from tests.harness import Appliance, wait_for
from tests.state_models import counter_by_pid, data_dir, metric, png, query

RED, GREEN, BLUE = (200, 40, 40), (40, 200, 90), (30, 30, 220)


def _post(url: str, body: bytes, **params: Any) -> dict[str, Any]:
    with httpx.Client(timeout=30, headers={"Connection": "close"}) as c:  # any worker
        r = c.post(f"{url}/api/v1/predict", content=body, params=params, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_repeats_are_answered_from_the_cache_on_every_worker(pixel_repo: Path, no_leaks: None) -> None:
    env = {"RINGSERVE_CACHE_ENTRIES": "3"}
    with Appliance(pixel_repo, workers=2, env=env) as app:
        image = png(RED)
        first = _post(app.url, image)
        assert "cached" not in first
        wait_for(lambda: _post(app.url, image).get("cached") is True, 10, "the answer to be cached")
        repeats = []
        for pid in app.worker_pids():  # six through each worker (httpx.post: a connection each)
            with app.only_worker(pid):
                repeats += [_post(app.url, image) for _ in range(6)]
        assert all(r["cached"] is True for r in repeats)
        hit = repeats[0]
        assert hit["detections"] == first["detections"] and hit["image"] == first["image"]
        assert hit["model"] == first["model"] and hit["batch_size"] == first["batch_size"]
        assert hit["request_id"] != first["request_id"]
        assert hit["timings"]["decode_ms"] == hit["timings"]["inference_ms"] == 0
        hits = counter_by_pid(app.run_dir / "metrics", "ringserve_cache", outcome="hit")
        assert len([p for p, n in hits.items() if n > 0]) == 2, hits  # both workers found it

        # Recency is written by each worker's background writer within FLUSH_EVERY_S, so every
        # step below waits for the writes it depends on to land before the next one (an eviction
        # in that window sees the older recency: the LRU is exact only once the writes settle).
        db = data_dir(pixel_repo) / "cache.db"

        def keys() -> set[bytes]:
            return {bytes(k) for (k,) in query(db, "SELECT key FROM entry")}  # type: ignore[arg-type]

        def used(key: bytes) -> float:
            rows = query(db, "SELECT used FROM entry WHERE key = ?", key)
            return float(rows[0][0]) if rows else -1.0  # type: ignore[arg-type]

        def landed(known: set[bytes]) -> bytes:
            wait_for(lambda: len(keys() - known) == 1, 10, "the new answer to be stored")
            return (keys() - known).pop()

        (red,) = keys()
        # other parameters, another key; the batch route uses the cache too
        other = _post(app.url, image, confidence_threshold=0.95)
        assert "cached" not in other and other["detections"] == []
        other_key = landed({red})
        batch = httpx.post(
            f"{app.url}/api/v1/predict/batch", files=[("images", ("a.png", image, "image/png"))], timeout=30
        ).json()
        assert batch["results"][0]["cached"] is True
        wait_for(lambda: used(red) > used(other_key), 10, "the batch hit to mark red as used")

        # LRU within the bound of 3 entries: the least recently used answer goes, in the same
        # write that stores the fourth
        _post(app.url, png(GREEN))
        green = landed({red, other_key})
        _post(app.url, png(BLUE))
        blue = landed({red, other_key, green})
        assert keys() == {red, green, blue}  # "other" was the least recently used
        _post(app.url, image)  # touch red
        wait_for(lambda: used(red) > used(blue), 10, "the hit to mark red as used")
        _post(app.url, png((1, 2, 3)))
        newest = landed({red, green, blue, other_key})
        assert keys() == {red, blue, newest}  # green went; red, touched, stays
        wait_for(
            lambda: metric(httpx.get(f"{app.url}/metrics").text, "ringserve_cache_total", outcome="eviction") >= 2,
            10,
            "the evictions to be counted",
        )
        assert _post(app.url, image)["cached"] is True

        # the entries of a model version that is not served die (here: planted by hand)
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute(
            "INSERT INTO entry (key, model, version, answer, bytes, used) VALUES (?, 'pixels', 9, x'00', 1, ?)",
            (b"k" * 20, time.time()),
        )
        conn.close()
        wait_for(lambda: not query(db, "SELECT 1 FROM entry WHERE version = 9"), 10, "the stale entries to go")
        scrape = httpx.get(f"{app.url}/metrics").text
        assert metric(scrape, "ringserve_cache_total", outcome="hit") >= 15
        assert metric(scrape, "ringserve_cache_total", outcome="miss") >= 5


def test_a_broken_cache_database_is_a_miss(tmp_path: Path) -> None:
    (tmp_path / "cache.db").write_bytes(b"garbage" * 1000)
    db = Database(tmp_path / "cache.db", cache.MIGRATIONS, name="cache")
    counts: dict[str, int] = {}
    rc = cache.ResultCache(db, 10, 10_000, lambda what, n: counts.update({what: counts.get(what, 0) + n}))

    async def lookup() -> bytes | None:
        return await rc.get(b"k" * 20)

    import asyncio

    try:
        assert asyncio.run(lookup()) is None
        assert counts == {"error": 1}
    finally:
        db.close()


@pytest.mark.parametrize("served", [{("a", 1)}, set()])
def test_forget_versions(tmp_path: Path, served: set[tuple[str, int]]) -> None:
    db = Database(tmp_path / "cache.db", cache.MIGRATIONS, name="cache")
    try:
        puts = [(bytes([i]) * 20, m, v, b"{}", time.time()) for i, (m, v) in enumerate([("a", 1), ("a", 2), ("b", 1)])]
        assert db.call_sync(cache._write, puts, [], 10, 10_000) == 0
        db.call_sync(cache._forget_versions, served)
        left = db.call_sync(lambda c: sorted(c.execute("SELECT model, version FROM entry").fetchall()))
        assert left == sorted(served)
    finally:
        db.close()
