"""Check the engine's CUDA path on a GPU box: provider choice, IOBinding outputs, throughput, end to end.

    python -m loadtests.gpu_check --model models/ssd-mobilenet-v2-coco --engine
    python -m loadtests.gpu_check --model pixel-detector            # the tests' tiny model, no files needed
    python -m loadtests.gpu_check --torchvision resnet50 --engine   # random weights (needs torch + torchvision)

What it does, with the engine's own code (engine.session, engine.graph, engine.heads):

1. environment: onnxruntime version and file, available providers, ``choose_providers()``, GPU;
2. an ``OrtSession`` with the chosen providers (CUDA first on a GPU box) and one on the CPU; what
   ONNX Runtime printed while the CUDA session was created and first ran (it should print nothing);
3. correctness: ``OrtSession.run`` (IOBinding on CUDA) against the CPU provider, for fresh inputs per
   trial (several inputs in a row through the same reused device buffer);
4. throughput per batch size: IOBinding (``OrtSession.run``), a plain ``session.run`` on CUDA, and the
   CPU provider with one intra-op thread per core;
5. with ``--engine``: ``python -m engine engine`` in a subprocess, a ring and a DEALER socket like a
   frontend worker's, a few hundred Infer messages with up to ``--inflight`` in flight.

Prints a table last and writes everything as JSON (``--json``, default loadtests/results/gpu_check.json).
Real photos (the tests' cache, ``RINGSERVE_CACHE_DIR``) are used as inputs when present, else noise.

On CUDA, ``OrtSession`` pads every batch to one size (``--max-batch``, default the model's
max_batch_size), as the engine does: "cuda_ortsession" at batch n is n real images in a padded batch,
"cuda_plain_run" a plain ``session.run`` at exactly n. "shape_switch" shows why: per-call times while the
batch size changes. onnxruntime-gpu needs the CUDA 13 and cuDNN 9 libraries on the loader path (the CUDA
image has them; with the nvidia-* pip packages, set LD_LIBRARY_PATH or pass ``--preload-dlls``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHOTOS = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "two_people.jpg", "bus.jpg")


# ----------------------------------------------------------------------------- helpers
_T0 = time.perf_counter()


def step(what: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {what}", flush=True)


class Captured:
    text = ""


@contextlib.contextmanager
def capture_fds() -> Iterator[Captured]:
    """What the process writes to fds 1 and 2 (ONNX Runtime's C++ logs and Python prints)."""
    out = Captured()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            out.text = tmp.read().decode(errors="replace")


def photos_dir() -> Path:
    env = os.environ.get("RINGSERVE_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "ringserve") / "photos"


def load_photos(height: int, width: int) -> list[np.ndarray]:
    """The tests' photos stretched to the model input (RGB uint8), or none when not cached."""
    images = []
    for name in PHOTOS:
        path = photos_dir() / name
        if not path.is_file():
            continue
        try:
            import cv2

            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            rgb = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)[:, :, ::-1]
        except ImportError:
            from PIL import Image

            rgb = np.asarray(Image.open(path).convert("RGB").resize((width, height)))
        images.append(np.ascontiguousarray(rgb, dtype=np.uint8))
    return images


def make_batch(photos: list[np.ndarray], shape: tuple[int, int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    """n images: photos with a random flip and brightness shift (fresh every call), else noise."""
    if not photos:
        return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    out = np.empty((n, *shape), dtype=np.uint8)
    for i in range(n):
        img = photos[int(rng.integers(len(photos)))]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        shift = int(rng.integers(-20, 21))
        out[i] = np.clip(img.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    return out


def nvidia_smi() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ----------------------------------------------------------------------------- models
def write_torchvision(name: str, repo: Path, batch_max: int) -> Path:
    """A torchvision classifier with random weights as a repository model (float32 NCHW, ImageNet norm)."""
    import onnx
    import torch
    import torchvision

    directory = repo / name
    (directory / "1").mkdir(parents=True, exist_ok=True)
    net = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    path = directory / "1" / "model.onnx"
    try:
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    except Exception:
        batch = torch.export.Dim("N", min=1, max=max(batch_max, 64))
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
        )
    model = onnx.load(str(path))  # one file: weights inline (the engine loads bytes)
    for extra in directory.glob("1/*.data"):
        extra.unlink()
    onnx.save(model, str(path))
    (directory / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(1000)))
    (directory / "model.toml").write_text(
        f"""task = "classify"
labels = "labels.txt"
[input]
height = 224
width = 224
resize = "stretch"
color = "RGB"
layout = "NCHW"
dtype = "float32"
scale = {1 / 255!r}
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]
[thresholds]
confidence = 0.0
top_k = 5
[batching]
max_batch_size = {batch_max}
max_queue_delay_ms = 2.0
queue_limit = 256
"""
    )
    return directory


def resolve_model(args: argparse.Namespace, work: Path) -> Path:
    """The model directory (with model.toml) to check."""
    if args.torchvision:
        return write_torchvision(args.torchvision, work / "repo", max(args.batches))
    if args.model == "pixel-detector":
        from tests.models import write_pixel_detector

        return write_pixel_detector(work / "repo", "pixels", size=64, max_batch_size=max(args.batches))
    path = Path(args.model).resolve()
    for candidate in (path, *path.parents):
        if (candidate / "model.toml").is_file():
            return candidate
    raise SystemExit(f"{args.model}: no model.toml in it or above it")


# ----------------------------------------------------------------------------- comparisons
def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    g, r = got.astype(np.float64), ref.astype(np.float64)
    denom = float(np.linalg.norm(r))
    return float(np.linalg.norm(g - r)) / denom if denom else float(np.linalg.norm(g - r))


def iou(a: object, b: object) -> float:
    ax1, ay1, ax2, ay2 = a.x1, a.y1, a.x2, a.y2  # type: ignore[attr-defined]
    bx1, by1, bx2, by2 = b.x1, b.y1, b.x2, b.y2  # type: ignore[attr-defined]
    iw, ih = max(0.0, min(ax2, bx2) - max(ax1, bx1)), max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def compare(cfg: object, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], n: int) -> dict:
    """Per output: relative L2 error and max abs difference; per task: the decoded results."""
    from engine import heads

    report: dict = {"outputs": {}}
    for name, r in ref.items():
        g = got[name]
        report["outputs"][name] = {
            "shape_ok": g.shape == r.shape,
            "dtype_ok": g.dtype == r.dtype,
            "rel_l2": rel_l2(g, r) if g.shape == r.shape else None,
            "max_abs": float(np.max(np.abs(g.astype(np.float64) - r.astype(np.float64))))
            if g.shape == r.shape
            else None,
            "finite": bool(np.all(np.isfinite(g))) if g.dtype.kind == "f" else True,
        }
    shapes_ok = all(o["shape_ok"] and o["dtype_ok"] and o["finite"] for o in report["outputs"].values())
    task = cfg.task  # type: ignore[attr-defined]
    if task == "ssd":
        # Compare what a client sees: detections above a floor, matched by class and IoU.
        floor = 0.3
        params = [heads.Params(confidence=floor, max_detections=100)] * n
        dg, dr = heads.ssd(got, cfg, params), heads.ssd(ref, cfg, params)  # type: ignore[arg-type]
        total = matched = 0
        worst_score = 0.0
        count_diff = 0
        for a, b in zip(dg, dr, strict=True):
            firm = [d for d in b if d.score >= floor + 0.02]  # ignore ones at the floor (may flip)
            for d in firm:
                total += 1
                best = max((iou(d, e) for e in a if e.class_id == d.class_id), default=0.0)
                if best >= 0.9:
                    matched += 1
                    e = max((e for e in a if e.class_id == d.class_id), key=lambda e: iou(d, e))
                    worst_score = max(worst_score, abs(e.score - d.score))
            count_diff += abs(len(a) - len(b))
        report["detections"] = {
            "reference": total,
            "matched": matched,
            "count_diff": count_diff,
            "max_score_diff": worst_score,
            "labels": sorted({d.label for b in dr for d in b if d.score >= 0.5}),
        }
        report["ok"] = shapes_ok and matched == total
    elif task == "classify":
        key = cfg.outputs.get("logits") or next(iter(ref))  # type: ignore[attr-defined]
        top_g = np.argmax(got[key].reshape(n, -1), axis=1)
        top_r = np.argmax(ref[key].reshape(n, -1), axis=1)
        report["top1_agree"] = float(np.mean(top_g == top_r))
        err = report["outputs"][key]["rel_l2"]
        report["ok"] = shapes_ok and err is not None and err < 1e-2
    else:
        report["ok"] = shapes_ok and all((o["rel_l2"] or 0.0) < 1e-2 for o in report["outputs"].values())
    return report


# ----------------------------------------------------------------------------- timing
def throughput(fn: Callable[[np.ndarray], object], inputs: list[np.ndarray], seconds: float) -> dict:
    """Images/s and latency of ``fn`` over rotating inputs; the first call is timed on its own."""
    n = inputs[0].shape[0]
    t0 = time.perf_counter()
    fn(inputs[0])
    first_ms = (time.perf_counter() - t0) * 1000
    for i in range(3):
        fn(inputs[i % len(inputs)])
    lat = []
    start = time.perf_counter()
    i = 0
    while True:
        t = time.perf_counter()
        fn(inputs[i % len(inputs)])
        lat.append(time.perf_counter() - t)
        i += 1
        if time.perf_counter() - start >= seconds and i >= 5:
            break
    total = time.perf_counter() - start
    arr = np.array(lat) * 1000
    return {
        "images_per_s": n * i / total,
        "iterations": i,
        "first_ms": first_ms,
        "median_ms": float(np.median(arr)),
        "p90_ms": float(np.percentile(arr, 90)),
    }


# ----------------------------------------------------------------------------- engine end to end
def engine_check(
    model_dir: Path,
    version: int,
    shape: tuple[int, int, int],
    photos: list[np.ndarray],
    requests: int,
    inflight: int,
    providers: str,
    timeout: float,
) -> dict:
    import zmq

    from engine.launcher import wait_engine_ready
    from ipc import messages as m
    from ipc.ring import Ring
    from ipc.sockets import engine_address, make_socket

    run_dir = Path(tempfile.mkdtemp(prefix="rs-gpu-"))
    log_path = run_dir.with_suffix(".log")
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "engine",
        "--repo",
        str(model_dir.parent),
        "--run-dir",
        str(run_dir),
        "--models",
        model_dir.name,
        "--providers",
        providers,
    ]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    report: dict = {"command": " ".join(cmd[1:])}
    ctx = zmq.Context()
    sock = None
    ring = None
    try:
        address = engine_address(run_dir)
        ready = wait_engine_ready(address, proc, timeout)
        report["ready_s"] = time.monotonic() - started
        report["providers"] = list(ready.providers)
        report["models"] = [f"{i.name}/{i.version}" for i in ready.models]
        report["failed"] = dict(ready.failed)
        info = next(i for i in ready.models if i.name == model_dir.name)
        h, w, c = shape
        ring = Ring(inflight, h * w * c)
        sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False)
        sock.send(m.encode(m.Hello(pid=os.getpid(), ring=ring.name, slots=ring.slots, slot_bytes=ring.slot_bytes)))
        while True:
            if not sock.poll(10000):
                raise TimeoutError("no Ready for the ring")
            reply = m.decode(sock.recv())
            if isinstance(reply, m.Ready):
                break
        report["registered"] = reply.registered
        rng = np.random.default_rng(7)
        sent = done = 0
        results: list = []
        errors: Counter[str] = Counter()
        first_labels: list[str] = []
        t0 = time.perf_counter()
        while done < requests:
            while sent < requests and ring.in_use < inflight:
                slot, gen = ring.acquire()
                image = photos[0] if sent == 0 and photos else make_batch(photos, shape, 1, rng)[0]
                ring.view(slot, shape)[...] = image
                sock.send(
                    m.encode(
                        m.Infer(
                            req_id=f"gpu-{sent}",
                            model=info.name,
                            version=version,
                            slot=slot,
                            generation=gen,
                            height=h,
                            width=w,
                            deadline=time.time() + 30,
                        )
                    )
                )
                sent += 1
            if not sock.poll(30000):
                raise TimeoutError(f"no answer from the engine after {done} of {requests}")
            for reply in m.unpack(m.decode(sock.recv())):
                if isinstance(reply, (m.Result, m.Error)):
                    ring.release(reply.slot, reply.generation)
                    done += 1
                    if isinstance(reply, m.Result):
                        results.append(reply)
                        if reply.req_id == "gpu-0":
                            first_labels = [d.label for d in reply.detections] + [c.label for c in reply.classes]
                    else:
                        errors[reply.reason] += 1
        elapsed = time.perf_counter() - t0
        sizes = Counter(r.batch_size for r in results)
        report.update(
            {
                "requests": requests,
                "inflight": inflight,
                "results": len(results),
                "errors": dict(errors),
                "images_per_s": requests / elapsed,
                "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
                "inference_ms_median": float(np.median([r.inference_ms for r in results])) if results else None,
                "queue_ms_median": float(np.median([r.queue_ms for r in results])) if results else None,
                "first_image_results": first_labels,
            }
        )
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if sock is not None:
            sock.close()
        ctx.term()
        if ring is not None:
            ring.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        report["returncode"] = proc.returncode
        text = log_path.read_text(errors="replace")
        lines = text.splitlines()
        noisy = [ln for ln in lines if any(k in ln for k in ("ERROR", "EP Error", "CUDA failure", "[E:", "[W:"))]
        report["log_lines"] = len(lines)
        report["log_noise"] = noisy[:20]
        report["log_head"] = lines[:12]
        log_path.unlink(missing_ok=True)
        report["socket_left"] = (run_dir / "engine.sock").exists()
    report["ok"] = (
        report.get("results") == requests
        and report.get("returncode") == 0
        and bool(report.get("providers"))
        and not report.get("error")
    )
    return report


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model",
        default="pixel-detector",
        help="model directory (model.toml) or a file in it; 'pixel-detector' for the tests' tiny model",
    )
    p.add_argument("--torchvision", default="", help="export this torchvision classifier (random weights) instead")
    p.add_argument("--version", type=int, default=0, help="model version (default: the latest)")
    p.add_argument("--providers", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--batches", default="1,4,8", help="batch sizes to check and time")
    p.add_argument("--trials", type=int, default=3, help="fresh inputs per batch size for the comparison")
    p.add_argument("--seconds", type=float, default=2.0, help="timing loop per (mode, batch size)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: one per core, like the engine)")
    p.add_argument(
        "--preload-dlls",
        action="store_true",
        help="call onnxruntime.preload_dlls() first (CUDA/cuDNN from nvidia-* pip packages)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=0,
        help="CUDA: pad every batch to this size, as the engine does (default: the model's max_batch_size)",
    )
    p.add_argument("--engine", action="store_true", help="also run the engine process end to end")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--json", type=Path, default=ROOT / "loadtests" / "results" / "gpu_check.json")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]

    import onnxruntime as ort
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.preload_dlls:
        ort.preload_dlls()
    from engine.graph import prepare
    from engine.repository import load_config
    from engine.session import CPU, CUDA, OrtSession, choose_providers, default_threads, gpu_present, quiet_ort

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    model_dir = resolve_model(args, work)
    cfg = load_config(model_dir)
    version = args.version or max(cfg.versions)
    shape = (cfg.input.height, cfg.input.width, 3)
    threads = args.threads or default_threads()
    from onnxruntime.capi import build_and_package_info as build

    report: dict = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "python": platform.python_version(),
            "cores": default_threads(),
            "gpu": nvidia_smi(),
            "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
        },
        "onnxruntime": {
            "version": ort.__version__,
            "file": ort.__file__,
            "build_cuda": getattr(build, "cuda_version", ""),
            "available_providers": ort.get_available_providers(),
        },
        "gpu_present": gpu_present(),
        "choose_providers": choose_providers(args.providers),
        "model": {
            "name": cfg.name,
            "version": version,
            "task": cfg.task,
            "input": list(shape),
            "path": str(cfg.onnx_path(version)),
        },
        "threads": threads,
        "max_batch": args.max_batch or cfg.max_batch_size,
    }
    step(f"model {cfg.name}/{version}, providers {report['choose_providers']}")
    quiet_ort()  # as the engine does
    model_bytes = prepare(cfg, cfg.onnx_path(version))
    providers = report["choose_providers"]
    with capture_fds() as noise:
        t = time.perf_counter()
        # max_batch: on CUDA every batch is padded to one shape, the model's max_batch_size (engine/session.py)
        gpu = OrtSession(model_bytes, "", providers, threads, max_batch=args.max_batch or cfg.max_batch_size)
        create_s = time.perf_counter() - t
    report["session"] = {
        "providers": gpu.providers,
        "create_s": create_s,
        "output_names": gpu.output_names,
        "noise_at_create": noise.text.strip().splitlines()[:20],
    }
    cuda = gpu.providers[0] == CUDA
    t = time.perf_counter()
    cpu = OrtSession(model_bytes, "", [CPU], threads)
    report["cpu_session_create_s"] = time.perf_counter() - t
    step(f"sessions: {gpu.providers} in {create_s:.2f}s, CPU in {report['cpu_session_create_s']:.2f}s")

    photos = load_photos(*shape[:2])
    report["inputs"] = f"{len(photos)} photos (flipped, brightness-shifted)" if photos else "uniform noise"
    rng = np.random.default_rng(1234)

    # ---- correctness: IOBinding path vs CPU provider, fresh inputs through the same device buffer
    report["correctness"] = {}
    first_run_noise: list[str] = []
    for n in args.batches:
        trials = []
        for k in range(args.trials):
            x = make_batch(photos, shape, n, rng)
            with capture_fds() as noise:
                got = gpu.run(x)
            if noise.text.strip():
                first_run_noise.extend(noise.text.strip().splitlines()[:10])
            ref = cpu.run(x)
            trials.append(compare(cfg, got, ref, n) | {"trial": k})
        worst = {name: max(t["outputs"][name]["rel_l2"] or 0.0 for t in trials) for name in gpu.output_names}
        entry = {"ok": all(t["ok"] for t in trials), "worst_rel_l2": worst, "trials": trials}
        report["correctness"][str(n)] = entry
        step(f"batch {n}: same as CPU: {entry['ok']}, worst rel-L2 {max(worst.values()):.1e}")
    report["session"]["noise_at_run"] = first_run_noise[:20]

    # ---- throughput
    modes: dict[str, Callable[[np.ndarray], object]] = {}
    if cuda:
        modes["cuda_ortsession"] = gpu.run  # the engine's path: IOBinding, padded to max_batch
        sess = gpu._session  # a plain run of the same CUDA session, numpy in and out
        modes["cuda_plain_run"] = lambda x: sess.run(gpu.output_names, {gpu.input_name: x})
    modes["cpu"] = cpu.run
    report["throughput"] = {}
    for n in args.batches:
        inputs = [make_batch(photos, shape, n, rng) for _ in range(3)]
        report["throughput"][str(n)] = {name: throughput(fn, inputs, args.seconds) for name, fn in modes.items()}
        row = report["throughput"][str(n)]
        step(f"batch {n}: " + ", ".join(f"{k} {v['images_per_s']:.1f}/s" for k, v in row.items()))

    if cuda:  # per-call time while the batch size changes: padded (engine) vs exact shapes (plain run)
        seq = [b for b in (1, 4, 1, 4, 2, 3, 1, 2, 4, 1) if b <= report["max_batch"]]
        switch: dict = {"sequence": seq, "ortsession_ms": [], "plain_exact_shape_ms": []}
        for key, fn in (("ortsession_ms", modes["cuda_ortsession"]), ("plain_exact_shape_ms", modes["cuda_plain_run"])):
            for b in seq:
                x = make_batch(photos, shape, b, rng)
                t = time.perf_counter()
                fn(x)
                switch[key].append(round((time.perf_counter() - t) * 1000, 1))
        report["shape_switch"] = switch
        step(
            f"batch sizes {seq}: OrtSession.run ms {switch['ortsession_ms']}, "
            f"plain run at exact shapes ms {switch['plain_exact_shape_ms']}"
        )

    if args.engine:
        step("engine end to end")
        report["engine"] = engine_check(
            model_dir, version, shape, photos, args.requests, args.inflight, args.providers, timeout=180
        )

    report["ok"] = all(e["ok"] for e in report["correctness"].values()) and (not args.engine or report["engine"]["ok"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_table(report, cuda)
    return 0 if report["ok"] else 1


def print_table(r: dict, cuda: bool) -> None:
    print(f"\nonnxruntime {r['onnxruntime']['version']} ({r['onnxruntime']['file']})")
    print(
        f"available: {r['onnxruntime']['available_providers']}  gpu_present: {r['gpu_present']}  "
        f"gpu: {r['host']['gpu'] or '-'}"
    )
    print(
        f"choose_providers(): {r['choose_providers']}  session: {r['session']['providers']}  "
        f"created in {r['session']['create_s']:.2f}s"
    )
    noise = r["session"]["noise_at_create"] + r["session"]["noise_at_run"]
    print(f"ORT output at create/run: {len(noise)} lines" + (f": {noise[0][:150]}" if noise else ""))
    print(
        f"model {r['model']['name']}/{r['model']['version']} ({r['model']['task']}) input {r['model']['input']}, "
        f"inputs: {r['inputs']}, {r['threads']} threads"
    )
    print("\nbatch  same-as-CPU  worst rel-L2 per output")
    for n, e in r["correctness"].items():
        worst = ", ".join(f"{k}={v:.1e}" for k, v in e["worst_rel_l2"].items())
        det = e["trials"][0].get("detections")
        extra = (
            f"  detections matched {sum(t['detections']['matched'] for t in e['trials'])}/"
            f"{sum(t['detections']['reference'] for t in e['trials'])}"
            if det
            else ""
        )
        print(f"{n:>5}  {'yes' if e['ok'] else 'NO':<11}  {worst}{extra}")
    modes = list(next(iter(r["throughput"].values())))
    print("\nimages/s (median ms per batch; first call ms)")
    print("batch  " + "  ".join(f"{m:>28}" for m in modes))
    for n, row in r["throughput"].items():
        cells = [
            f"{row[m]['images_per_s']:8.1f} ({row[m]['median_ms']:6.2f}; {row[m]['first_ms']:7.1f})" for m in modes
        ]
        print(f"{n:>5}  " + "  ".join(f"{c:>28}" for c in cells))
    if "engine" in r:
        e = r["engine"]
        print(
            f"\nengine: ok={e['ok']} providers={e.get('providers')} ready in {e.get('ready_s', 0):.1f}s, "
            f"{e.get('results')}/{e.get('requests')} results, errors {e.get('errors')}, "
            f"{e.get('images_per_s', 0):.1f} images/s with {e.get('inflight')} in flight, "
            f"batch sizes {e.get('batch_sizes')}, inference median {e.get('inference_ms_median')} ms, "
            f"first image: {e.get('first_image_results')}, exit {e.get('returncode')}, "
            f"log noise {len(e.get('log_noise', []))} lines" + (f", error: {e['error']}" if e.get("error") else "")
        )
    print(f"\nOK: {r['ok']}")


if __name__ == "__main__":
    sys.exit(main())
