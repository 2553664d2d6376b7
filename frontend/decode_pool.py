"""The worker's decode queue: one decode thread behind a queue bounded in images and bytes.

Decoding never runs on the event loop (a 50-megapixel PNG takes seconds to inflate, and the loop
must keep reading the engine's heartbeats meanwhile). One image at a time per worker process: the
worker's other cores belong to the other workers and the engine. A request joins the queue only
while it holds fewer than ``max_images`` images and ``max_bytes`` encoded bytes (an image larger
than ``max_bytes`` on its own is admitted into an empty queue), else it is refused at once with
``QueueFull`` (503 + Retry-After). A request whose deadline passes while it waits gets
``DeadlineExceeded`` at its deadline and is never decoded; an image stays counted until its
decode has really stopped, so the bound holds for the thread, not only for the waiters.

The hand-off is one queue put, one asyncio future and one ``call_soon_threadsafe`` back, where a
``ThreadPoolExecutor`` with ``wrap_future`` and ``wait_for`` made a concurrent future, a second
future chained to it and a timeout per image: 37-48 us of CPU per hand-off before, 17-25 us now
(a microbenchmark on uvloop, this 2-core box). Under Lite0 load the gain is within the box's noise.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ipc.errors import DeadlineExceeded, EngineUnavailable, QueueFull

T = TypeVar("T")


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    size: int
    deadline: float  # time.monotonic()
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future[None]  # set once ``value`` or ``error`` is in
    value: T | None = None  # handed over through the job, never kept by the thread or the future
    error: BaseException | None = None
    started: bool = False  # the thread took it (under the pool's lock)
    dropped: bool = False  # its waiter left before it started: the thread skips it
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class DecodePool:
    def __init__(self, max_images: int, max_bytes: int) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.images = 0  # queued or being decoded
        self.bytes = 0
        self._lock = threading.Lock()  # a job is either started by the thread or dropped by its waiter
        self._jobs: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="decode", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[], T], size: int, deadline: float) -> T:
        """``fn()`` on the decode thread, before ``deadline`` (``time.monotonic()``) or not at all."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the image could be decoded")
        if self.images >= self.max_images or (self.images and self.bytes + size > self.max_bytes):
            raise QueueFull(f"this worker's decode queue is full ({self.images} images, {self.bytes} bytes queued)")
        if self._closed:
            raise EngineUnavailable("this worker is stopping")
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, size, deadline, loop, loop.create_future())
        self.images += 1
        self.bytes += size
        job.timer = loop.call_later(remaining, self._expire, job, remaining)
        self._jobs.put(job)
        try:
            await job.done
            value, job.value = job.value, None
            return value  # type: ignore[return-value]  # set by _take when done carries no error
        finally:
            job.timer.cancel()
            self._drop(job)  # a cancelled waiter (its client left): a job not started never runs

    def _expire(self, job: _Job[Any], waited: float) -> None:
        if not job.done.done():
            job.done.set_exception(
                DeadlineExceeded(
                    f"the image waited {waited:.2f}s in the decode queue; its deadline passed before decoding"
                )
            )
        self._drop(job)

    def _drop(self, job: _Job[Any]) -> None:
        with self._lock:
            if job.started or job.dropped:
                return  # the thread counts it out when the decode has stopped
            job.dropped = True
        self._release(job.size)

    def _release(self, size: int) -> None:
        self.images -= 1
        self.bytes -= size

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._take(job)
            del job  # a dropped job's image bytes are not held while the thread waits for the next

    def _take(self, job: _Job[Any]) -> None:
        with self._lock:
            if job.dropped:
                return
            job.started = True
        if self._closed:
            job.error = EngineUnavailable("this worker is stopping")
        elif time.monotonic() >= job.deadline:  # its waiter is giving up at this very moment
            job.error = DeadlineExceeded("the deadline passed before the image could be decoded")
        else:
            try:
                job.value = job.fn()
            except Exception as exc:
                job.error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            job.loop.call_soon_threadsafe(self._finish, job)

    def _finish(self, job: _Job[Any]) -> None:
        self._release(job.size)
        if job.done.done():  # the waiter gave up while it ran: the result is dropped
            job.value = job.error = None
        elif job.error is not None:
            job.done.set_exception(job.error)
            job.error = None
        else:
            job.done.set_result(None)

    def close(self) -> None:
        """The thread finishes the decode it runs, refuses those that wait and stops."""
        self._closed = True
        self._jobs.put(None)
