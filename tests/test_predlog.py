"""The prediction log (issue 17, point 4): every worker's predictions, written off the request path."""

from __future__ import annotations

import base64
import csv
import io
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.harness import Appliance, wait_for
from tests.state_models import data_dir, metric, png

RED, GREEN, BLUE = (200, 40, 40), (40, 200, 90), (30, 30, 220)


def _post(url: str, path: str, **kw: Any) -> httpx.Response:
    with httpx.Client(timeout=30, headers={"Connection": "close"}) as c:  # any worker
        return c.post(f"{url}{path}", **kw)


def _page(url: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/predictions", params=params, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_log_filters_pages_and_exports(pixel_repo: Path, no_leaks: None) -> None:
    env = {"RINGSERVE_PREDICTION_LOG": "1"}
    with Appliance(pixel_repo, workers=2, env=env) as app:
        before = time.time()
        ids = []
        for rgb in (RED, GREEN, BLUE, RED):
            r = _post(app.url, "/api/v1/predict", content=png(rgb), headers={"Content-Type": "image/png"})
            assert r.status_code == 200
            ids.append(r.json()["request_id"])
        batch = {"images": [{"image_b64": base64.b64encode(png(c)).decode()} for c in (GREEN, BLUE)]}
        r = _post(app.url, "/api/v1/models/pixels/predict/batch", json=batch)
        assert r.status_code == 200
        wait_for(lambda: len(_page(app.url, limit=100)["predictions"]) == 6, 10, "six logged predictions")

        page = _page(app.url, limit=100)
        assert page["next_cursor"] is None
        logged = page["predictions"]
        assert [p["id"] for p in logged] == sorted((p["id"] for p in logged), reverse=True)  # newest first
        by_id = {p["request_id"]: p for p in logged}
        assert set(ids) <= set(by_id) and {f"{r.json()['request_id']}.{i}" for i in (0, 1)} <= set(by_id)
        first = by_id[ids[0]]
        assert first["model"] == {"name": "pixels", "version": 1} and first["image"] == {"width": 96, "height": 72}
        assert first["route"] == "/api/v1/predict" and first["client"] == "127.0.0.1" and first["cached"] is False
        assert first["detections"][0]["label"] == "thing" and len(first["detections"][0]["bbox"]) == 4
        assert set(first["timings"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms"}
        assert by_id[f"{r.json()['request_id']}.0"]["route"] == "/api/v1/models/pixels/predict/batch"

        # filters: label, confidence (the pixel detector scores 0.9), model, time
        assert len(_page(app.url, label="thing", min_confidence=0.85)["predictions"]) == 6
        assert _page(app.url, min_confidence=0.95)["predictions"] == []
        assert _page(app.url, label="nothing")["predictions"] == []
        assert _page(app.url, model="other")["predictions"] == []
        assert len(_page(app.url, since=before - 1, until=time.time() + 1)["predictions"]) == 6
        assert _page(app.url, until="2000-01-01T00:00:00Z")["predictions"] == []
        bad = httpx.get(f"{app.url}/api/v1/predictions", params={"since": "yesterday"})
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_parameter"

        # cursor pages: every entry once, in order
        seen: list[int] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 4}
            if cursor:
                params["cursor"] = cursor
            page = _page(app.url, **params)
            seen += [p["id"] for p in page["predictions"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [p["id"] for p in logged]

        # exports, streamed: JSON lines and CSV with a header, oldest first
        jsonl = httpx.get(f"{app.url}/api/v1/predictions/export", params={"format": "jsonl"})
        assert jsonl.headers["content-type"].startswith("application/x-ndjson")
        rows = [orjson.loads(line) for line in jsonl.text.splitlines()]
        assert [x["id"] for x in rows] == sorted(p["id"] for p in logged)
        text = httpx.get(f"{app.url}/api/v1/predictions/export", params={"format": "csv", "label": "thing"}).text
        table = list(csv.reader(io.StringIO(text)))
        assert table[0][:3] == ["id", "time", "request_id"] and len(table) == 7

        # a locked log database: predictions stay fast and fine; the entries are dropped and counted
        conn = sqlite3.connect(data_dir(pixel_repo) / "predictions.db", isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            for rgb in (RED, GREEN):
                started = time.monotonic()
                r = _post(app.url, "/api/v1/predict", content=png(rgb), headers={"Content-Type": "image/png"})
                assert r.status_code == 200 and time.monotonic() - started < 1.0

            def dropped() -> bool:
                scrape = httpx.get(f"{app.url}/metrics").text
                return metric(scrape, "ringserve_prediction_log_total", outcome="dropped_error") >= 2

            wait_for(dropped, 20, "the locked log to drop its entries")
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        assert "entries dropped (predictions): predictions: database is locked" in app.log()
        scrape = httpx.get(f"{app.url}/metrics").text
        assert metric(scrape, "ringserve_prediction_log_total", outcome="written") == 6


def test_corrupt_log_never_fails_a_prediction_and_retention_holds(tmp_path: Path, no_leaks: None) -> None:
    from tests.models import write_pixel_detector

    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    state = data_dir(repo)
    state.mkdir()
    (state / "predictions.db").write_bytes(b"this is not a database" * 500)
    env = {"RINGSERVE_PREDICTION_LOG": "1", "RINGSERVE_PREDICTION_LOG_ROWS": "3"}
    with Appliance(repo, workers=2, env=env) as app:
        for rgb in (RED, GREEN, BLUE):
            r = _post(app.url, "/api/v1/predict", content=png(rgb), headers={"Content-Type": "image/png"})
            assert r.status_code == 200

        def dropped() -> bool:
            scrape = httpx.get(f"{app.url}/metrics").text
            return metric(scrape, "ringserve_prediction_log_total", outcome="dropped_error") == 3

        wait_for(dropped, 10, "three dropped entries")
        failed = httpx.get(f"{app.url}/api/v1/predictions")
        assert failed.status_code == 503 and failed.json()["error"] == "prediction_log_unavailable"

        # the file repaired (here: removed), the workers reopen it (after a pause) and log again,
        # keeping the newest 3 rows
        (state / "predictions.db").unlink()
        sent: list[str] = []

        def three_newest() -> bool:
            r = _post(app.url, "/api/v1/predict", content=png(RED), headers={"Content-Type": "image/png"})
            sent.append(r.json()["request_id"])
            page = httpx.get(f"{app.url}/api/v1/predictions")
            if page.status_code != 200 or len(sent) < 5:
                return False
            logged = [p["request_id"] for p in page.json()["predictions"]]
            return len(logged) == 3 and set(logged) <= set(sent)

        wait_for(three_newest, 30, "the log to be back, holding its row bound", every=0.3)


def test_a_full_disk_drops_log_entries_and_predictions_go_on(tmp_path: Path, no_leaks: None) -> None:
    """The data dir on a 1 MB tmpfs of the appliance's own (a mount namespace), filled up."""
    from tests.models import write_pixel_detector
    from tests.shm_ns import why_not

    if why_not():  # pragma: no cover - the test machines are root
        pytest.fail(f"cannot make a private mount namespace here: {why_not()}")
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    state = data_dir(repo)
    state.mkdir()
    script = f'mount -t tmpfs -o size=1m tmpfs {state} && exec "$@"'
    prefix = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh")
    with Appliance(repo, workers=2, env={"RINGSERVE_PREDICTION_LOG": "1"}, prefix=prefix) as app:
        inside = Path(f"/proc/{app.proc.pid}/root{state}")  # type: ignore[union-attr]
        filler = inside / "filler"
        with open(filler, "wb") as f:  # fill the tmpfs to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for rgb in (RED, GREEN, BLUE):
            started = time.monotonic()
            r = _post(app.url, "/api/v1/predict", content=png(rgb), headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and time.monotonic() - started < 1.0

        def dropped() -> bool:
            scrape = httpx.get(f"{app.url}/metrics").text
            return metric(scrape, "ringserve_prediction_log_total", outcome="dropped_error") >= 3

        wait_for(dropped, 20, "the full disk to drop the entries")
        # the warning follows the counter, through the worker's stderr pipe
        wait_for(lambda: "entries dropped (predictions)" in app.log(), 10, "the warning in the log")
        filler.unlink()  # room again: the log writes again (after its reopen pause)

        def written() -> bool:
            _post(app.url, "/api/v1/predict", content=png(RED), headers={"Content-Type": "image/png"})
            scrape = httpx.get(f"{app.url}/metrics").text
            return metric(scrape, "ringserve_prediction_log_total", outcome="written") >= 1

        wait_for(written, 30, "the log to write again", every=0.5)
