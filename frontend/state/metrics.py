"""Counters of the shared state, in /metrics with the rest (import after ``ensure_env``)."""

from __future__ import annotations

from prometheus_client import Counter

CACHE = Counter("ringserve_cache", "Result cache lookups and evictions by outcome", ["outcome"])
RATE_LIMIT = Counter("ringserve_rate_limit", "Rate-limit checks by outcome", ["outcome"])
PREDICTION_LOG = Counter("ringserve_prediction_log", "Prediction log entries by outcome", ["outcome"])
JOBS = Counter("ringserve_jobs", "Async job events", ["event"])
STORE_ERRORS = Counter("ringserve_state_errors", "Failed calls to the shared database by file", ["db"])


def cache(outcome: str, n: int = 1) -> None:  # hit | miss | eviction | error
    CACHE.labels(outcome).inc(n)


def rate_limit(outcome: str) -> None:  # allowed | refused | error
    RATE_LIMIT.labels(outcome).inc()


def prediction_log(outcome: str, n: int = 1) -> None:  # written | dropped_full | dropped_error
    PREDICTION_LOG.labels(outcome).inc(n)


def job(event: str) -> None:  # submitted | done | failed | cancelled | retried | taken_over | refused
    JOBS.labels(event).inc()


def store_error(db: str) -> None:
    STORE_ERRORS.labels(db).inc()
