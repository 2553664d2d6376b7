"""The worker's view of the engine: a DEALER socket, its ring, and the handshake state.

States: not ready (sending Hello every HELLO_EVERY_S) -> ready (a connected socket, a registered
ring, heartbeats arriving). A model whose input does not fit the ring's slots is served once a
bigger ring replaces it (frontend/rings.py); meanwhile a request for it is a 503. A closed
connection (seen at once through the socket's monitor), a heartbeat gap longer than
``heartbeat_timeout_s`` or a new engine instance id means the engine is gone: every in-flight
request fails at once with EngineUnavailable, all slots come back, and the handshake starts again.
The worker itself never needs a restart. A gap is the engine's only when nothing of it waits unread
in our socket: a worker whose own loop stalled (paused, starved of CPU) finds the engine's
heartbeats queued there, and must not take its own pause for the engine's death.

Ready means the send path works: with IMMEDIATE, a send on a socket whose connection is gone fails
at once, so readiness follows the connection itself, not only the last handshake. Each background
task is supervised: one that ends is logged and started again.
"""

from __future__ import annotations

import asyncio
import collections
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
from zmq.utils.monitor import parse_monitor_message

from frontend.background import Supervised
from frontend.rings import Rings, input_bytes
from ipc import messages as m
from ipc.errors import DeadlineExceeded, EngineUnavailable, ModelNotFound, QueueFull, from_reason
from ipc.ring import Ring
from ipc.sockets import DEFAULT_HWM, engine_address, make_socket

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
        on_result: Callable[[m.Result], None] | None = None,
    ) -> None:
        from pathlib import Path

        self.address = engine_address(Path(run_dir))
        self.slots = slots
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.identity = f"w{os.getpid()}-{uuid.uuid4().hex[:6]}".encode()
        self.ctx = zmq.asyncio.Context()
        self.sock = make_socket(self.ctx, self.address, zmq.DEALER, bind=False, identity=self.identity, connect=False)
        # The monitor before the connect: a handshake it did not see would leave us never ready.
        self._monitor_sock = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.sock.connect(self.address)
        self.rings = Rings(slots)
        self._on_result = on_result  # every Result, answered in time or not (the queue-wait metric)
        self.ready: m.Ready | None = None
        self.instance = ""
        self.models: dict[tuple[str, int], m.ModelInfo] = {}
        self.latest: dict[str, int] = {}
        self.upcoming: dict[tuple[str, int], m.ModelInfo] = {}  # served by the engine, too big for our ring
        self.pending: dict[tuple[int, int], Pending] = {}
        self.engine_losses = 0
        self.connected = False
        self._heard = False  # a message of the engine arrived since the watch's last tick
        self._last_hello = 0.0
        self._tasks = Supervised()
        self._on_ring_change = on_ring_change or (lambda in_use, slots: None)
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def fault(self) -> str:  # why this worker cannot serve although the engine is there
        return self.rings.fault

    @property
    def ring(self) -> Ring | None:  # the registered ring: new requests take their slots from it
        return self.rings.current

    def _ring_changed(self) -> None:
        self._on_ring_change(self.rings.in_use, self.slots if self.ring is not None else 0)
        ring = self.ring
        free = ring.slots - ring.in_use if ring is not None else 0
        # a slot came back (or the ring was replaced, or the engine let go of all of them): the
        # requests waiting for one go on, in arrival order, one per free slot
        while self._slot_waiters and (free > 0 or ring is None or not self.is_ready):
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    async def _lease(self, timeout: float) -> tuple[Ring, int, int]:
        """A slot of the current ring. When every slot is taken, wait for one within the request's
        deadline, behind at most one ring's worth of other waiting requests; past that, 503 at once.

        The ring bounds what one worker has in flight, not what it accepts: connections do not
        spread evenly over the workers (the one that wakes first accepts a whole burst), so a
        worker whose slots are all taken while the box has room would refuse requests the engine
        could serve. Past a second ring's worth the worker is overloaded for real: 503.
        """
        deadline = time.monotonic() + timeout
        woken = False  # a woken waiter goes before those still waiting; a newcomer never does
        while True:
            if not self.is_ready or self.ring is None:
                raise EngineUnavailable(self.fault or "the engine is not connected")
            ring = self.ring
            if ring.in_use < ring.slots and (woken or not self._slot_waiters):
                slot, generation = ring.acquire()
                return ring, slot, generation
            if len(self._slot_waiters) >= ring.slots:
                raise QueueFull(
                    f"all {ring.slots} ring slots of this worker are in use and {len(self._slot_waiters)} "
                    "requests wait for one"
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, deadline - time.monotonic())
            except TimeoutError:
                raise DeadlineExceeded("no ring slot of this worker came free within the deadline") from None
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
            woken = True  # round again: the slot may have gone to a newcomer, or the engine away

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._tasks.start(self._receive, "engine-receive")
        self._tasks.start(self._watch, "engine-watch")
        self._tasks.start(self._monitor, "engine-monitor")

    async def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            await self.sock.send(m.encode(m.Bye(os.getpid())), zmq.NOBLOCK)
        await self._tasks.close()
        self._fail_all("the worker is stopping")
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor_sock.close(linger=0)
        self.sock.close(linger=0)
        self.ctx.term()
        self.rings.close()

    @property
    def is_ready(self) -> bool:
        return self.ready is not None and self.connected and self.ring_fits

    @property
    def ring_fits(self) -> bool:
        """Our ring's slots hold the input of every model the engine serves."""
        needed = max(map(input_bytes, self.models.values()), default=0)
        return self.ring is not None and self.ring.slot_bytes >= needed

    # ----------------------------------------------------------------- requests
    def resolve(self, model: str, version: int | None) -> m.ModelInfo:
        if not self.is_ready:
            raise EngineUnavailable(self.fault or "the engine is not connected")
        info = self.models.get((model, self.latest.get(model, 0) if version is None else version))
        if info is not None:
            return info
        if any(n == model and version in (None, v) for n, v in self.upcoming):
            why = self.fault or "its ring is being replaced to fit it"
            raise EngineUnavailable(f"model {model!r} is served but not yet by this worker: {why}")
        raise ModelNotFound(f"model {model!r} {'' if version is None else f'version {version} '}is not served")

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
        grouped: bool = False,
    ) -> m.Result:
        """Write the pixels into a free slot with ``fill`` and wait for the engine's answer."""
        timeout = await self.rings.settle(timeout)  # while a bigger ring is being registered
        leased = time.monotonic()
        ring, slot, generation = await self._lease(timeout)
        timeout -= time.monotonic() - leased
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
            grouped=grouped,
            ring=ring.name,
        )
        try:
            await self.sock.send(m.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            ring.release(slot, generation)
            self._ring_changed()
            # With IMMEDIATE, EAGAIN means either a full pipe or no pipe at all. The pipe holds
            # at most the requests still pending (each holds a slot), so below the high-water
            # mark it is no pipe: the engine just died and the monitor has not said so yet.
            if not self.connected or len(self.pending) < DEFAULT_HWM:
                raise EngineUnavailable("the connection to the engine closed") from None
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
            payload = await self.sock.recv()
            try:
                msg = m.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("dropped an undecodable engine message: {}", exc)
                continue
            self._heard = True
            for one in m.unpack(msg):
                try:
                    self._dispatch(one)
                except Exception:  # one bad message must not end the task that receives all of them
                    logger.exception("failed to handle a {} from the engine", type(one).__name__)

    def _dispatch(self, msg: m.Message) -> None:
        if isinstance(msg, (m.Result, m.Error)):
            self._complete(msg)
        elif isinstance(msg, m.Heartbeat):
            if self.ready is not None and msg.instance != self.instance:
                self._lost(f"engine instance changed to {msg.instance}")
        elif isinstance(msg, m.Ready):
            self._on_ready(msg)

    async def _monitor(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor_sock.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected = False
                if self.ready is not None:
                    self._lost("the connection to the engine closed")

    def _complete(self, msg: m.Result | m.Error) -> None:
        self.rings.release(msg.slot, msg.generation)
        self._ring_changed()
        if self._on_result is not None and isinstance(msg, m.Result):
            self._on_result(msg)
        pending = self.pending.pop((msg.slot, msg.generation), None)
        if pending is None or pending.future.done():
            return
        if isinstance(msg, m.Result):
            pending.future.set_result(msg)
        else:
            pending.future.set_exception(from_reason(msg.reason, msg.detail))
            if msg.reason == EngineUnavailable.reason and self.ready is not None:
                self._lost(f"the engine does not know this worker: {msg.detail}")

    def _on_ready(self, msg: m.Ready) -> None:
        if self.ready is not None and msg.instance != self.instance:
            self._lost(f"engine instance changed to {msg.instance}")
        if self.rings.next is not None and msg.ring == self.rings.next.name:
            self.rings.end(msg.registered)  # the engine took our bigger ring, or refused it (it logs why)
            self._ring_changed()
        ring = self.ring
        # Not ready, only the answer to our Hello counts; ready, announcements of the model set too.
        answers = ring is not None and (msg.ring == ring.name or (self.ready is not None and not msg.ring))
        if msg.registered and ring is not None and answers:
            self._serve(msg)
        elif not msg.registered and self.ready is None and (ring is None or ring.slot_bytes < msg.slot_bytes):
            if self.rings.fresh(msg.slot_bytes):  # once every slot of the old one is back
                self._ring_changed()
                self._last_hello = 0.0  # register the new ring on the next watch tick
        # else refused for another reason (logged by the engine): Hello again at the next tick

    def _serve(self, msg: m.Ready) -> None:
        """The models our ring's slots hold are served now; the others after a bigger ring."""
        if self.ready is None:
            logger.info("engine {} ready: {} models", msg.instance, len(msg.models))
        self.ready, self.instance = msg, msg.instance
        self.models, self.upcoming = self.rings.split(msg.models)
        self.latest = {name: max(v for n, v in self.models if n == name) for name, _ in self.models}

    async def _watch(self) -> None:
        silence = 0.0  # the engine's silence, in our own running time (see the module's docstring)
        tick = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_EVERY_S)  # a polling period, not a synchronisation wait
            now = time.monotonic()
            elapsed, tick = now - tick, now
            # A late tick is our stall, not the engine's: it counts for two periods at most.
            silence = 0.0 if self._heard or self.ready is None else silence + min(elapsed, 2 * WATCH_EVERY_S)
            self._heard = False
            if silence > self.heartbeat_timeout_s and not self._unread():
                self._lost(f"no heartbeat for {silence:.2f}s")
                silence = 0.0
            hello = None
            if self.ready is not None:  # a bigger ring when a model needs one (frontend/rings.py)
                hello = self.rings.resize(max(map(input_bytes, self.upcoming.values()), default=0), now)
            elif now - self._last_hello > HELLO_EVERY_S:
                self._last_hello = now
                ring = self.ring
                hello = (
                    m.Hello(os.getpid(), ring.name, ring.slots, ring.slot_bytes)
                    if ring is not None and not ring.in_use
                    else m.Hello(os.getpid())
                )
            if hello is not None:
                with contextlib.suppress(zmq.Again):
                    await self.sock.send(m.encode(hello), zmq.NOBLOCK)

    def _unread(self) -> bool:
        """Messages of the engine wait in the socket (the receive task has not had its turn yet)."""
        return bool(int(self.sock.get(zmq.EVENTS)) & zmq.POLLIN)

    def _lost(self, why: str) -> None:
        logger.warning("engine lost: {}; failing {} in-flight requests", why, len(self.pending))
        self.engine_losses += 1
        self.ready = None
        self._fail_all("the engine is unavailable")
        self.rings.reset()
        self._ring_changed()

    def _fail_all(self, why: str) -> None:
        pending, self.pending = self.pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(EngineUnavailable(why))
