"""One scrape of /metrics tells the story of every worker and the engine."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import Appliance, wait_for
from tests.test_appliance import colour, png


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, val) in ls for k, val in labels.items()))


def send(url: str, n: int) -> None:
    # New connections each time so uvicorn spreads requests over its workers.
    for i in range(n):
        r = httpx.post(f"{url}/api/v1/predict", content=png(colour(i)), headers={"content-type": "image/png"})
        assert r.status_code == 200


def test_one_scrape_counts_every_worker_and_the_engine(pixel_repo: Path, no_leaks: None) -> None:
    with Appliance(pixel_repo, workers=2) as app:
        wait_for(lambda: len(app.worker_pids()) == 2, 30, "two workers")
        app.wait_all_workers_ready()
        n = 60
        send(app.url, n)
        s = scrape(app.url)
        route = {"route": "/api/v1/predict"}
        assert total(s, "ringserve_http_requests_total", status="200", **route) == n
        assert total(s, "ringserve_inference_images_total", model="pixels") == n
        assert total(s, "ringserve_batch_size_sum", model="pixels") == n
        assert total(s, "ringserve_queue_wait_seconds_count", model="pixels") == n
        assert total(s, "ringserve_decode_duration_seconds_count") == n
        # Both workers served (each has its own series of ring gauges) and nothing is in flight.
        pids = {dict(ls)["pid"] for (name, ls) in s if name == "ringserve_ring_slots"}
        assert len(pids) == 2
        assert total(s, "ringserve_ring_slots_in_use") == 0
        assert total(s, "ringserve_build_info") == 1
        assert total(s, "ringserve_model_load_seconds", model="pixels") > 0
        bad = httpx.post(f"{app.url}/api/v1/predict", content=b"nope", headers={"content-type": "image/png"})
        assert bad.status_code == 400
        assert total(scrape(app.url), "ringserve_errors_total", reason="bad_input") == 1

        # A worker dies: its counts stay (folded into the archive), nothing counts twice.
        victim = app.worker_pids()[0]
        before = total(scrape(app.url), "ringserve_http_requests_total", status="200", **route)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in app.worker_pids() and len(app.worker_pids()) == 2, 30, "a new worker")
        app.wait_all_workers_ready()
        metrics_dir = app.run_dir / "metrics"
        wait_for(lambda: not list(metrics_dir.glob(f"*_{victim}.db")), 30, "the dead worker's files folded")
        after = total(scrape(app.url), "ringserve_http_requests_total", status="200", **route)
        assert after == before
        send(app.url, 10)
        assert total(scrape(app.url), "ringserve_http_requests_total", status="200", **route) == before + 10
        assert total(scrape(app.url), "ringserve_inference_images_total", model="pixels") == n + 10
