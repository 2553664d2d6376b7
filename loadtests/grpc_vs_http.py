"""gRPC against V2 over HTTP (binary tensors), on the light classifier, side by side in one run.

Starts the real appliance (engine + W uvicorn workers, each serving HTTP and gRPC) on the light
generated classifier of loadtests/bench (224x224 uint8 NHWC pixels, 1000 logits), then drives it
from this process with Triton's own asyncio clients, closed loop: C requests in flight, each one
image of raw UINT8 pixels, asking for the ``logits`` output as binary data. Rounds alternate
between the protocols (http, grpc, http, grpc...) so drift on a shared box hits both alike.

Reported per protocol and concurrency: requests/s, p50/p99 latency, and the appliance's CPU time
per request (engine + workers, from /proc), which is the cost a protocol adds on the server side.

    python -m loadtests.grpc_vs_http [--workers 2] [--seconds 2] [--rounds 2] [--concurrency 1 4 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio

from loadtests.bench.workloads import LIGHT_SIZE, light
from tests.harness import Appliance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "loadtests" / "results"


def cpu_seconds(app: Appliance) -> float:
    total = 0.0
    for p in app.tree():
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


async def drive(
    protocol: str, url: str, model: str, pixels: np.ndarray, concurrency: int, seconds: float
) -> dict[str, float]:
    client: Any
    if protocol == "grpc":
        client = grpc_aio.InferenceServerClient(url)
        inp = grpc_aio.InferInput("image", list(pixels.shape), "UINT8")
        out = grpc_aio.InferRequestedOutput("logits")
    else:
        client = http_aio.InferenceServerClient(url, conn_limit=concurrency)
        inp = http_aio.InferInput("image", list(pixels.shape), "UINT8")
        out = http_aio.InferRequestedOutput("logits", binary_data=True)
    inp.set_data_from_numpy(pixels)  # binary tensor data on both
    latencies: list[float] = []
    for _ in range(3 * concurrency):  # warm the connections
        await client.infer(model, [inp], outputs=[out])
    stop = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            result = await client.infer(model, [inp], outputs=[out])
            latencies.append(time.perf_counter() - t0)
            assert result.as_numpy("logits").shape == (1, 1000)

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    await client.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--out", type=Path, default=RESULTS / "grpc-vs-http")
    a = p.parse_args(argv)
    repo = Path(tempfile.mkdtemp(prefix="rs-grpc-bench-")) / "repo"
    work = light(repo)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1, LIGHT_SIZE, LIGHT_SIZE, 3), dtype=np.uint8)
    runs: dict[str, list[dict[str, float]]] = {}
    with Appliance(repo, workers=a.workers, default_model=work.model) as app:
        urls = {"http": app.url.removeprefix("http://"), "grpc": app.grpc_url}
        for c in a.concurrency:
            for _ in range(a.rounds):
                for protocol in ("http", "grpc"):
                    cpu0 = cpu_seconds(app)
                    r = asyncio.run(drive(protocol, urls[protocol], work.model, pixels, c, a.seconds))
                    r["server_cpu_ms_per_request"] = (cpu_seconds(app) - cpu0) * 1000 / max(r["requests"], 1)
                    runs.setdefault(f"{protocol}/c={c}", []).append(r)
                    print(f"{protocol:4} c={c}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms", flush=True)
    summary = {key: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for key, rs in runs.items()}
    meta = {
        "workers": a.workers,
        "seconds": a.seconds,
        "rounds": a.rounds,
        "cores": len(psutil.Process().cpu_affinity()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "median": summary}, indent=2))
    lines = [
        f"# gRPC vs V2 over HTTP (binary tensors), light classifier, {a.workers} workers, {meta['cores']} cores",
        "",
        "medians of the rounds; closed loop from one client process sharing the box",
        "",
        "| concurrency | protocol | req/s | p50 ms | p99 ms | server CPU ms/req | gRPC/HTTP req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in a.concurrency:
        h, g = summary[f"http/c={c}"], summary[f"grpc/c={c}"]
        for name, s in (("http", h), ("grpc", g)):
            ratio = f"{g['rps'] / h['rps']:.2f}" if name == "grpc" else ""
            lines.append(
                f"| {c} | {name} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} "
                f"| {s['server_cpu_ms_per_request']:.2f} | {ratio} |"
            )
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
