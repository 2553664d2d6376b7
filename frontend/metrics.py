"""The workers' Prometheus metrics and the /metrics route, which merges every process's files."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.responses import Response

from ipc.messages import Result

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter("ringserve_http_requests", "HTTP requests by route and status", ["route", "method", "status"])
DURATION = Histogram("ringserve_http_request_duration_seconds", "HTTP request duration", ["route"], buckets=_BUCKETS)
DECODE = Histogram("ringserve_decode_duration_seconds", "Decode and resize into the ring slot", buckets=_BUCKETS)
ERRORS = Counter("ringserve_errors", "Failed requests by reason", ["reason"])
RING_IN_USE = Gauge(
    "ringserve_ring_slots_in_use", "Ring slots held by in-flight requests, per worker pid", multiprocess_mode="liveall"
)
RING_SLOTS = Gauge("ringserve_ring_slots", "Ring slots per worker pid", multiprocess_mode="liveall")
# The engine measures the wait and says it in every Result; the worker that receives it records it,
# so the one engine process (whose Python is the appliance's bottleneck) writes no metric per image.
QUEUE_WAIT = Histogram(
    "ringserve_queue_wait_seconds",
    "Time a request waited in the engine before its batch ran",
    ["model", "version"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def observe_queue_wait(result: Result) -> None:
    QUEUE_WAIT.labels(result.model, str(result.version)).observe(result.queue_ms / 1000)


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
