"""A bounded soak: steady load of mixed valid requests, errors and memory of every process over time.

Starts the appliance (``ringserve serve`` on the default model, in a private run directory) or
targets a running one, sends the test photos at camera sizes (640x480 to 1920x1080) as multipart,
JSON base64 and raw JPEG bodies from ``--concurrency`` clients back to back, checks each answer
(status 200 and the label the photo must give), and every ``--sample-s`` seconds records the RSS
of every process of the appliance (launcher, engine, each HTTP worker) and the
number of ring segments in /dev/shm. At the end: a summary table on stdout and everything in JSON.

    python -m loadtests.soak                      # 2 minutes, 8 clients, starts the appliance
    python -m loadtests.soak --minutes 30         # the long one
    python -m loadtests.soak --url http://127.0.0.1:8000 --pid <pid of ringserve serve or supervisord>

RSS growth is measured from the end of the warm-up (``--warmup-s``, default a quarter of the run,
at most 60 s: caches, allocator arenas and ONNX Runtime's buffers settle first) to the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "ssd-mobilenet-v2-coco"
HOWS = ("multipart", "json", "raw")


@dataclass(frozen=True)
class Body:
    name: str
    how: str
    expect: str | None
    kwargs: dict


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    wrong: int = 0  # 200 but the expected label is missing
    transport: int = 0  # connection-level failures
    examples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(what)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.transport

    @property
    def errors(self) -> int:
        return self.requests - self.statuses.get("200", 0) + self.wrong


@dataclass
class Sample:
    t: float
    requests: int
    errors: int
    segments: int
    rss: dict[str, int]  # "role pid" -> bytes


def bodies() -> list[Body]:
    from loadtests.payloads import build

    out = []
    for p in build():
        out.append(Body(p.name, "multipart", p.expect, {"files": {"image": (f"{p.name}.jpg", p.jpeg, "image/jpeg")}}))
        out.append(Body(p.name, "json", p.expect, {"json": {"image_b64": base64.b64encode(p.jpeg).decode()}}))
        out.append(Body(p.name, "raw", p.expect, {"content": p.jpeg, "headers": {"content-type": "image/jpeg"}}))
    return out


# ----------------------------------------------------------------------------- processes
def roles(root: psutil.Process) -> dict[str, psutil.Process]:
    """The appliance's processes by role: launcher (or supervisord), engine, the workers' pool
    (``ringserve frontend``, under supervisord), each HTTP worker."""
    found = {f"launcher {root.pid}": root}
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    for p in children:
        cmd = _cmd(p)
        if "frontend.worker" in cmd:
            found[f"worker {p.pid}"] = p
        elif cmd[2:4] == ["engine", "engine"]:
            found[f"engine {p.pid}"] = p
        elif cmd[2:4] == ["engine", "frontend"]:  # under supervisord: the workers' pool
            found[f"frontend {p.pid}"] = p
    return found


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


def rss(procs: dict[str, psutil.Process]) -> dict[str, int]:
    out = {}
    for role, p in procs.items():
        try:
            out[role] = p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def ring_segments(pids: set[int]) -> int:
    """Ring segments in /dev/shm made by these processes (other appliances on the box do not count)."""
    return sum(1 for p in Path("/dev/shm").glob(f"ringserve-{os.getuid()}-*") if int(p.name.split("-")[2]) in pids)


class Started:
    """``ringserve serve`` in its own session and run directory, stopped with SIGTERM."""

    def __init__(self, repo: Path, workers: int, models: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.run_dir = Path(tempfile.mkdtemp(prefix="rs-soak-"))
        self.log_path = self.run_dir.with_suffix(".log")
        cmd = [
            sys.executable,
            "-m",
            "engine",
            "serve",
            "--repo",
            str(repo),
            "--run-dir",
            str(self.run_dir),
            "--port",
            str(self.port),
            "--models",
            models,
        ]
        if workers:
            cmd += ["--workers", str(workers)]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"ringserve serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # polling for readiness, with a deadline
        raise SystemExit(f"the appliance was not ready within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.proc.returncode == 0:
            self.log_path.unlink(missing_ok=True)  # kept when the appliance did not stop cleanly
        return self.proc.returncode


# ----------------------------------------------------------------------------- load
async def client_loop(
    client: httpx.AsyncClient, url: str, items: list[Body], k: int, until: float, tally: Tally
) -> None:
    i = k
    while time.monotonic() < until:
        body = items[i % len(items)]
        i += 7  # co-prime with the number of bodies: each client walks all of them
        started = time.perf_counter()
        try:
            r = await client.post(url, **body.kwargs)
        except httpx.TransportError as exc:
            tally.transport += 1
            tally.error(f"{body.name} {body.how}: {type(exc).__name__}: {exc}")
            continue
        tally.latencies.append(time.perf_counter() - started)
        tally.statuses[str(r.status_code)] = tally.statuses.get(str(r.status_code), 0) + 1
        if r.status_code != 200:
            tally.error(f"{body.name} {body.how}: {r.status_code} {r.text[:200]}")
        elif body.expect and body.expect not in {d["label"] for d in r.json().get("detections", [])}:
            tally.wrong += 1
            tally.error(f"{body.name} {body.how}: no {body.expect!r} in the answer")


async def sampler(
    procs_of: Callable[[], dict[str, psutil.Process]],
    until: float,
    every: float,
    tally: Tally,
    samples: list[Sample],
    t0: float,
) -> None:
    while True:
        now = time.monotonic()
        procs = procs_of()
        pids = {p.pid for p in procs.values()}
        samples.append(Sample(round(now - t0, 1), tally.requests, tally.errors, ring_segments(pids), rss(procs)))
        if now >= until:
            return
        await asyncio.sleep(min(every, max(until - now, 0)))  # the sampling period


async def soak(
    url: str,
    root: psutil.Process | None,
    minutes: float,
    concurrency: int,
    every: float,
    items: list[Body],
    seen: set[int],
) -> tuple[Tally, list[Sample], float]:
    tally, samples = Tally(), []
    t0 = time.monotonic()
    until = t0 + minutes * 60
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    cached: dict[str, psutil.Process] = {}

    def procs_of() -> dict[str, psutil.Process]:
        if root is None:
            return {}
        current = roles(root)
        # keep the Process objects (psutil caches per object), and notice replaced workers
        for role, p in current.items():
            cached.setdefault(role, p)
            seen.add(p.pid)
        return {role: cached[role] for role in current}

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(
            sampler(procs_of, until, every, tally, samples, t0),
            *(client_loop(client, f"{url}/api/v1/predict", items, k, until, tally) for k in range(concurrency)),
        )
    return tally, samples, time.monotonic() - t0


# ----------------------------------------------------------------------------- report
def summarise(tally: Tally, samples: list[Sample], seconds: float, warmup_s: float) -> dict:
    lat = sorted(tally.latencies)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else 0.0

    after = [s for s in samples if s.t >= warmup_s] or samples[-1:]
    processes = {}
    for role in sorted({r for s in samples for r in s.rss}):
        series = [(s.t, s.rss[role]) for s in samples if role in s.rss]
        steady = [(t, v) for t, v in series if t >= warmup_s] or series[-1:]
        base, last = steady[0][1], steady[-1][1]
        processes[role] = {
            "rss_start_mb": round(series[0][1] / 2**20, 1),
            "rss_after_warmup_mb": round(base / 2**20, 1),
            "rss_end_mb": round(last / 2**20, 1),
            "rss_max_after_warmup_mb": round(max(v for _, v in steady) / 2**20, 1),
            "growth_after_warmup_pct": round((last - base) / base * 100, 2),
            "seen_s": [series[0][0], series[-1][0]],
        }
    segs = [s.segments for s in samples]
    return {
        "seconds": round(seconds, 1),
        "warmup_s": warmup_s,
        "requests": tally.requests,
        "ok": tally.statuses.get("200", 0),
        "errors": tally.errors,
        "statuses": tally.statuses,
        "wrong_answers": tally.wrong,
        "transport_errors": tally.transport,
        "throughput_rps": round(tally.requests / seconds, 2) if seconds else 0.0,
        "latency_ms": {
            "p50": pct(0.5),
            "p95": pct(0.95),
            "p99": pct(0.99),
            "max": pct(1.0),
            "mean": round(statistics.fmean(lat) * 1000, 1) if lat else 0.0,
        },
        "processes": processes,
        "shm_segments": {"min": min(segs), "max": max(segs), "after_warmup": sorted({s.segments for s in after})},
        "error_examples": tally.examples,
    }


def table(summary: dict) -> str:
    s = summary
    lines = [
        f"{s['requests']} requests in {s['seconds']:.0f} s ({s['throughput_rps']} req/s), "
        f"{s['errors']} errors (statuses {s['statuses']}, wrong answers {s['wrong_answers']}, "
        f"transport {s['transport_errors']})",
        "latency ms: " + ", ".join(f"{k} {v}" for k, v in s["latency_ms"].items()),
        f"/dev/shm ring segments: min {s['shm_segments']['min']}, max {s['shm_segments']['max']}",
        "",
        f"{'process':<22} {'RSS start':>10} {'after warm-up':>14} {'end':>9} {'max':>9} {'growth':>8}",
    ]
    for role, p in s["processes"].items():
        lines.append(
            f"{role:<22} {p['rss_start_mb']:>8.1f}MB {p['rss_after_warmup_mb']:>12.1f}MB "
            f"{p['rss_end_mb']:>7.1f}MB {p['rss_max_after_warmup_mb']:>7.1f}MB "
            f"{p['growth_after_warmup_pct']:>7.2f}%"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=2.0, help="length of the run (default 2; 30 for the long one)")
    ap.add_argument("--concurrency", type=int, default=8, help="clients sending back to back (default 8)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    ap.add_argument(
        "--warmup-s", type=float, default=None, help="growth is measured after this (default: 1/4, <= 60 s)"
    )
    ap.add_argument("--url", help="target a running appliance instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the pid whose process tree is the appliance (for RSS)")
    ap.add_argument("--repo", type=Path, default=ROOT / "models", help="model repository of a started appliance")
    ap.add_argument("--models", default=DEFAULT_MODEL, help="models a started appliance loads (default the SSD)")
    ap.add_argument("--workers", type=int, default=0, help="HTTP workers of a started appliance (0: one per core)")
    ap.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "soak.json")
    a = ap.parse_args(argv)
    warmup_s = a.warmup_s if a.warmup_s is not None else min(60.0, a.minutes * 60 / 4)

    items = bodies()
    started = None
    if a.url:
        url, root = a.url.rstrip("/"), psutil.Process(a.pid) if a.pid else None
    else:
        started = Started(a.repo, a.workers, a.models)
        url, root = started.url, psutil.Process(started.proc.pid)
    seen: set[int] = set()
    try:
        if started is not None:
            started.wait_ready()
        print(
            f"soaking {url} for {a.minutes:g} min with {a.concurrency} clients, {len(items)} request kinds", flush=True
        )
        tally, samples, seconds = asyncio.run(soak(url, root, a.minutes, a.concurrency, a.sample_s, items, seen))
    finally:
        code = started.stop() if started is not None else None
    summary = summarise(tally, samples, seconds, warmup_s)
    summary["started_appliance"] = started is not None
    if started is not None:
        summary["exit_code"] = code
        summary["shm_segments_left"] = ring_segments(seen)  # after the stop: must be 0
    print(table(summary))
    if started is not None:
        print(f"after the stop: exit code {code}, ring segments left {summary['shm_segments_left']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"summary": summary, "samples": [asdict(s) for s in samples]}, indent=1))
    print(f"written to {a.out}")
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
