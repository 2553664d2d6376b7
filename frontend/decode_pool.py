"""The worker's decode queue: one decode thread behind a queue bounded in images and bytes.

Decoding never runs on the event loop (a 50-megapixel PNG takes seconds to inflate, and the loop
must keep reading the engine's heartbeats meanwhile). One image at a time per worker process: the
worker's other cores belong to the other workers and the engine. A request joins the queue only
while it holds fewer than ``max_images`` images and ``max_bytes`` encoded bytes (an image larger
than ``max_bytes`` on its own is admitted into an empty queue), else it is refused at once with
``QueueFull`` (503 + Retry-After). A request whose deadline passes while it waits gets
``DeadlineExceeded`` at its deadline and is never decoded; an image stays counted until its
decode has really stopped, so the bound holds for the thread, not only for the waiters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ipc.errors import DeadlineExceeded, QueueFull

T = TypeVar("T")


class DecodePool:
    def __init__(self, max_images: int, max_bytes: int) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.images = 0  # queued or being decoded
        self.bytes = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")

    async def run(self, fn: Callable[[], T], size: int, deadline: float) -> T:
        """``fn()`` on the decode thread, before ``deadline`` (``time.monotonic()``) or not at all."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the image could be decoded")
        if self.images >= self.max_images or (self.images and self.bytes + size > self.max_bytes):
            raise QueueFull(f"this worker's decode queue is full ({self.images} images, {self.bytes} bytes queued)")
        loop = asyncio.get_running_loop()
        self.images += 1
        self.bytes += size
        job: Future[T] = self._executor.submit(_before, fn, deadline)
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, size))
        try:
            # On a timeout or a cancellation, wrap_future cancels the job too: a job that has not
            # started is never decoded; a started one finishes and its result is dropped.
            return await asyncio.wait_for(asyncio.wrap_future(job), remaining)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the image waited {remaining:.2f}s in the decode queue; its deadline passed before decoding"
            ) from None

    def _release(self, size: int) -> None:
        self.images -= 1
        self.bytes -= size

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _before(fn: Callable[[], T], deadline: float) -> T:
    if time.monotonic() >= deadline:  # the waiter is giving up at this very moment
        raise DeadlineExceeded("the deadline passed before the image could be decoded")
    return fn()
