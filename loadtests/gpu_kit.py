"""Issue 15's point 6 on a lent GPU box that has no network: what travels, and the one measuring call.

The device machine (loadtests: the ``device`` tool) runs Python 3.12 with PyTorch, CUDA 13 and
cuDNN 9, but has neither onnxruntime-gpu (its wheel alone is 244 MiB) nor most of ringserve's
dependencies, nothing can be fetched there, and one call carries at most 64 MiB. So the wheels
and the two models go in a tar split into parts, shipped one part per call to one warm machine
(it stays warm 30 s after a call), and the last call assembles them and measures::

    python -m loadtests.gpu_kit prepare                     # here: .gpukit/part-NN, .gpukit/kit.json
    # device `run`, one per part, each within 30 s of the last (the tool prints them all):
    #   carry [".gpukit/part-00"], command "mkdir -p /tmp/kit && cp .gpukit/part-* /tmp/kit/"
    # the last call carries the last part and kit.json and runs
    #   python3 -m loadtests.gpu_kit measure --kit /tmp/kit --out $OUT

``measure`` verifies and unpacks the kit, installs the wheels into a folder of their own (put
first on PYTHONPATH for the children), points models/ at the two models, then runs, each writing
into ``--out/results.tar.gz`` as it ends (a call that runs past its limit still brings back what
was done; the device tool brings back at most 8 files):

1. ``loadtests.gpu_check`` for EfficientNet-Lite0 and the SSD at batch 1, 8 and 32 with
   ``--engine``: providers, IOBinding against the CPU provider, bare ONNX Runtime CUDA images/s,
   the engine end to end from one synthetic worker;
2. ``loadtests.bench --targets ringserve`` at each of ``--workers`` (2, 4, 8, 12) on both models,
   c = 64, 10 s: the whole appliance over HTTP;
3. ``--out/point6.json``: per model, the HTTP req/s per worker count, and the best of them against
   bare ORT-CUDA images/s at the best batch (the goal: >= 0.8x) and at the batches the engine runs
   (up to the model's max_batch_size).

``measure --providers cpu --workers 1,2 --quick`` runs the same steps on a box without a GPU (the
dry run of the kit, here with python3.12).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("efficientnet-lite0", "ssd-mobilenet-v2-coco")
WORKLOADS = {"efficientnet-lite0": "lite0", "ssd-mobilenet-v2-coco": "ssd"}
PART_MIB = 60  # a call carries at most 64 MiB, the repository's own files included
# Large, and on the device image already (its KINDS.md list), with a stable ABI: not carried. The
# rest is carried even where the image has a copy: gRPC, protobuf and their generated code must agree.
ON_THE_IMAGE = frozenset({"numpy", "opencv-python-headless", "pillow", "psutil", "onnx", "ml-dtypes"})
PY = ("--python-version", "3.12", "--implementation", "cp", "--abi", "cp312")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


# ----------------------------------------------------------------------------- here
def requirements() -> list[str]:
    """ringserve's runtime dependencies, as pyproject.toml pins them, and the benchmark's httpx."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for r in project["optional-dependencies"]["dev"] if r.startswith("httpx"))]


def download_wheels(dest: Path) -> list[Path]:
    """Every runtime dependency and its own, as cp312 manylinux wheels, less what the image has."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *PY, "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run([*cmd, *requirements()], check=True)
    kept = []
    for wheel in sorted(dest.glob("*.whl")):
        if _dist(wheel.name) in ON_THE_IMAGE:
            wheel.unlink()
        else:
            kept.append(wheel)
    return kept


def _dist(wheel_name: str) -> str:
    return wheel_name.split("-")[0].lower().replace("_", "-")


def split(tar: Path, out: Path, part_bytes: int) -> tuple[list[Path], str]:
    """``tar`` in parts of ``part_bytes`` (part-00, part-01, ...) in ``out``, and its sha256."""
    parts, digest = [], hashlib.sha256()
    with tar.open("rb") as f:
        while chunk := f.read(part_bytes):
            digest.update(chunk)
            part = out / f"part-{len(parts):02d}"
            part.write_bytes(chunk)
            parts.append(part)
    return parts, digest.hexdigest()


def join(parts: list[Path], tar: Path) -> str:
    """The parts, in order, into ``tar``; its sha256."""
    digest = hashlib.sha256()
    with tar.open("wb") as f:
        for part in parts:
            chunk = part.read_bytes()
            digest.update(chunk)
            f.write(chunk)
    return digest.hexdigest()


def prepare(out: Path, part_mib: int, models_dir: Path) -> dict[str, Any]:
    if out.exists():
        shutil.rmtree(out)
    staging = out / "staging"
    wheels = download_wheels(staging / "wheels")
    tar = out / "kit.tar"
    with tarfile.open(tar, "w") as t:
        for wheel in wheels:
            t.add(wheel, f"wheels/{wheel.name}")
        for name in MODELS:
            src = models_dir / name
            if not (src / "model.toml").is_file():
                raise SystemExit(f"{src} is missing: run `ringserve models pull {name}` first")
            t.add(src, f"models/{name}")
    parts, digest = split(tar, out, part_mib << 20)
    kit = {
        "sha256": digest,
        "bytes": tar.stat().st_size,
        "parts": [p.name for p in parts],
        "wheels": [w.name for w in wheels],
        "models": list(MODELS),
    }
    tar.unlink()
    shutil.rmtree(staging)
    (out / "kit.json").write_text(json.dumps(kit, indent=2) + "\n")
    return kit


def device_calls(kit: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """The device tool's calls, in order: one per part, the last one measuring."""
    rel = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    calls: list[dict[str, Any]] = []
    for i, part in enumerate(kit["parts"]):
        last = i == len(kit["parts"]) - 1
        carry = [f"{rel}/{part}"] + ([f"{rel}/kit.json"] if last else [])
        command = f"mkdir -p /tmp/kit && cp {rel}/part-* /tmp/kit/"
        if last:
            command += f" && cp {rel}/kit.json /tmp/kit/ && PYTHONUNBUFFERED=1 python3 -m loadtests.gpu_kit measure"
            command += " --kit /tmp/kit --out $OUT 2>&1 | tee $OUT/measure.log"
        calls.append({"carry": carry, "command": command, "timeout_s": 600 if last else 120})
    return calls


# ----------------------------------------------------------------------------- there
def unpack(kit_dir: Path, work: Path) -> dict[str, Any]:
    kit = json.loads((kit_dir / "kit.json").read_text())
    parts = [kit_dir / p for p in kit["parts"]]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise SystemExit(f"parts missing from {kit_dir}: {missing} (the machine went back between calls?)")
    work.mkdir(parents=True, exist_ok=True)
    tar = work / "kit.tar"
    if join(parts, tar) != kit["sha256"]:
        tar.unlink()
        raise SystemExit("the kit's parts do not add up to the tar that was split (sha256 differs)")
    with tarfile.open(tar) as t:
        t.extractall(work, filter="data")
    tar.unlink()
    return kit


def install(wheels: Path, site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    subprocess.run([*cmd, "--upgrade", "--target", str(site), *map(str, sorted(wheels.glob("*.whl")))], check=True)


def link_models(extracted: Path) -> None:
    """models/<name> -> the kit's copy, unless the checkout has the model already."""
    (ROOT / "models").mkdir(exist_ok=True)
    for name in MODELS:
        dest = ROOT / "models" / name
        if not dest.exists():
            dest.symlink_to(extracted / name, target_is_directory=True)


def _run(step: str, cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
    print(f"[{time.strftime('%H:%M:%S')}] {step}: {' '.join(cmd[2:])}", flush=True)
    with log.open("w") as f:
        try:
            return subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            print(f"  {step} ran past {timeout:.0f}s", flush=True)
            return 124


def cuda_library_dirs() -> list[str]:
    """The library folders of this interpreter's nvidia-* pip packages (the device image's CUDA 13
    and cuDNN 9, beside PyTorch): onnxruntime-gpu finds them on LD_LIBRARY_PATH, which the engine
    and gpu_check inherit."""
    import site

    found: list[str] = []
    for packages in site.getsitepackages():
        for pattern in ("nvidia/*/lib", "nvidia/*/*/lib"):
            found += sorted(str(d) for d in Path(packages).glob(pattern) if any(d.glob("*.so*")))
    return found


def _prepend(env: dict[str, str], key: str, folders: list[str]) -> None:
    env[key] = os.pathsep.join([*folders, *([env[key]] if env.get(key) else [])])


def bundle(steps: Path, out: Path) -> None:
    """Every step's files in one archive: the device tool brings back at most 8 files."""
    tmp = out / "results.tar.gz.part"
    with tarfile.open(tmp, "w:gz") as t:
        t.add(steps, "results")
    tmp.replace(out / "results.tar.gz")


def measure(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    steps = Path(tempfile.mkdtemp(prefix="gpu-kit-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.kit is not None:
        work = args.kit / "unpacked"
        kit = unpack(args.kit, work)
        install(work / "wheels", work / "site")
        link_models(work / "models")
        _prepend(env, "PYTHONPATH", [str(work / "site"), str(ROOT)])
        print(f"kit: {len(kit['wheels'])} wheels, models {kit['models']}", flush=True)
    libs = cuda_library_dirs()
    if libs:
        _prepend(env, "LD_LIBRARY_PATH", libs)
        print(f"CUDA libraries: {len(libs)} folders of nvidia-* packages on LD_LIBRARY_PATH", flush=True)
    py = [sys.executable, "-m"]
    seconds = ["--seconds", "2" if args.quick else "10", "--warmup", "1" if args.quick else "2"]
    codes: dict[str, int] = {}
    for name in MODELS:
        w = WORKLOADS[name]
        gpu = [*py, "loadtests.gpu_check", "--model", f"models/{name}", "--batches", args.batches]
        gpu += ["--providers", args.providers, "--max-batch", str(max(int(b) for b in args.batches.split(",")))]
        gpu += ["--engine", "--seconds", "1" if args.quick else "2", "--json", str(steps / f"gpu-{w}.json")]
        codes[f"gpu-{w}"] = _run(f"bare ORT and the engine, {name}", gpu, env, steps / f"gpu-{w}.log", 240)
        bundle(steps, out)
    for name in MODELS:
        w = WORKLOADS[name]
        for workers in args.workers.split(","):
            key = f"http-{w}-w{workers}"
            bench = [*py, "loadtests.bench", "--workload", w, "--workers", workers, "--targets", "ringserve"]
            bench += ["--concurrency", args.concurrency, *seconds, "--control-s", "0", "--hop-n", "200"]
            codes[key] = _run(
                f"HTTP, {name}, {workers} workers", [*bench, "--out", str(steps / key)], env, steps / f"{key}.log", 180
            )
            bundle(steps, out)
    summary = summarise(steps, args.workers.split(","))
    summary["exit_codes"] = codes
    summary["ld_library_path"] = env.get("LD_LIBRARY_PATH", "")
    (out / "point6.json").write_text(json.dumps(summary, indent=2) + "\n")
    bundle(steps, out)
    print(json.dumps(summary, indent=2), flush=True)
    return 0 if all(c == 0 for c in codes.values()) else 1


def max_batch_size(model_dir: Path) -> int:
    """From model.toml with tomllib: this process runs on the image's Python, without the kit's
    packages that engine.repository needs (only the children get them)."""
    import tomllib

    return int(tomllib.loads((model_dir / "model.toml").read_text())["batching"]["max_batch_size"])


def summarise(steps: Path, workers: list[str], models_dir: Path = ROOT / "models") -> dict[str, Any]:
    """Per model: bare ORT images/s per batch, and the best HTTP req/s (over worker counts and
    concurrencies) against bare ORT at the best batch and at the batch the engine runs."""
    summary: dict[str, Any] = {}
    for name in MODELS:
        w = WORKLOADS[name]
        entry: dict[str, Any] = {"engine_batch": max_batch_size(models_dir / name)}
        gpu_json = steps / f"gpu-{w}.json"
        if gpu_json.is_file():
            g = json.loads(gpu_json.read_text())
            mode = "cuda_plain_run" if g["session"]["providers"][0].startswith("CUDA") else "cpu"
            entry["providers"] = g["session"]["providers"]
            entry["bare_mode"] = mode
            entry["bare_images_per_s"] = {b: round(row[mode]["images_per_s"], 1) for b, row in g["throughput"].items()}
            entry["engine_one_worker_images_per_s"] = g.get("engine", {}).get("images_per_s")
        http: dict[str, dict[str, float]] = {}
        for n in workers:
            bench_json = steps / f"http-{w}-w{n}" / f"bench-{w}.json"
            if bench_json.is_file():
                b = json.loads(bench_json.read_text())
                target = next(t for t in b["targets"] if t["key"] == "ringserve")
                http[n] = {str(p["concurrency"]): round(p["rps"], 1) for p in target["points"]}
        entry["http_rps"] = http
        bare = entry.get("bare_images_per_s", {})
        best_http = max((rps for points in http.values() for rps in points.values()), default=0.0)
        if best_http and bare:
            at_engine = [v for b, v in bare.items() if int(b) <= entry["engine_batch"]]
            ratio = best_http / max(bare.values())
            entry["best_http_rps"] = best_http
            entry["ratio_to_bare_best_batch"] = round(ratio, 3)
            if at_engine:
                entry["ratio_to_bare_at_engine_batch"] = round(best_http / max(at_engine), 3)
            entry["goal_0_8x_of_bare_best_met"] = ratio >= 0.8
        summary[name] = entry
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.gpu_kit", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("prepare", help="here: download the wheels, pack them with the models, split")
    pre.add_argument("--out", type=Path, default=ROOT / ".gpukit")
    pre.add_argument("--part-mib", type=int, default=PART_MIB)
    pre.add_argument("--models-dir", type=Path, default=ROOT / "models")
    mea = sub.add_parser("measure", help="there: unpack the kit (--kit), install, measure into --out")
    mea.add_argument("--kit", type=Path, help="the folder holding the parts and kit.json (none: use this environment)")
    mea.add_argument("--out", type=Path, required=True)
    mea.add_argument("--workers", default="2,4,8,12")
    mea.add_argument("--concurrency", default="64")
    mea.add_argument("--batches", default="1,8,32")
    mea.add_argument("--providers", choices=("auto", "cuda", "cpu"), default="auto")
    mea.add_argument("--quick", action="store_true", help="short points: a dry run of the kit")
    args = p.parse_args(argv)
    if args.cmd == "prepare":
        kit = prepare(args.out, args.part_mib, args.models_dir)
        mib = kit["bytes"] / 2**20
        print(f"{len(kit['parts'])} parts, {mib:.0f} MiB, {len(kit['wheels'])} wheels, sha256 {kit['sha256'][:16]}")
        print("device calls, in order, each within 30 s of the last (one warm machine):")
        for call in device_calls(kit, args.out):
            print(json.dumps(call))
        return 0
    return measure(args)


if __name__ == "__main__":
    sys.exit(main())
