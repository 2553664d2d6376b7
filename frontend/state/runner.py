"""The job runner of one worker: claims jobs from ``jobs.db``, runs their images, keeps the lease.

Every worker runs one. It is woken when its own worker accepts a job and otherwise polls, so a
job whose worker died is taken over by another within about a lease time. Images of a job go
through the same per-image service as the synchronous routes (at most IN_FLIGHT at a time, so a
job never takes the ring from live traffic); each answer is stored as it comes, which is the
job's progress and what a takeover resumes from. A transient failure (the engine restarting, a
full queue, a deadline) sends the job back to ``pending`` with a backoff; any other error is
that image's answer, as in the synchronous routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from loguru import logger

from frontend.params import Params
from frontend.schemas import ModelRef
from frontend.schemas_batch import BatchItemError, BatchItemResult, BatchResponse
from frontend.service import ImageRequest, ImageResult
from frontend.state import jobs
from frontend.state.db import Database, StoreError
from frontend.state.gate import CLIENT, Client
from ipc.errors import DeadlineExceeded, EngineUnavailable, QueueFull, RingserveError

POLL_S = 0.5
IN_FLIGHT = 4
TRANSIENT = (EngineUnavailable, QueueFull, DeadlineExceeded)
SWEEP_EVERY_S = 60.0


class JobRunner:
    def __init__(
        self,
        db: Database,
        service: Callable[[], Any],
        *,
        lease_s: float,
        attempts: int,
        concurrency: int,
        retention_s: float,
        count: Callable[[str], None],
    ) -> None:
        self.db = db
        self.service = service
        self.lease_s = lease_s
        self.attempts = attempts
        self.concurrency = concurrency
        self.retention_s = retention_s
        self.count = count
        self.worker = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.wake = asyncio.Event()
        self.running: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        last_sweep = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_S)
            self.wake.clear()
            try:
                await self._claim_some()
                if time.monotonic() - last_sweep > SWEEP_EVERY_S:
                    last_sweep = time.monotonic()
                    await self.db.call(jobs.sweep, self.retention_s, timeout=30)
            except StoreError as exc:
                self.count("store_error")
                self.db.warn("job runner: the jobs database failed", exc)

    async def _claim_some(self) -> None:
        while len(self.running) < self.concurrency:
            job, gave_up = await self.db.call(jobs.claim, self.worker, self.lease_s, self.attempts, timeout=5)
            for _ in range(gave_up):
                self.count("failed")
            if job is None:
                return
            self.count("taken_over" if job.taken_over else "started")
            if job.taken_over:
                logger.warning("job {}: its worker stopped; taking it over (attempt {})", job.id, job.attempt)
            task = asyncio.create_task(self._execute(job), name=f"job-{job.id}")
            self.running[job.id] = task
            task.add_done_callback(functools.partial(self._done, job.id))

    def _done(self, job_id: str, _task: asyncio.Task[None]) -> None:
        task = self.running.pop(job_id, None)
        if task is not None and not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("job {} failed in the runner", job_id)
        self.wake.set()  # room for another job

    async def _execute(self, job: jobs.Claimed) -> None:
        work = asyncio.create_task(self._images(job))
        try:
            while not work.done():
                done, _ = await asyncio.wait({work}, timeout=self.lease_s / 3)
                if done:
                    break
                if not await self.db.call(jobs.renew, job.id, self.worker, self.lease_s, timeout=self.lease_s / 3):
                    logger.info("job {}: cancelled or taken over; stopping", job.id)
                    work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        except StoreError as exc:  # cannot renew: let the lease run out, another worker resumes it
            work.cancel()
            self.db.warn(f"job {job.id}: the lease could not be renewed", exc)
        finally:
            if not work.done():
                work.cancel()

    async def _images(self, job: jobs.Claimed) -> None:
        CLIENT.set(Client(key="", owner="", address=job.client, route=f"job {job.id}"))  # what the log records
        service = self.service()
        gate = asyncio.Semaphore(IN_FLIGHT)
        transient: list[RingserveError] = []

        async def one(index: int, data: bytes, params: dict[str, object]) -> tuple[int, dict[str, object]] | None:
            rid = job.request_id if job.kind == "single" else f"{job.request_id}.{index}"
            async with gate:  # the deadline counts from when the image starts, not from the submission
                req = ImageRequest(
                    job.model, job.version, Params.model_validate(params), rid, time.monotonic(), image=data
                )
                try:
                    result: ImageResult = await service.predict(req)
                except TRANSIENT as exc:
                    transient.append(exc)
                    return None
                except RingserveError as exc:
                    return index, {"error": exc.reason, "detail": exc.detail}
            return index, result.response().model_dump(mode="json", exclude_none=True)

        pending = [asyncio.create_task(one(i, d, p)) for i, d, p in job.pending]
        for next_done in asyncio.as_completed(pending):
            answer = await next_done
            if answer is not None and not await self.db.call(jobs.record, job.id, self.worker, [answer], timeout=5):
                logger.info("job {}: cancelled or taken over; stopping", job.id)
                for task in pending:
                    task.cancel()
                return
        if transient:
            delay = min(0.5 * 2 ** (job.attempt - 1), 5.0)
            why = f"{transient[0].reason}: {transient[0].detail}"
            if await self.db.call(jobs.retry_later, job.id, self.worker, delay, why, timeout=5):
                self.count("retried")
                logger.info("job {}: {} image(s) will be retried in {:.1f}s ({})", job.id, len(transient), delay, why)
            return
        answers = await self.db.call(jobs.answers, job.id, timeout=5)
        status, error, result = self._outcome(job, answers)
        if await self.db.call(jobs.complete, job.id, self.worker, status, error, result, timeout=5):
            self.count(status)

    def _outcome(self, job: jobs.Claimed, answers: list[dict[str, Any]]) -> tuple[str, str | None, object]:
        """The sync route's body from the stored answers: (status, error, result)."""
        if job.kind == "single":
            answer = answers[0]
            if "error" in answer:
                body = {**answer, "request_id": job.request_id}
                return "failed", f"{answer['error']}: {answer['detail']}", body
            return "done", None, answer
        results: list[BatchItemResult | BatchItemError] = []
        model = ModelRef(name=job.model, version=job.version or 0)
        for index, answer in enumerate(answers):
            if "error" in answer:
                results.append(BatchItemError(index=index, error=answer["error"], detail=answer["detail"]))
                continue
            model = ModelRef.model_validate(answer["model"])
            rest = {k: v for k, v in answer.items() if k not in ("request_id", "model")}
            results.append(BatchItemResult.model_validate({"index": index, **rest}))
        if not any(isinstance(r, BatchItemResult) for r in results):
            with contextlib.suppress(RingserveError):
                info = self.service().model(job.model, job.version)
                model = ModelRef(name=info.name, version=info.version)
        batch = BatchResponse(request_id=job.request_id, model=model, results=results)
        return "done", None, batch.model_dump(mode="json", exclude_none=True)
