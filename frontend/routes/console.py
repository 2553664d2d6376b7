"""The web console: ``GET /`` (one self-contained page) and ``GET /api/v1/stats`` (what it shows).

The page's CSS and JavaScript are inlined into ``/`` when it is served: ``/`` is the one console path
the API key does not guard, and a browser cannot add an ``X-API-Key`` header to ``<script src>``.
A Content-Security-Policy with the hashes of the two inline blocks keeps other scripts out (the page
keeps the API key in sessionStorage). ``/static/{name}`` serves the same files for anyone reading them.

The stats are box-wide: they come from the same prometheus_client multiprocess files as /metrics.
Rates, p99 and the mean batch size cover about the last ``WINDOW_S`` seconds: from the newest earlier
read this worker kept that is at least that old (or its oldest one) to now; they are ``null`` on a
worker's first read. "Requests" are inference requests (REST predict, batch, V2 infer): not health
checks, scrapes or the console's own polling.
"""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from importlib import resources

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response
from starlette.routing import Match

from frontend.client import EngineClient
from frontend.console_stats import MIN_SPAN_S, History, Snapshot, quantile, read_snapshot

router = APIRouter(tags=["console"])

STATIC = ("index.html", "app.js", "style.css")
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8"}
_STYLE_TAG = '<link rel="stylesheet" href="static/style.css">'
_SCRIPT_TAG = '<script src="static/app.js" defer></script>'


# ------------------------------------------------------------------ the page
def _static(name: str) -> str:
    return (resources.files("frontend") / "static" / name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def page() -> tuple[str, str]:
    """The page with its CSS and JS inlined, and the Content-Security-Policy that allows exactly those."""
    html, css, js = (_static(n) for n in ("index.html", "style.css", "app.js"))
    if _STYLE_TAG not in html or _SCRIPT_TAG not in html:
        raise RuntimeError("index.html must link static/style.css and static/app.js with the expected tags")
    if "</style" in css or "</script" in js:  # it would end the inlined element early
        raise RuntimeError("style.css and app.js must not contain '</style' or '</script'")
    html = html.replace(_STYLE_TAG, f"<style>{css}</style>").replace(_SCRIPT_TAG, f"<script>{js}</script>")
    csp = (
        f"default-src 'none'; script-src {_sha256(js)}; style-src {_sha256(css)}; img-src 'self' blob: data:; "
        "connect-src 'self'; media-src 'self' blob: mediastream:; base-uri 'none'; frame-ancestors 'none'"
    )
    return html, csp


@router.get("/", include_in_schema=False)
def index() -> Response:
    html, csp = page()
    return Response(
        html,
        media_type=_TYPES["html"],
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get("/static/{name}", include_in_schema=False)
def static(name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_static(name), media_type=_TYPES[name.rsplit(".", 1)[1]], headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ the numbers
class WorkerRing(BaseModel):
    model_config = ConfigDict(frozen=True)
    pid: int
    in_use: int
    slots: int


class EngineState(BaseModel):
    model_config = ConfigDict(frozen=True)
    state: str  # ready | degraded | down
    instance: str | None
    restarts: int
    providers: list[str]


class Stats(BaseModel):
    """What the console's status panel shows. ``*_total``: since the appliance started."""

    model_config = ConfigDict(frozen=True)
    engine: EngineState
    default_model: str
    models: list[str]
    failed_models: dict[str, str]
    features: dict[str, bool]
    window_s: float | None  # the span the rates, p99 and batch_size cover; None: no earlier read yet
    requests_per_s: float | None
    images_per_s: float | None
    p99_ms: float | None  # inference requests in the window; None when there were none
    batch_size: float | None  # mean images per batch in the window
    requests_total: int
    errors_total: int
    images_total: int
    p99_ms_total: float | None
    batch_size_total: float | None
    queue_depth: int
    queue_depth_by_model: dict[str, int]
    workers: list[WorkerRing]


def summarise(now: Snapshot, before: Snapshot | None) -> dict[str, object]:
    """The windowed and cumulative numbers of the panel, from two snapshots (counts never go back)."""
    out: dict[str, object] = {
        "window_s": None,
        "requests_per_s": None,
        "images_per_s": None,
        "p99_ms": None,
        "batch_size": None,
        "requests_total": round(now.requests),
        "errors_total": round(now.errors),
        "images_total": round(now.images),
        "p99_ms_total": _ms(quantile(0.99, now.latency_buckets)),
        "batch_size_total": now.batch_images / now.batches if now.batches else None,
        "queue_depth": round(sum(now.queue_depth.values())),
        "queue_depth_by_model": {k: round(v) for k, v in sorted(now.queue_depth.items())},
        "workers": [WorkerRing(pid=pid, in_use=round(r[0]), slots=round(r[1])) for pid, r in sorted(now.rings.items())],
    }
    if before is not None and now.at - before.at >= MIN_SPAN_S:
        span = now.at - before.at
        batches = max(0.0, now.batches - before.batches)
        delta = {le: max(0.0, c - before.latency_buckets.get(le, 0.0)) for le, c in now.latency_buckets.items()}
        out.update(
            window_s=round(span, 2),
            requests_per_s=max(0.0, now.requests - before.requests) / span,
            images_per_s=max(0.0, now.images - before.images) / span,
            p99_ms=_ms(quantile(0.99, delta)),
            batch_size=max(0.0, now.batch_images - before.batch_images) / batches if batches else None,
        )
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


_history = History()


def _engine(client: EngineClient) -> EngineState:
    r = client.ready
    if r is None or not client.models:
        return EngineState(state="down", instance=None, restarts=0, providers=[])
    return EngineState(
        state="degraded" if r.failed or r.restarts else "ready",
        instance=client.instance or None,
        restarts=r.restarts,
        providers=list(r.providers),
    )


def _serves(request: Request, kind: str, path: str, method: str = "GET") -> bool:
    """Whether this app has a route for the path (routers are asked, as when a request arrives)."""
    scope = {"type": kind, "path": path, "root_path": "", "method": method, "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes)


@router.get("/api/v1/stats", response_model=Stats)
def stats(request: Request) -> Stats:
    """A summary of /metrics and of the engine for the console's status panel."""
    client: EngineClient = request.app.state.client
    snap = read_snapshot()
    numbers = summarise(snap, _history.add(snap))
    r = client.ready
    return Stats(
        engine=_engine(client),
        default_model=request.app.state.settings.default_model,
        models=sorted(f"{n}/{v}" for n, v in client.models) if r else [],
        failed_models=dict(r.failed) if r else {},
        features={
            "stream": _serves(request, "websocket", "/ws/stream"),
            "batch": _serves(request, "http", "/api/v1/predict/batch", "POST"),
            "jobs": _serves(request, "http", "/api/v1/predict/batch/async", "POST"),
            "prediction_log": getattr(getattr(request.app.state, "shared", None), "log", None) is not None,
        },
        **numbers,
    )
