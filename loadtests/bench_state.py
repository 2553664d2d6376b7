"""Benchmark of the shared state (issue 17, points 2 and 6). Not a test: it prints measurements.

    python -m loadtests.bench_state [--seconds 8] [--rounds 2] [--concurrency 8] [--workers 2]

1. The cost of a cache hit on the worker: ``CachingService.predict`` answered from a real
   cache.db (key hash of a 640x480 JPEG, the lookup on a DB thread, the answer rebuilt), median
   and p99 over a few thousand hits, in process.
2. Throughput of the synchronous path on the light model (the benchmark's generated classifier),
   side by side in one run: the appliance with everything off, and with all four on (jobs are
   always on; result cache with every request a miss, since each image is unique; a rate limit
   high enough to let everything through, so every request is checked; the prediction log).
   Rounds alternate off/on so drift of a shared box falls on both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import payloads
from loadtests.bench.workloads import make


def hit_cost(n: int = 3000) -> dict[str, float]:
    from frontend.params import Params
    from frontend.schemas import Detection, Timings
    from frontend.service import ImageRequest, ImageResult
    from frontend.state import cache
    from frontend.state.db import Database

    jpeg = payloads.build(("cat",), ((640, 480),))[0].jpeg
    dets = tuple(
        Detection(label="cat", class_id=17, confidence=0.9 - i / 100, bbox=[1.0 * i, 2.0, 3.0, 4.0]) for i in range(10)
    )
    answer = ImageResult(
        "r", "m", 1, "ssd", 640, 480, dets, (), (), Timings(decode_ms=1, queue_ms=1, inference_ms=1, total_ms=3), 1
    )

    class Info:
        name, version = "m", 1

    class Inner:
        def model(self, name: str, version: int | None) -> Info:
            return Info()

        async def predict(self, req: ImageRequest) -> ImageResult:
            return answer

    async def run() -> list[float]:
        with tempfile.TemporaryDirectory() as d:
            db = Database(Path(d) / "cache.db", cache.MIGRATIONS, name="cache", threads=2)
            rc = cache.ResultCache(db, 1000, 10**8, lambda what, k: None)
            svc = cache.CachingService(Inner(), rc)
            req = ImageRequest("m", None, Params(), "r2", time.monotonic(), image=jpeg)
            await db.call(cache._lookup, b"")  # the file created, as the cache writer does at start
            await svc.predict(req)
            await rc.flush()
            times = []
            for _ in range(n):
                t = time.perf_counter()
                got = await svc.predict(req)
                times.append(time.perf_counter() - t)
                assert getattr(got, "cached", False)
            db.close()
            return times

    times = sorted(asyncio.run(run()))
    return {"median_ms": statistics.median(times) * 1000, "p99_ms": times[int(len(times) * 0.99)] * 1000}


def throughput(url: str, images: list[bytes], seconds: float, concurrency: int) -> float:
    stop = time.monotonic() + seconds
    done = [0] * concurrency
    errors: list[str] = []

    def client(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            n = 0
            while time.monotonic() < stop:
                body = images[n % len(images)] + f"{i}-{n}-{time.monotonic_ns()}".encode()  # unique: a cache miss
                r = c.post(f"{url}/api/v1/predict", content=body, headers={"Content-Type": "image/jpeg"})
                if r.status_code != 200:
                    errors.append(r.text[:200])
                n += 1
                done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return sum(done) / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> None:
    from tests.harness import Appliance

    p = argparse.ArgumentParser(prog="python -m loadtests.bench_state", description=__doc__)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)

    cost = hit_cost()
    print(f"cache hit on the worker: median {cost['median_ms']:.3f} ms, p99 {cost['p99_ms']:.3f} ms")

    scratch = Path(tempfile.mkdtemp(prefix="rs-bench-state-"))
    work = make("light", scratch)
    images = [x.jpeg for x in payloads.build(sizes=((640, 480),))]
    on = {
        "RINGSERVE_CACHE_ENTRIES": "10000",
        "RINGSERVE_RATE_LIMIT": "2000/second",  # above the throughput: every request checked, none refused
        "RINGSERVE_PREDICTION_LOG": "1",
        "RINGSERVE_DATA_DIR": str(scratch / "state"),
    }
    off = {"RINGSERVE_DATA_DIR": str(scratch / "state-off")}
    results: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(a.rounds):
        for name, env in (("off", off), ("on", on)):
            with Appliance(work.repo, workers=a.workers, env=env, default_model=work.model) as app:
                throughput(app.url, images, 1.5, a.concurrency)  # warm-up
                rps = throughput(app.url, images, a.seconds, a.concurrency)
                results[name].append(rps)
                extra: Any = ""
                if name == "on":
                    scrape = httpx.get(f"{app.url}/metrics").text
                    extra = [
                        line
                        for line in scrape.splitlines()
                        if line.startswith(("ringserve_cache_total", "ringserve_prediction_log_total"))
                    ]
                print(f"{name}: {rps:.1f} requests/s {extra}")
    mean_off, mean_on = statistics.mean(results["off"]), statistics.mean(results["on"])
    ratios = [on_ / off_ for off_, on_ in zip(results["off"], results["on"], strict=True)]
    print("per round, on/off: " + ", ".join(f"{100 * (r - 1):+.1f}%" for r in ratios))
    print(f"median of the rounds' ratios: {100 * (statistics.median(ratios) - 1):+.1f}%")
    print(
        f"light model, {a.workers} workers, concurrency {a.concurrency}: off {mean_off:.1f}/s, all on {mean_on:.1f}/s,"
        f" change {100 * (mean_on / mean_off - 1):+.1f}%"
    )


if __name__ == "__main__":
    main()
