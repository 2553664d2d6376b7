"""Background tasks of a worker that cannot end silently: one that ends is logged and started again.

A task that keeps ending (more than MAX_RESTARTS within WINDOW_S) cannot be recovered in place: the
worker then stops itself (SIGTERM), and its supervisor (uvicorn, supervisord) starts a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

Run = Callable[[], Coroutine[Any, Any, None]]
MAX_RESTARTS = 5
WINDOW_S = 10.0


class Supervised:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self.restarts: list[float] = []

    def start(self, run: Run, name: str) -> None:
        task = asyncio.create_task(run(), name=name)
        task.add_done_callback(lambda done: self._ended(done, run, name))
        self._tasks[name] = task

    def _ended(self, done: asyncio.Task[None], run: Run, name: str) -> None:
        if self._closing or done.cancelled():
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < WINDOW_S] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            logger.opt(exception=done.exception()).critical(
                "background task {} keeps ending ({} times in {:.0f}s); stopping the worker",
                name,
                len(self.restarts),
                WINDOW_S,
            )
            os.kill(os.getpid(), signal.SIGTERM)
            return
        logger.opt(exception=done.exception()).error("background task {} ended; starting it again", name)
        self.start(run, name)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
