"""The benchmark's one load generator: a closed loop over keep-alive HTTP/1.1 connections.

Runs in its own process (``python -m loadtests.bench.client < spec.json``, one JSON result on
stdout). ``concurrency`` connections each send a request, read the whole answer, check it and send
the next one, cycling through pre-encoded request bodies (multipart, field ``image``, like a camera
or a browser upload). Plain asyncio streams (uvloop when installed) and a minimal HTTP/1.1 reader
keep the client's own CPU small; it reports that CPU so a reader can see what it took from the box.

Requests that end inside the measured window (after the warm-up) count, as with wrk. A request
counts as an error when the status is not 200, when the answer lacks its list of detections (or
classes), or when the photo's known label is missing from it.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

BOUNDARY = "ringserve-bench-7f3a9c"


@dataclass(frozen=True)
class Spec:
    host: str
    port: int
    path: str
    payloads: list[dict[str, str]]  # {"file": ..., "name": ..., "expect": label or ""}
    concurrency: int
    warmup: float
    seconds: float
    answer_key: str  # "detections" or "classes"
    request_timeout: float = 30.0


@dataclass(frozen=True)
class Request:
    data: bytes
    expect: str


def multipart(spec: Spec, name: str, jpeg: bytes) -> bytes:
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class HTTPError(Exception):
    pass


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one HTTP/1.1 response (Content-Length or chunked)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise HTTPError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    length, chunked, keep = -1, False, True
    for line in lines[1:]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "content-length":
            length = int(value)
        elif key == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif key == "connection":
            keep = "close" not in value.lower()
    if chunked:
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(chunk[:-2])
        return status, b"".join(chunks), keep
    if length < 0:
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep


def check(body: bytes, key: str, expect: str) -> str:
    """'' when the answer is right, else the reason it is not."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "not_json"
    items = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(items, list) or (key == "classes" and not items):
        return f"no_{key}"
    if expect and not any(item.get("label") == expect for item in items):
        return "wrong_label"
    return ""


class Loop:
    def __init__(self, spec: Spec, requests: list[Request]) -> None:
        self.spec = spec
        self.requests = requests
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.start = self.end = 0.0

    async def run(self) -> None:
        spec = self.spec
        conns = [await asyncio.open_connection(spec.host, spec.port) for _ in range(spec.concurrency)]
        self.start = time.perf_counter() + spec.warmup
        self.end = self.start + spec.seconds
        tasks = [asyncio.create_task(self._connection(i, *conn)) for i, conn in enumerate(conns)]
        # Requests in flight when the window closes finish (they do not count) or are cut off.
        done, pending = await asyncio.wait(tasks, timeout=spec.warmup + spec.seconds + spec.request_timeout)
        for task in pending:
            task.cancel()
        self.errors["cut_off"] += len(pending)
        for task in done:
            if task.exception() is not None:
                self.errors[f"client:{type(task.exception()).__name__}"] += 1

    async def _connection(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        spec, n = self.spec, len(self.requests)
        k = index * 7  # connections start at different photos and sizes
        while True:
            now = time.perf_counter()
            if now >= self.end:
                break
            req = self.requests[k % n]
            k += 1
            reason = ""
            try:
                async with asyncio.timeout(spec.request_timeout):
                    writer.write(req.data)
                    status, body, keep = await read_response(reader)
                if status != 200:
                    reason = str(status)
                else:
                    reason = check(body, spec.answer_key, req.expect)
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
                HTTPError,
                ValueError,
            ) as exc:
                reason, keep = f"conn:{type(exc).__name__}", False
            finished = time.perf_counter()
            if self.start <= finished <= self.end:
                if reason:
                    self.errors[reason] += 1
                else:
                    self.latencies.append(finished - now)
            if not keep:
                writer.close()
                reconnected = await self._reconnect(pause=reason.startswith("conn:"))
                if reconnected is None:
                    return
                reader, writer = reconnected
        writer.close()

    async def _reconnect(self, pause: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while time.perf_counter() < self.end:
            if pause:
                await asyncio.sleep(0.05)  # a refused connection must not become a busy loop
            try:
                return await asyncio.open_connection(self.spec.host, self.spec.port)
            except OSError:
                self.errors["conn:refused"] += 1
                pause = True
        return None


def _percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    i = min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))
    return sorted_ms[i]


def run(spec: Spec) -> dict[str, object]:
    requests = []
    for p in spec.payloads:
        requests.append(Request(multipart(spec, p["name"], Path(p["file"]).read_bytes()), p["expect"]))
    loop = Loop(spec, requests)
    try:
        import uvloop  # the servers use it too; it halves the client's CPU per request

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    cpu0, wall0 = time.process_time(), time.time()
    runner(loop.run())
    cpu1, wall1 = time.process_time(), time.time()
    to_wall = time.time() - time.perf_counter()
    ms = sorted(x * 1000 for x in loop.latencies)
    window = spec.seconds
    return {
        "concurrency": spec.concurrency,
        "seconds": window,
        "requests": len(ms),
        "rps": len(ms) / window,
        "errors": sum(loop.errors.values()),
        "error_kinds": dict(loop.errors),
        "p50_ms": _percentile(ms, 50),
        "p95_ms": _percentile(ms, 95),
        "p99_ms": _percentile(ms, 99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "max_ms": ms[-1] if ms else float("nan"),
        # the whole process, warm-up included, as cores used on average
        "client_cpu": (cpu1 - cpu0) / max(wall1 - wall0, 1e-9),
        # wall-clock bounds of the measured window, to match the server's CPU samples
        "window": [loop.start + to_wall, loop.end + to_wall],
    }


def main() -> None:
    spec = Spec(**json.loads(sys.stdin.read()))
    sys.stdout.write(json.dumps(run(spec)) + "\n")


if __name__ == "__main__":
    main()
