"""Target (d), the ceiling: decode + resize + inference in a plain loop, with no HTTP and no IPC.

Each image is decoded with simplejpeg (with the DCT downscale to at least the model's input size),
resized with OpenCV into a reused buffer (the crop of a center-crop model first; a float input
normalised and transposed with numpy: loadtests/bench/prep.py) and run through an ONNX Runtime
session (no spinning),
back to back, on all the cores. Three simple ways to use the cores are measured and the best one is
the ceiling:

- ``procs``:   one process per core, each with a one-thread session;
- ``threads``: one process, one loop thread per core sharing a one-thread-per-run session;
- ``single``:  one process, one loop, the session with one intra-op thread per core.

A runner process loads its session, says ``ready`` on stdout, waits for ``go`` on stdin (so that
all the processes of a config start together), runs ``warmup`` + ``seconds`` and prints its result.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from loadtests.bench.prep import Prep

CONFIGS = ("procs", "threads", "single")


def layout(config: str, cores: int) -> tuple[int, int, int]:
    """(processes, loop threads per process, intra-op threads per session) of a config."""
    return {"procs": (cores, 1, 1), "threads": (1, cores, 1), "single": (1, 1, cores)}[config]


def runner(args: argparse.Namespace) -> None:
    import cv2
    import numpy as np
    import onnxruntime as ort
    import simplejpeg

    cv2.setNumThreads(1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.intra
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    prep = Prep.of(args.model_dir)
    session = ort.InferenceSession(
        str(args.model_dir / "1" / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    images = [Path(p["file"]).read_bytes() for p in json.loads(Path(args.payloads).read_text())]
    w, h = prep.width, prep.height
    min_w, min_h = prep.decode_min
    session.run(None, {name: prep.zeros()})
    print("ready", flush=True)  # the protocol with the orchestrator
    sys.stdin.readline()
    start = time.perf_counter() + args.warmup
    end = start + args.seconds
    latencies: list[list[float]] = [[] for _ in range(args.threads)]

    def loop(index: int) -> None:
        buf = np.empty((h, w, 3), np.uint8)
        k = index * 7
        while (t0 := time.perf_counter()) < end:
            data = images[k % len(images)]
            k += 1
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=min_w, min_height=min_h)
            session.run(None, {name: prep.opencv(img, buf)})
            t1 = time.perf_counter()
            if start <= t1 <= end:
                latencies[index].append(t1 - t0)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    to_wall = time.time() - time.perf_counter()
    flat = [x for per in latencies for x in per]
    print(json.dumps({"latencies_s": flat, "window": [start + to_wall, end + to_wall]}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="the model's directory (model.toml, 1/model.onnx)")
    p.add_argument("--payloads", required=True, help="JSON list of {file, ...}")
    p.add_argument("--threads", type=int, default=1, help="loop threads")
    p.add_argument("--intra", type=int, default=1, help="intra-op threads of the session")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=10.0)
    runner(p.parse_args())


if __name__ == "__main__":
    main()
