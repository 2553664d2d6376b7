"""The worker's view of the engine: a DEALER socket, its ring, and the handshake state.

States: not ready (sending Hello every HELLO_EVERY_S) -> ready (registered ring, heartbeats
arriving). A heartbeat gap longer than ``heartbeat_timeout_s`` or a new engine instance id means
the engine is gone: every in-flight request fails at once with EngineUnavailable, all slots come
back, and the handshake starts again. The worker itself never needs a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np
import zmq
import zmq.asyncio
from loguru import logger

from ipc import messages as m
from ipc.errors import DeadlineExceeded, EngineUnavailable, ModelNotFound, QueueFull, from_reason
from ipc.ring import Ring
from ipc.sockets import engine_address, make_socket

HELLO_EVERY_S = 0.25
WATCH_EVERY_S = 0.05


@dataclass
class Pending:
    future: asyncio.Future[m.Result]
    req_id: str


class EngineClient:
    def __init__(
        self,
        run_dir: os.PathLike[str] | str,
        slots: int,
        heartbeat_timeout_s: float,
        on_ring_change: Callable[[int, int], None] | None = None,
    ) -> None:
        from pathlib import Path

        self.address = engine_address(Path(run_dir))
        self.slots = slots
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.identity = f"w{os.getpid()}-{uuid.uuid4().hex[:6]}".encode()
        self.ctx = zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, self.address, zmq.DEALER, bind=False, identity=self.identity)
        self.ring: Ring | None = None
        self.ready: m.Ready | None = None
        self.instance = ""
        self.models: dict[tuple[str, int], m.ModelInfo] = {}
        self.latest: dict[str, int] = {}
        self.pending: dict[tuple[int, int], Pending] = {}
        self.engine_losses = 0
        self._last_seen = 0.0
        self._last_hello = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._on_ring_change = on_ring_change or (lambda in_use, slots: None)

    def _ring_changed(self) -> None:
        if self.ring is not None:
            self._on_ring_change(self.ring.in_use, self.ring.slots)

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive(), name="engine-receive"),
            asyncio.create_task(self._watch(), name="engine-watch"),
        ]

    async def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send(m.encode(m.Bye(os.getpid())), zmq.NOBLOCK)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_all("the worker is stopping")
        self.sock.close(linger=0)
        self.ctx.term()
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    @property
    def is_ready(self) -> bool:
        return self.ready is not None

    # ----------------------------------------------------------------- requests
    def resolve(self, model: str, version: int | None) -> m.ModelInfo:
        if not self.is_ready:
            raise EngineUnavailable("the engine is not connected")
        if version is None:
            if model not in self.latest:
                raise ModelNotFound(f"model {model!r} is not served")
            version = self.latest[model]
        info = self.models.get((model, version))
        if info is None:
            raise ModelNotFound(f"model {model!r} version {version} is not served")
        return info

    async def infer(
        self,
        info: m.ModelInfo,
        fill: Callable[[np.ndarray], None],
        *,
        req_id: str,
        timeout: float,
        confidence: float = -1.0,
        max_detections: int = 0,
        raw: bool = False,
    ) -> m.Result:
        """Write the pixels into a free slot with ``fill`` and wait for the engine's answer."""
        if self.ready is None or self.ring is None:
            raise EngineUnavailable("the engine is not connected")
        ring = self.ring
        slot, generation = ring.acquire()
        self._ring_changed()
        shape = (info.input.height, info.input.width, 3)
        try:
            fill(ring.view(slot, shape))
        except BaseException:
            ring.release(slot, generation)
            self._ring_changed()
            raise
        msg = m.Infer(
            req_id=req_id,
            model=info.name,
            version=info.version,
            slot=slot,
            generation=generation,
            height=shape[0],
            width=shape[1],
            deadline=time.time() + timeout,
            confidence=confidence,
            max_detections=max_detections,
            raw=raw,
        )
        try:
            await self.sock.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            ring.release(slot, generation)
            self._ring_changed()
            raise QueueFull("the engine's socket queue is full") from None
        future: asyncio.Future[m.Result] = asyncio.get_running_loop().create_future()
        self.pending[(slot, generation)] = Pending(future, req_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            # The slot stays held until the engine answers (or is declared gone).
            raise DeadlineExceeded(f"no answer from the engine within {timeout:.1f}s") from None

    # ----------------------------------------------------------------- engine messages
    async def _receive(self) -> None:
        while True:
            try:
                payload = await self.sock.recv()
                msg = m.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("dropped an undecodable engine message: {}", exc)
                continue
            self._last_seen = time.monotonic()
            if isinstance(msg, (m.Result, m.Error)):
                self._complete(msg)
            elif isinstance(msg, m.Heartbeat):
                if self.ready is not None and msg.instance != self.instance:
                    self._lost(f"engine instance changed to {msg.instance}")
            elif isinstance(msg, m.Ready):
                await self._on_ready(msg)

    def _complete(self, msg: m.Result | m.Error) -> None:
        if self.ring is not None:
            self.ring.release(msg.slot, msg.generation)
            self._ring_changed()
        pending = self.pending.pop((msg.slot, msg.generation), None)
        if pending is None or pending.future.done():
            return
        if isinstance(msg, m.Result):
            pending.future.set_result(msg)
        else:
            pending.future.set_exception(from_reason(msg.reason, msg.detail))
            if msg.reason == EngineUnavailable.reason and self.ready is not None:
                self._lost(f"the engine does not know this worker: {msg.detail}")

    async def _on_ready(self, msg: m.Ready) -> None:
        if self.ready is not None and msg.instance != self.instance:
            self._lost(f"engine instance changed to {msg.instance}")
        if msg.registered:
            if self.ready is None:
                logger.info("engine {} ready: {} models", msg.instance, len(msg.models))
            self.ready, self.instance = msg, msg.instance
            self.models = {(x.name, x.version): x for x in msg.models}
            self.latest = {}
            for x in msg.models:
                self.latest[x.name] = max(x.version, self.latest.get(x.name, 0))
            return
        if self.ring is None or self.ring.slot_bytes < msg.slot_bytes:
            if self.ring is not None:
                if self.ring.in_use:
                    return  # replace the ring only once all of its slots are back
                self.ring.close()
            self.ring = Ring(self.slots, msg.slot_bytes)
            self._ring_changed()
            self._last_hello = 0.0  # register the new ring on the next watch tick

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY_S)  # a polling period, not a synchronisation wait
            now = time.monotonic()
            if self.ready is not None and now - self._last_seen > self.heartbeat_timeout_s:
                self._lost(f"no heartbeat for {now - self._last_seen:.2f}s")
            if self.ready is None and now - self._last_hello > HELLO_EVERY_S:
                self._last_hello = now
                ring = self.ring
                hello = (
                    m.Hello(os.getpid(), ring.name, ring.slots, ring.slot_bytes)
                    if ring is not None and not ring.in_use
                    else m.Hello(os.getpid())
                )
                with contextlib.suppress(zmq.Again):
                    await self.sock.send(m.encode(hello), zmq.NOBLOCK)

    def _lost(self, why: str) -> None:
        logger.warning("engine lost: {}; failing {} in-flight requests", why, len(self.pending))
        self.engine_losses += 1
        self.ready = None
        self._fail_all("the engine is unavailable")
        if self.ring is not None:
            self.ring.release_all()
            self._ring_changed()

    def _fail_all(self, why: str) -> None:
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(EngineUnavailable(why))
