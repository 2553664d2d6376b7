"""The engine's Prometheus metrics (multiprocess mode: any worker's /metrics merges them)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_MS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# ringserve_queue_wait_seconds is measured here but recorded by the worker that receives the
# Result (frontend/metrics.py): no metric write per image in this process.
INFERENCE = Histogram(
    "ringserve_inference_duration_seconds",
    "Time to run one batch (copy, session, head)",
    ["model", "version"],
    buckets=_MS_BUCKETS,
)
BATCH_SIZE = Histogram(
    "ringserve_batch_size",
    "Images per executed batch (the _sum is the image count)",
    ["model", "version"],
    buckets=_BATCH_BUCKETS,
)
IMAGES = Counter("ringserve_inference_images", "Images run through a model", ["model", "version"])
EXECUTIONS = Counter("ringserve_inference_executions", "Batches executed", ["model", "version"])
ENGINE_ERRORS = Counter("ringserve_engine_errors", "Requests the engine refused or failed, by reason", ["reason"])
THREAD_DEATHS = Counter(
    "ringserve_engine_thread_deaths", "Batcher threads that ended unexpectedly (the engine then exits to be restarted)"
)
QUEUE_DEPTH = Gauge(
    "ringserve_queue_depth", "Requests waiting in a model's queue", ["model", "version"], multiprocess_mode="livesum"
)
RESTARTS = Gauge("ringserve_engine_restarts", "Engine restarts since the appliance started", multiprocess_mode="max")
LOAD_TIME = Gauge(
    "ringserve_model_load_seconds", "Time to load a model version", ["model", "version"], multiprocess_mode="max"
)
BUILD = Gauge(
    "ringserve_build_info", "Build and runtime facts (value 1)", ["version", "providers"], multiprocess_mode="max"
)
