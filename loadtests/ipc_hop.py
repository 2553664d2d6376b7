"""Measure the per-image cost of the shared-memory ring + ZeroMQ hop on its own.

Starts the real engine with a trivial generated model of the default detector's input size
(300x300x3), then from this process: take a ring slot, write the pixels into it, send an Infer,
wait for the Result. The hop is the round trip minus the engine's own inference time; it includes
both processes' message encode/decode, socket send/receive, validation, queueing and the one memcpy
of the slot into the batch.

    python -m loadtests.ipc_hop [--n 2000] [--size 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import zmq

from engine.launcher import wait_engine_ready
from ipc import messages as m
from ipc.ring import Ring
from ipc.sockets import engine_address, make_socket

ROOT = Path(__file__).resolve().parents[1]


def measure(n: int, size: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from tests.models import write_pixel_detector

    work = Path(tempfile.mkdtemp(prefix="rs-hop-"))
    write_pixel_detector(work / "repo", size=size, max_batch_size=1, delay_ms=0.0)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "engine",
            "--repo",
            str(work / "repo"),
            "--run-dir",
            str(work / "run"),
            "--threads",
            "1",
        ],
        cwd=ROOT,
        env={**os.environ, "RINGSERVE_LOG_LEVEL": "WARNING"},
    )
    ring = Ring(4, size * size * 3)
    ctx = zmq.Context()
    try:
        address = engine_address(work / "run")
        wait_engine_ready(address, proc, 60)
        sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False)
        sock.send(m.encode(m.Hello(os.getpid(), ring.name, ring.slots, ring.slot_bytes)))
        assert isinstance(m.decode(sock.recv()), m.Ready)
        pixels = np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)
        hops, trips, inference = [], [], []
        engine = psutil.Process(proc.pid)
        for i in range(n + 100):
            if i == 100:  # after the warm-up: CPU of both processes from here on
                cpu0 = sum(engine.cpu_times()[:2]) + time.process_time()
            started = time.perf_counter()
            slot, gen = ring.acquire()
            ring.view(slot, pixels.shape)[...] = pixels
            sock.send(m.encode(m.Infer(str(i), "pixels", 1, slot, gen, size, size, time.time() + 10)))
            while True:
                reply = m.decode(sock.recv())
                if isinstance(reply, m.Result):
                    break
            trip = (time.perf_counter() - started) * 1e6
            ring.release(reply.slot, reply.generation)
            if i >= 100:  # warm-up
                trips.append(trip)
                inference.append(reply.inference_ms * 1000)
                hops.append(trip - reply.inference_ms * 1000)
        cpu = sum(engine.cpu_times()[:2]) + time.process_time() - cpu0
        sock.close()
        q = statistics.quantiles(hops, n=100)
        return {
            "n": n,
            "size": size,
            "hop_p50_us": statistics.median(hops),
            "hop_p90_us": q[89],
            "hop_p99_us": q[98],
            "round_trip_p50_us": statistics.median(trips),
            # CPU both processes spent per image, less the model's own run (single-threaded here):
            # what the hop takes away from decoding and inference under load.
            "hop_cpu_us": cpu / n * 1e6 - statistics.fmean(inference),
            "zmq_echo_floor_p50_us": zmq_echo_floor(n),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        ring.close()
        ctx.term()
        shutil.rmtree(work, ignore_errors=True)


_ECHO = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart())
"""


def zmq_echo_floor(n: int) -> float:
    """p50 round trip of a bare 100-byte DEALER/ROUTER echo between two processes: this machine's floor."""
    work = Path(tempfile.mkdtemp(prefix="rs-echo-"))
    address = f"ipc://{work / 'echo.sock'}"
    server = subprocess.Popen([sys.executable, "-c", _ECHO, address])
    ctx = zmq.Context()
    try:
        sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False)
        trips = []
        for i in range(n + 100):
            started = time.perf_counter()
            sock.send(b"x" * 100)
            sock.recv()
            if i >= 100:
                trips.append((time.perf_counter() - started) * 1e6)
        sock.close()
        return statistics.median(trips)
    finally:
        server.kill()
        server.wait()
        ctx.term()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = measure(args.n, args.size)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
