"""State that all HTTP workers share: async jobs, result cache, rate limits, prediction log.

Everything lives in SQLite files (WAL) under ``RINGSERVE_DATA_DIR`` (default: ``data/`` beside
the model repository), one per feature: ``jobs.db``, ``cache.db``, ``ratelimit.db``,
``predictions.db``. Nothing of it is per-process only, and it survives a worker's restart.

Wiring (frontend/app.py): :func:`install` at app build time (the client gate middleware, the job
and prediction-log routes, ``app.state.shared``); in the lifespan, once ``app.state.service``
exists, ``await shared.start(app)`` wraps the service with the cache and the log and starts the
background tasks (job runner, cache writer, log writer); ``await shared.stop()`` at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from loguru import logger

from frontend.settings import Settings
from frontend.state import jobs
from frontend.state.db import Database, StoreError

__all__ = ["SharedState", "StoreError", "install"]


class SharedState:
    def __init__(self, settings: Settings) -> None:
        from frontend.state import metrics

        self.settings = settings
        self.metrics = metrics
        root = settings.state_dir
        self.dbs: list[Database] = []
        self.jobs_db = self._db(Database(root / "jobs.db", jobs.MIGRATIONS, name="jobs", threads=2))
        self.rate: Any = None
        self.cache: Any = None
        self.log: Any = None
        if settings.rate_limit:
            from frontend.state.ratelimit import BUSY_TIMEOUT_MS, MIGRATIONS, RateLimits

            path, busy = root / "ratelimit.db", BUSY_TIMEOUT_MS
            db = self._db(Database(path, MIGRATIONS, name="ratelimit", threads=2, busy_timeout_ms=busy))
            self.rate = RateLimits(db, settings.rate_limit, settings.rate_limit_strategy)
        if settings.cache_entries:
            from frontend.state import cache

            db = self._db(Database(root / "cache.db", cache.MIGRATIONS, name="cache", threads=2, busy_timeout_ms=50))
            self.cache = cache.ResultCache(db, settings.cache_entries, settings.cache_bytes, metrics.cache)
        if settings.prediction_log:
            from frontend.state import predlog

            db = self._db(Database(root / "predictions.db", predlog.MIGRATIONS, name="predictions"))
            self.log = predlog.PredictionLog(
                db,
                settings.prediction_log_queue,
                settings.prediction_log_days * 86400,
                settings.prediction_log_rows,
                metrics.prediction_log,
            )
        self.runner: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    def _db(self, db: Database) -> Database:
        self.dbs.append(db)
        return db

    # ------------------------------------------------------------ lifecycle
    async def start(self, app: FastAPI) -> None:
        from frontend.state.runner import JobRunner

        service = app.state.service
        base = service
        if self.cache is not None:
            from frontend.state.cache import CachingService

            service = CachingService(service, self.cache)
            self._spawn(lambda: self.cache.run(lambda: _served(base)), "cache-writer")
        if self.log is not None:
            from frontend.state.predlog import LoggingService

            service = LoggingService(service, self.log)
            self._spawn(self.log.run, "prediction-log-writer")
        app.state.service = service
        s = self.settings
        self.runner = JobRunner(
            self.jobs_db,
            lambda: app.state.service,
            lease_s=s.job_lease_s,
            attempts=s.job_attempts,
            concurrency=s.job_concurrency,
            retention_s=s.job_retention_s,
            count=self.metrics.job,
        )
        self._spawn(self.runner.run, "job-runner")

    def _spawn(self, loop: Callable[[], Awaitable[None]], name: str) -> None:
        self._tasks.append(asyncio.create_task(_forever(loop, name), name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for part in (self.log, self.cache):
            if part is not None:
                with contextlib.suppress(StoreError, TimeoutError):
                    await asyncio.wait_for(part.flush(), 2.0)  # what is queued, within the drain
        for db in self.dbs:
            db.close()

    # ------------------------------------------------------------ jobs (the routes call these)
    async def submit(self, **kw: Any) -> str:
        s = self.settings
        job_id: str = await self.jobs_db.call(_submit, kw, s.job_max, s.job_max_bytes, timeout=10)
        self.metrics.job("submitted")
        if self.runner is not None:
            self.runner.wake.set()  # this worker starts it now; others would after a poll
        return job_id

    async def view(self, job_id: str) -> jobs.JobView | None:
        return await self.jobs_db.call(jobs.view, job_id, timeout=5)

    async def cancel(self, job_id: str) -> bool:
        return await self.jobs_db.call(jobs.cancel, job_id, timeout=5)

    def count_job(self, event: str) -> None:
        self.metrics.job(event)

    def on_rate_error(self, exc: StoreError) -> None:
        self.metrics.rate_limit("error")
        if self.rate is not None:
            self.rate.db.warn("rate limit not checked (request let through)", exc)


def _submit(conn: Any, kw: dict[str, Any], max_jobs: int, max_bytes: int) -> str:
    return jobs.submit(conn, **kw, max_jobs=max_jobs, max_bytes=max_bytes)


def _served(service: Any) -> set[tuple[str, int]] | None:
    client = getattr(service, "client", None)
    if client is None or not client.is_ready:
        return None
    return set(client.models)


async def _forever(loop: Callable[[], Awaitable[None]], name: str) -> None:
    """A background loop that a bug cannot end silently: logged, restarted after a pause."""
    while True:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("background task {} failed; restarting it in 1 s", name)
            await asyncio.sleep(1.0)


def install(app: FastAPI, settings: Settings) -> SharedState:
    """Build the shared state, its middleware and its routes (before RequestContext is added)."""
    from frontend.routes import jobs as job_routes
    from frontend.routes import predictions
    from frontend.state.gate import ClientGate

    shared = SharedState(settings)
    app.state.shared = shared

    def refused() -> None:
        shared.metrics.rate_limit("refused")

    limits: Callable[[], Any] = lambda: shared.rate  # noqa: E731
    app.add_middleware(ClientGate, limits=limits, on_error=shared.on_rate_error, on_refused=refused)
    app.include_router(job_routes.router)
    app.include_router(predictions.router)
    return shared
