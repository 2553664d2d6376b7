"""Liveness, readiness and a health summary."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import Response

from frontend import readiness
from frontend.client import EngineClient
from frontend.jsonresp import JSONResponse

router = APIRouter(tags=["health"])


def _gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists()


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    absent = readiness.missing(client, request.app.state.settings)
    ok = client.is_ready and bool(client.models) and not absent
    body: dict[str, object] = {"ready": ok}
    if not ok:
        serving = client.is_ready and client.models
        body["reason"] = f"required model(s) not loaded: {', '.join(absent)}" if serving else _not_ready_reason(client)
    return JSONResponse(body, status_code=200 if ok else 503)


def _not_ready_reason(client: EngineClient) -> str:
    if client.fault:
        return client.fault
    if client.ready is None or not client.connected:
        return "the engine is not connected"
    if not client.ring_fits:
        return "this worker's ring is being replaced to fit the models"
    return "the engine serves no model"


@router.get("/health")
async def health(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    r = client.ready
    absent = readiness.missing(client, request.app.state.settings)
    if r is None or not client.is_ready or not client.models:
        status = "unhealthy"
    elif r.failed or r.restarts or absent:
        status = "degraded"
    else:
        status = "healthy"
    ring = client.ring
    body = {
        "status": status,
        "reason": _not_ready_reason(client) if status == "unhealthy" else None,
        "engine": {
            "connected": r is not None and client.connected,
            "instance": client.instance or None,
            "restarts": r.restarts if r else None,
            "losses_seen_by_worker": client.engine_losses,
        },
        "providers": r.providers if r else [],
        "gpu": _gpu_present(),
        "models": sorted(f"{n}/{v}" for n, v in client.models) if r else [],
        "failed_models": r.failed if r else {},
        "model_states": readiness.states(client),  # per version: LOADING, READY, UNLOADING, UNAVAILABLE
        "missing_required_models": absent,
        "worker": {
            "pid": os.getpid(),
            "ring_slots": ring.slots if ring else 0,
            "ring_in_use": ring.in_use if ring else 0,
            "in_flight": len(client.pending),
        },
    }
    return JSONResponse(body, status_code=200 if status != "unhealthy" else 503)
