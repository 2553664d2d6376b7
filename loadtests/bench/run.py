"""Run the benchmark: every target one after another (in ``--targets`` order), on the same model,
photos and client.

    python -m loadtests.bench [--workload ssd|lite0|light] [--workers W] [--rounds 2] [--quick]

(a) ringserve with W HTTP workers; (b) the common FastAPI pattern in one process with ONNX
Runtime's default session options and tuned (one intra-op thread, and one per core); (c) the same
app with ``uvicorn --workers W``; (d) the ceiling, decode + resize + inference in a loop with no
HTTP. Each HTTP target gets a warm-up and
then ``--seconds`` of closed-loop load per concurrency from one light client process; its whole
process tree is sampled for PSS, RSS and CPU. The defaults are issue 15's measure: 640x480 JPEG
multipart, 15 s per point; ``--sizes`` adds larger photos to the mix. ``--rounds R`` measures every
target R times, the order reversed on every other round, and reports the means (rounds.py). Writes
loadtests/results/bench-<workload>.{json,md,png} and prints the Markdown.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import payloads as photos
from loadtests.bench import ceiling, report, rounds, targets
from loadtests.bench.client import check
from loadtests.bench.sampler import TreeSampler
from loadtests.bench.workloads import ROOT, Workload, make

HTTP_TARGETS = ("ringserve", "b-default", "b-1thread", "b-tuned", "c")
# The run order: ringserve between the two it is measured against (the better FastAPI server is
# most often (b) with one thread), so that each goal's ratio compares two measures a minute apart;
# this box's speed drifts by 10-20 % within minutes (see rounds.py).
ALL_TARGETS = ("b-1thread", "ringserve", "ceiling", "b-tuned", "c", "b-default")
# Issue 15's measure: 640x480 JPEG multipart, 15 s per point.
SIZES = "640x480"
SECONDS = 15.0
RESULTS = ROOT / "loadtests" / "results"
START_ALLOWANCE_S = 12.0  # per target: start, readiness, priming (for the time estimate only)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workload", choices=("ssd", "lite0", "light"), default="ssd")
    p.add_argument("--workers", type=int, default=targets.cores(), help="W for (a) and (c); default: cores")
    p.add_argument("--concurrency", default=None, help="comma-separated client concurrencies (default 1,16,64)")
    p.add_argument("--seconds", type=float, default=None, help=f"measured seconds per point (default {SECONDS:g})")
    p.add_argument("--warmup", type=float, default=None, help="warm-up seconds before each point (default 2)")
    p.add_argument("--targets", default=",".join(ALL_TARGETS), help=f"subset of {','.join(ALL_TARGETS)}")
    p.add_argument("--sizes", default=SIZES, help="photo sizes of the payload mix, e.g. 640x480,1280x720,1920x1080")
    p.add_argument("--rounds", type=int, default=1, help="measure every target this many times (default 1)")
    p.add_argument("--hop-n", type=int, default=None, help="round trips of the IPC hop measure (default 2000)")
    p.add_argument(
        "--control-s", type=float, default=None, help="seconds of the control-plane measure (default 5; 0: skip)"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s points, concurrency 1,16")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    quick = args.quick
    args.concurrency = [int(c) for c in (args.concurrency or ("1,16" if quick else "1,16,64")).split(",")]
    args.seconds = args.seconds if args.seconds is not None else (2.0 if quick else SECONDS)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 2.0)
    args.hop_n = args.hop_n if args.hop_n is not None else (300 if quick else 2000)
    args.control_s = args.control_s if args.control_s is not None else (1.0 if quick else 5.0)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def estimate_s(args: argparse.Namespace) -> float:
    point = args.warmup + args.seconds + 1.5
    http = sum(t in HTTP_TARGETS for t in args.targets) * (START_ALLOWANCE_S + len(args.concurrency) * point)
    ceil = len(ceiling.CONFIGS) * (point + 5) if "ceiling" in args.targets else 0
    return (http + ceil) * args.rounds + 10 + (args.control_s + 10 if args.control_s > 0 else 0)


def write_payloads(scratch: Path, sizes: str) -> list[dict[str, str]]:
    index = []
    for i, p in enumerate(photos.build(sizes=photos.parse_sizes(sizes))):
        path = scratch / "payloads" / f"{i:02d}-{p.name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(p.jpeg)
        index.append({"file": str(path), "name": p.name, "expect": p.expect or "", "bytes": str(len(p.jpeg))})
    (scratch / "payloads.json").write_text(json.dumps(index))
    return index


def prime(target: targets.Target, workload: Workload, index: list[dict[str, str]]) -> None:
    """One request per payload, checked, before any load: a wrong answer stops this target early."""
    expect_labels = workload.task == "ssd"
    with httpx.Client(timeout=60) as http:
        for p in index:
            r = http.post(
                f"{target.url}/api/v1/predict",
                files={"image": (f"{p['name']}.jpg", Path(p["file"]).read_bytes(), "image/jpeg")},
            )
            why = (
                str(r.status_code)
                if r.status_code != 200
                else check(r.content, workload.answer_key, p["expect"] if expect_labels else "")
            )
            if why:
                raise RuntimeError(f"{target.key} answered {p['name']} wrongly ({why}): {r.text[:300]}")


def load_point(
    target: targets.Target, workload: Workload, index: list[dict[str, str]], concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    spec = {
        "host": "127.0.0.1",
        "port": target.port,
        "path": "/api/v1/predict",
        "payloads": [
            {"file": p["file"], "name": p["name"], "expect": p["expect"] if workload.task == "ssd" else ""}
            for p in index
        ],
        "concurrency": concurrency,
        "warmup": args.warmup,
        "seconds": args.seconds,
        "answer_key": workload.answer_key,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.bench.client"],
        input=json.dumps(spec),
        text=True,
        capture_output=True,
        cwd=ROOT,
        timeout=args.warmup + args.seconds + 90,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the client failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_target(
    key: str, workload: Workload, index: list[dict[str, str]], scratch: Path, args: argparse.Namespace
) -> dict[str, Any]:
    if key == "ceiling":
        return run_ceiling(workload, scratch, args)
    if key == "ringserve":
        return run_http(targets.ringserve(workload, args.workers), workload, index, args)
    return run_http(targets.baseline(workload, key, args.workers), workload, index, args)


def run_http(
    target: targets.Target, workload: Workload, index: list[dict[str, str]], args: argparse.Namespace
) -> dict[str, Any]:
    result: dict[str, Any] = {"key": target.key, "label": target.label, "points": []}
    try:
        started = time.monotonic()
        target.start()
        result["start_s"] = round(time.monotonic() - started, 2)
        prime(target, workload, index)
        with TreeSampler(target.roots) as sampler:
            for c in args.concurrency:
                point = load_point(target, workload, index, c, args)
                point["server_cpu"] = sampler.cores(*point.pop("window"))
                result["points"].append(point)
                log(
                    f"  {target.key:<10} c={c:<3} {point['rps']:7.1f} req/s  p50 {point['p50_ms']:7.1f} ms  "
                    f"p99 {point['p99_ms']:7.1f} ms  errors {point['errors']}  "
                    f"server CPU {point['server_cpu']:.2f}  client CPU {point['client_cpu']:.2f}"
                )
        result["memory"] = sampler.memory()
    except (RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        result["error"] = str(exc)[-3000:]
        log(f"  {target.key}: FAILED: {str(exc)[-600:]}")
    finally:
        target.stop()
    return result


def run_ceiling(workload: Workload, scratch: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = targets.cores()
    configs = []
    for config in ceiling.CONFIGS:
        nproc, loops, intra = ceiling.layout(config, n)
        cmd = [
            sys.executable,
            "-m",
            "loadtests.bench.ceiling",
            "--model-dir",
            str(workload.directory),
            "--payloads",
            str(scratch / "payloads.json"),
            "--threads",
            str(loops),
            "--intra",
            str(intra),
            "--warmup",
            str(args.warmup),
            "--seconds",
            str(args.seconds),
        ]
        procs = [
            subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(nproc)
        ]
        entry: dict[str, Any] = {"config": config, "processes": nproc, "loop_threads": loops, "intra_threads": intra}
        try:
            if any(p.stdout.readline().strip() != "ready" for p in procs):  # type: ignore[union-attr]
                raise RuntimeError("a ceiling runner failed to start")
            with TreeSampler(functools.partial(list, [p.pid for p in procs])) as sampler:
                for p in procs:
                    p.stdin.write("go\n")  # type: ignore[union-attr]
                    p.stdin.flush()  # type: ignore[union-attr]
                outs = [json.loads(p.communicate(timeout=args.warmup + args.seconds + 60)[0]) for p in procs]
            window = outs[0]["window"]
            lat = sorted(x * 1000 for o in outs for x in o["latencies_s"])
            entry.update(report.latency_summary(lat, args.seconds))
            entry["server_cpu"] = sampler.cores(*window)
            entry["memory"] = sampler.memory()
        except (RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            entry["error"] = str(exc)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        configs.append(entry)
        if "error" in entry:
            log(f"  ceiling {config}: FAILED: {entry['error']}")
        else:
            log(
                f"  ceiling {config:<8} {entry['rps']:7.1f} img/s  p50 {entry['p50_ms']:7.1f} ms  "
                f"CPU {entry['server_cpu']:.2f}  PSS {entry['memory']['pss_mb']:.0f} MB"
            )
    ok = [c for c in configs if "error" not in c]
    best = max(ok, key=lambda c: c["rps"]) if ok else None
    return {
        "key": "ceiling",
        "label": f"(d) ceiling, no HTTP: {best['config'] if best else '-'}",
        "configs": configs,
        "best": best,
    }


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="rs-bench-"))
    began = time.time()
    try:
        workload = make(args.workload, scratch)
        log(
            f"benchmark {args.workload}: targets {','.join(args.targets)}, W={args.workers}, "
            f"concurrency {args.concurrency}, {args.seconds:g} s per point, {args.rounds} round(s); "
            f"about {estimate_s(args) / 60:.1f} min"
        )
        machine = report.machine()
        if machine["load_1m"] > 0.25 * machine["cores"]:
            log(
                f"WARNING: load average {machine['load_1m']:.1f} on {machine['cores']} cores: the figures are disturbed"
            )
        index = write_payloads(scratch, args.sizes)
        results: dict[str, Any] = {
            "workload": args.workload,
            "model": workload.model,
            "task": workload.task,
            "input": f"{workload.width}x{workload.height}",
            "machine": machine,
            "settings": {
                "workers": args.workers,
                "concurrency": args.concurrency,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "quick": args.quick,
                "sizes": args.sizes,
                "rounds": args.rounds,
                "payloads": [{"name": p["name"], "bytes": int(p["bytes"])} for p in index],
            },
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(began)),
        }
        results["ipc_hop"] = ipc_hop(args.hop_n)
        results["control_plane"] = control_plane(args.control_s)
        measured: dict[str, list[dict[str, Any]]] = {key: [] for key in args.targets}
        for r in range(args.rounds):
            if args.rounds > 1:
                log(f"round {r + 1} of {args.rounds}")
            for key in rounds.order(args.targets, r):
                measured[key].append(run_target(key, workload, index, scratch, args))
        results["targets"] = [rounds.merge(measured[key]) for key in args.targets]
        results["machine"]["load_1m_end"] = report.machine()["load_1m"]
        results["duration_s"] = round(time.time() - began, 1)
        report.analyse(results)
        # another payload than issue 15's is another benchmark: its files sit beside, not over, these
        stem = f"bench-{args.workload}" + ("-mix" if args.sizes != SIZES else "") + ("-quick" if args.quick else "")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(_finite(results), indent=2, allow_nan=False))
        (args.out / f"{stem}.md").write_text(report.markdown(results, f"{stem}.png"))
        report.plot(results, args.out / f"{stem}.png")
        png = args.out.resolve() / f"{stem}.png"
        link = png.relative_to(ROOT) if png.is_relative_to(ROOT) else png
        print(report.markdown(results, str(link)))  # to paste into the README, so linked from the root
        log(f"wrote {args.out}/{stem}.json, .md, .png in {results['duration_s']:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def control_plane(seconds: float) -> dict[str, Any]:
    """The engine alone with synthetic workers and a trivial model (issue 15, point 4)."""
    from loadtests.control_plane import SIZE, measure

    if seconds <= 0:
        return {}
    try:
        cp = measure(2, 64, seconds, -1)
    except Exception as exc:  # a failed side measure must not lose the benchmark
        log(f"  control plane: FAILED: {exc}")
        return {"error": str(exc)}
    log(f"  control plane: {cp['images_per_s']:,.0f} images/s, {cp['engine_cpu_us_per_image']:.0f} us engine CPU/image")
    return {**cp, "size": SIZE}


def ipc_hop(n: int) -> dict[str, Any]:
    from loadtests.ipc_hop import measure

    try:
        hop = measure(n, 300)
    except Exception as exc:  # a failed side measure must not lose the benchmark
        log(f"  IPC hop: FAILED: {exc}")
        return {"error": str(exc)}
    log(f"  IPC hop: p50 {hop['hop_p50_us']:.0f} us, p99 {hop['hop_p99_us']:.0f} us over {n} round trips")
    return hop


def _finite(value: Any) -> Any:
    """The results with NaN (a point with no answer) as null, so the file is strict JSON."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
