"""The engine's control plane alone: synthetic workers, a trivial model, images/s and engine CPU.

Starts the real engine (``python -m engine engine``) on a generated 64x64 pixel detector (a few
microseconds of ONNX Runtime per image), then W synthetic worker processes: each creates a real
shared-memory ring, says Hello over its own DEALER like an HTTP worker, and keeps every slot of its
ring in flight (write the pixels, send Infer; on each Result, release the slot and send the next).
No HTTP, no decoding: what is left is the engine's receive, validation, routing, batching, slot
copy, reply encoding and the workers' own sends and receives. Reports images/s over the window
and the CPU per image (user + system) of the engine and, apart, of the synthetic workers (on a
2-core box they share the cores: the engine's part is the one that is bound to one core by its GIL),
and the mean batch the engine formed.

    python -m loadtests.control_plane [--workers 2] [--slots 64] [--seconds 5] [--cpu-max-batch -1]

Issue 15's bar: >= 20,000 images/s on the 2-core development box.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import zmq

from engine.launcher import wait_engine_ready
from ipc import messages as m
from ipc.ring import Ring
from ipc.sockets import engine_address, make_socket

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def worker(address: str, slots: int, start: float, end: float, out: Any) -> None:
    """One synthetic HTTP worker: all of its slots in flight until ``end`` (wall clock)."""
    ring = Ring(slots, SIZE * SIZE * 3)
    ctx = zmq.Context()
    sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False)
    try:
        sock.send(m.encode(m.Hello(os.getpid(), ring.name, ring.slots, ring.slot_bytes)))
        reply = m.decode(sock.recv())
        assert isinstance(reply, m.Ready), reply
        pixels = np.full((SIZE, SIZE, 3), 200, np.uint8)
        n = counted = errors = 0

        def send() -> None:
            nonlocal n
            slot, gen = ring.acquire()
            ring.view(slot, pixels.shape)[...] = pixels
            sock.send(m.encode(m.Infer(str(n), "pixels", 1, slot, gen, SIZE, SIZE, time.time() + 30)))
            n += 1

        while time.time() < start - 1.0:  # everyone starts together, after a second of warm-up
            time.sleep(0.001)
        for _ in range(slots):
            send()
        while (now := time.time()) < end:
            if not sock.poll(1000):
                continue
            for msg in m.unpack(m.decode(sock.recv())):
                if isinstance(msg, m.Result):
                    ring.release(msg.slot, msg.generation)
                    counted += start <= now
                elif isinstance(msg, m.Error):
                    errors += 1
                    ring.release(msg.slot, msg.generation)
                else:
                    continue
                send()
        out.put({"images": counted, "errors": errors})
    finally:
        sock.close(linger=0)
        ctx.term()
        ring.close()


def measure(workers: int, slots: int, seconds: float, cpu_max_batch: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from tests.models import write_pixel_detector

    work = Path(tempfile.mkdtemp(prefix="rs-cp-"))
    write_pixel_detector(work / "repo", size=SIZE, max_batch_size=64, delay_ms=1.0)
    cmd = [sys.executable, "-m", "engine", "engine", "--repo", str(work / "repo"), "--run-dir", str(work / "run")]
    cmd += ["--cpu-max-batch", str(cpu_max_batch)]
    env = {**os.environ, "RINGSERVE_LOG_LEVEL": "WARNING", "RINGSERVE_MODEL_CONTROL": "none"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    spawn = mp.get_context("spawn")
    try:
        address = engine_address(work / "run")
        wait_engine_ready(address, proc, 60)
        start = time.time() + 3.0  # the workers' start-up (spawn, imports) and a second of warm-up
        end = start + seconds
        out = spawn.Queue()
        procs = [spawn.Process(target=worker, args=(address, slots, start, end, out)) for _ in range(workers)]
        for p in procs:
            p.start()
        engine = psutil.Process(proc.pid)
        synthetic = [psutil.Process(p.pid) for p in procs]
        while time.time() < start:
            time.sleep(0.001)
        cpu0, wcpu0 = _cpu([engine]), _cpu(synthetic)
        while time.time() < end:
            time.sleep(0.001)
        cpu, wcpu = _cpu([engine]) - cpu0, _cpu(synthetic) - wcpu0
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(10)
        images = sum(r["images"] for r in results)
        batches = mean_batch(work / "run")
        return {
            "workers": workers,
            "slots_per_worker": slots,
            "seconds": seconds,
            "cpu_max_batch": cpu_max_batch,
            "images_per_s": images / seconds,
            "errors": sum(r["errors"] for r in results),
            "engine_cpu_cores": cpu / seconds,
            "engine_cpu_us_per_image": cpu / max(images, 1) * 1e6,
            "workers_cpu_cores": wcpu / seconds,
            "workers_cpu_us_per_image": wcpu / max(images, 1) * 1e6,
            "mean_batch": batches,
            "cores": len(os.sched_getaffinity(0)),
        }
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def mean_batch(run_dir: Path) -> float:
    """Images per executed batch over the engine's life (warm-up included), from its metric files."""
    from frontend.console_stats import read_snapshot
    from ipc.metrics_dir import metrics_dir

    snap = read_snapshot(path=metrics_dir(run_dir))
    return snap.batch_images / max(snap.batches, 1.0)


def _cpu(procs: list[psutil.Process]) -> float:
    """User + system seconds of these processes so far."""
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--cpu-max-batch", type=int, default=-1, help="the engine's RINGSERVE_CPU_MAX_BATCH (-1: default)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = measure(args.workers, args.slots, args.seconds, args.cpu_max_batch)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
