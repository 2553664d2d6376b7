"""What DeepStack's route adds per request, against REST's ``/api/v1/predict``, side by side.

Starts the real appliance (``ringserve serve``: engine, one uvicorn worker, rings, ZeroMQ) on the
tiny generated pixel detector, so that the model costs almost nothing and the HTTP worker's work is
most of each request. One keep-alive connection sends the same small JPEG, as a multipart form with
one threshold field, alternately to ``/api/v1/predict`` (``confidence_threshold``) and to
``/v1/vision/detection`` (``min_confidence``), in ABBA order so that a drift of the shared box falls
on both alike. Two figures, DeepStack minus REST, against a goal of at most 0.1 ms:

- latency: the median of the paired differences, with a bootstrap 95% interval (both sides hold
  everything the client sees: HTTP and form parse, decode, ring + ZeroMQ hop, model, rendering);
- worker CPU: the HTTP worker's CPU time per request (every thread's, in nanoseconds, from
  /proc/<pid>/task/*/schedstat) over alternating blocks of each route, which a busy box disturbs
  far less than wall time. The engine does the same work for both routes.

    python -m loadtests.bench_deepstack [--pairs 2000] [--blocks 8] [--out loadtests/results/deepstack.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUNDARY = "ringserve-bench-ds"
REST = "/api/v1/predict"
DEEPSTACK = "/v1/vision/detection"


def _jpeg(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 200)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _form(field: str, value: str, image: bytes) -> bytes:
    return b"".join(
        [
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode(),
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="image"\r\n\r\n'.encode(),
            image,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )


def _once(conn: http.client.HTTPConnection, path: str, body: bytes) -> float:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    response = conn.getresponse()
    payload = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {payload[:200]!r}")
    return elapsed


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` so far, in nanoseconds."""
    return sum(int(p.read_text().split()[0]) for p in Path(f"/proc/{pid}/task").glob("*/schedstat"))


def _cpu_per_request(
    conn: http.client.HTTPConnection, pid: int, bodies: dict[str, bytes], blocks: int, n: int
) -> dict[str, float]:
    """Worker CPU per request of each route: ``blocks`` blocks of ``n`` requests each, ABBA."""
    spent: dict[str, list[float]] = {REST: [], DEEPSTACK: []}
    for b in range(blocks):
        for path in (REST, DEEPSTACK) if b % 2 == 0 else (DEEPSTACK, REST):
            before = _cpu_ns(pid)
            for _ in range(n):
                _once(conn, path, bodies[path])
            spent[path].append((_cpu_ns(pid) - before) / n / 1e6)
    return {path: statistics.median(values) for path, values in spent.items()}


def _bootstrap(diffs: list[float], rounds: int = 1000) -> tuple[float, float]:
    rng = random.Random(7)
    medians = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds)]


def measure(pairs: int, warmup: int, blocks: int, width: int, height: int) -> dict[str, object]:
    sys.path.insert(0, str(ROOT))
    from tests.harness import Appliance
    from tests.models import write_pixel_detector

    repo = Path(tempfile.mkdtemp(prefix="rs-bench-ds-")) / "repo"
    write_pixel_detector(repo, delay_ms=0.0)
    image = _jpeg(width, height)
    bodies = {REST: _form("confidence_threshold", "0.4", image), DEEPSTACK: _form("min_confidence", "0.4", image)}
    times: dict[str, list[float]] = {REST: [], DEEPSTACK: []}
    diffs: list[float] = []
    with Appliance(repo, workers=1, env={"RINGSERVE_LOG_LEVEL": "WARNING"}) as app:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=30)
        for i in range(warmup):
            _once(conn, (REST, DEEPSTACK)[i % 2], bodies[(REST, DEEPSTACK)[i % 2]])
        for i in range(pairs):
            order = (REST, DEEPSTACK) if i % 2 == 0 else (DEEPSTACK, REST)  # ABBA
            got = {path: _once(conn, path, bodies[path]) for path in order}
            for path, seconds in got.items():
                times[path].append(seconds)
            diffs.append(got[DEEPSTACK] - got[REST])
        worker = app.worker_pids()[0]
        cpu = _cpu_per_request(conn, worker, bodies, blocks, max(1, pairs // blocks))
        conn.close()
    low, high = _bootstrap(diffs)
    ms = 1000.0
    return {
        "what": "per-request time seen by one keep-alive client, DeepStack route vs REST route",
        "model": "pixels (tiny generated SSD-layout detector, 64x64 input)",
        "image": f"JPEG {width}x{height}, {len(image)} bytes",
        "workers": 1,
        "pairs": pairs,
        "rest_median_ms": round(statistics.median(times[REST]) * ms, 4),
        "deepstack_median_ms": round(statistics.median(times[DEEPSTACK]) * ms, 4),
        "added_median_ms": round(statistics.median(diffs) * ms, 4),
        "added_ci95_ms": [round(low * ms, 4), round(high * ms, 4)],
        "worker_cpu_rest_ms": round(cpu[REST], 4),
        "worker_cpu_deepstack_ms": round(cpu[DEEPSTACK], 4),
        "worker_cpu_added_ms": round(cpu[DEEPSTACK] - cpu[REST], 4),
        "goal_ms": 0.1,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2000)
    p.add_argument("--blocks", type=int, default=8, help="CPU blocks per route (pairs // blocks requests each)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = p.parse_args(argv)
    result = measure(args.pairs, args.warmup, args.blocks, args.width, args.height)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
