"""The engine's IO loop: one ROUTER socket, validation, dispatch to batchers, heartbeats.

Batcher threads never touch the ROUTER (ZeroMQ sockets are not thread-safe): they append replies
to an outbox and wake this loop over an inproc socket, once per burst, and the loop sends them, one
message per worker (``Replies`` where a burst holds several of its answers).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import zmq
from loguru import logger

from engine import metrics
from engine import models as model_loader
from engine.batcher import Answer, Batcher, Job
from engine.control import LifecycleSettings
from engine.lifecycle import Lifecycle
from engine.repository import ModelConfig
from engine.session import ProviderUnavailable, choose_providers, quiet_ort
from engine.workers import Worker, map_ring
from ipc import messages as m
from ipc.errors import BadInput, DeadlineExceeded, EngineUnavailable, ModelNotFound, RingserveError
from ipc.shm import pid_alive, remove_orphans
from ipc.sockets import (
    STARTS_FILE,
    RunDirBusy,
    engine_address,
    lock_run_dir,
    make_socket,
    prepare_run_dir,
    socket_path,
)

_REPLIES = "inproc://replies"
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)  # once: or-ing pyzmq's Flag enums costs 0.8 us a time
EXIT_THREAD_DIED = 70  # EX_SOFTWARE: a supervisor restarts the engine


@dataclass(frozen=True)
class EngineSettings:
    repo: Path
    run_dir: Path
    models: list[str] = field(default_factory=list)
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0: auto (see plan_instances)
    instances: int = 0  # concurrent runners per model version; 0: auto (see plan_instances)
    cpu_max_batch: int = -1  # the largest batch on the CPU; -1: measured at load, 0: the model's (plan_batch)
    providers: str = "auto"  # auto | cpu | cuda
    heartbeat_s: float = 0.2
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)


class Engine:
    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.instance = uuid.uuid4().hex[:12]
        self.batchers: dict[tuple[str, int], Batcher] = {}
        self.latest: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.providers: list[str] = []
        self.workers: dict[bytes, Worker] = {}
        self._stop = threading.Event()
        self._local = threading.local()
        # Answers from the batcher threads: (worker identity, ring, slot, encoded message). A
        # batcher wakes the loop only when no wake is pending (one inproc message per burst, not
        # per reply); the flag is reset before the outbox is drained, so no reply waits for a wake.
        self._outbox: deque[tuple[bytes, str, int, bytes]] = deque()
        self._wake_pending = False
        self._fed: set[Batcher] = set()  # batchers given jobs in this burst: woken once at its end
        self._ctx = zmq.Context()
        self.restarts = 0
        self.ort_cache = settings.lifecycle.cache(settings.repo)
        self.lifecycle = Lifecycle(self, settings.lifecycle)
        self.exit_code = 0

    # ----------------------------------------------------------------- lifecycle
    def load(self) -> None:
        quiet_ort()
        providers = choose_providers(self.settings.providers)
        logger.info("providers {}", providers)
        self.lifecycle.initial_load(providers)

    def _load_version(
        self, cfg: ModelConfig, version: int, providers: list[str]
    ) -> tuple[model_loader.LoadedModel, int]:
        """Load with the instance and thread plan that suits the model (see plan_instances)."""
        plan = model_loader.Plan(self.settings.instances, self.settings.threads, self.settings.cpu_max_batch)
        return model_loader.load_planned(cfg, version, providers, plan, self.ort_cache)

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def serve(self) -> None:
        from ipc.metrics_dir import compact, ensure_env

        prepare_run_dir(self.settings.run_dir)
        self._run_dir_lock = lock_run_dir(self.settings.run_dir, "engine.lock")  # one engine per run dir
        try:
            compact(ensure_env(self.settings.run_dir))
        except (OSError, ValueError) as exc:
            logger.warning("could not fold old metric files: {}", exc)
        self.restarts = count_start(self.settings.run_dir)
        metrics.RESTARTS.set(self.restarts)
        for name in remove_orphans():
            logger.warning("removed orphan segment {}", name)
        self.load()
        for batcher in self.batchers.values():
            batcher.start()
        metrics.BUILD.labels(_version(), ",".join(self.providers) or "none").set(1)
        address = engine_address(self.settings.run_dir)
        router = make_socket(self._ctx, address, zmq.ROUTER, bind=True)
        replies = self._ctx.socket(zmq.PULL)
        replies.bind(_REPLIES)
        logger.info("engine {} ready on {} serving {}", self.instance, address, sorted(self.batchers))
        try:
            self._loop(router, replies)
        finally:
            batchers = [*self.batchers.values(), *self.lifecycle.stop()]
            for batcher in batchers:
                batcher.stop()
            for batcher in batchers:
                batcher.join(timeout=5)
            for worker in self.workers.values():
                worker.close()
            router.close()
            replies.close()
            self._ctx.term()
            path = socket_path(address)
            if path is not None:
                path.unlink(missing_ok=True)
            logger.info("engine {} stopped", self.instance)

    def _loop(self, router: zmq.Socket[bytes], replies: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        hb_every = self.settings.heartbeat_s
        next_hb = next_reap = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(timeout=int(hb_every * 1000)))
            if replies in events:
                while True:
                    try:
                        replies.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                self._wake_pending = False
                self._flush(router)
            if router in events:
                for _ in range(256):
                    try:
                        frames = _recv(router)
                    except zmq.Again:
                        break
                    self._handle(router, frames)
                self._wake_fed()
            now = time.monotonic()
            if now >= next_hb:
                next_hb = now + hb_every
                beat = m.encode(m.Heartbeat(self.instance, sum(b.depth for b in self.batchers.values())))
                for identity, worker in list(self.workers.items()):
                    if worker.ring is not None:
                        self._send(router, identity, beat)
            if now >= next_reap:
                next_reap = now + 1.0
                self._forget_dead_workers()
            self.lifecycle.tick(router)  # loads, swaps and unloads; tells the workers the new model set
            if self._dead_threads():
                return

    def _flush(self, router: zmq.Socket[bytes]) -> None:
        """Send what the batchers answered: one message per worker, a Replies where it is several
        (a light model's batch of 38 cost 76 sends of the loop and 38 receives of its workers)."""
        answers: dict[bytes, list[bytes]] = {}
        outbox = self._outbox
        while outbox:
            identity, ring, slot, payload = outbox.popleft()
            worker = self.workers.get(identity)
            if worker is not None:
                worker.answered(ring, slot)
            answers.setdefault(identity, []).append(payload)
        for identity, payloads in answers.items():
            self._send(router, identity, payloads[0] if len(payloads) == 1 else m.bundle(payloads))

    def _wake_fed(self) -> None:
        """Wake the batchers given jobs in this burst, once each. In a method of its own: a loop
        variable in _loop would keep the last batcher (and its session) alive after an unload."""
        for batcher in self._fed:
            batcher.wake()
        self._fed.clear()

    def _dead_threads(self) -> list[str]:
        """A batcher thread that ended leaves its model with a hole: exit so that we are restarted."""
        dead = [name for b in self.batchers.values() for name in b.dead()]
        if dead:
            metrics.THREAD_DEATHS.inc(len(dead))
            logger.error("engine thread(s) {} died; exiting to be restarted", dead)
            self.exit_code = EXIT_THREAD_DIED
        return dead

    # ----------------------------------------------------------------- messages
    def _send(self, router: zmq.Socket[bytes], identity: bytes, payload: bytes) -> None:
        try:  # two sends, not send_multipart: its checks of every frame cost more than the sends
            router.send(identity, _MORE_NOBLOCK)
            router.send(payload, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # peer gone (ROUTER_MANDATORY) or its queue is full
            logger.debug("reply to {!r} dropped: {}", identity, exc)

    def _handle(self, router: zmq.Socket[bytes], frames: list[bytes]) -> None:
        if len(frames) != 2:
            logger.warning("dropped a message of {} frames", len(frames))
            return
        identity, payload = frames
        try:
            msg = m.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            logger.warning("dropped an undecodable message from {!r}: {}", identity, exc)
            return
        if isinstance(msg, m.Infer):
            self._infer(router, identity, msg)
        elif isinstance(msg, m.Hello):
            self._hello(router, identity, msg)
        elif isinstance(msg, m.Bye):
            self._forget(identity)
        elif isinstance(msg, m.Control):
            self.lifecycle.control(router, identity, msg)
        else:
            logger.warning("dropped an unexpected {} from {!r}", type(msg).__name__, identity)

    @property
    def slot_bytes(self) -> int:
        """What a ring slot must hold: the largest input of every model served."""
        return max((int(np.prod(b.model.input_shape)) for b in self.batchers.values()), default=1)

    def ready_message(self, registered: bool, ring: str = "") -> m.Ready:
        return m.Ready(
            instance=self.instance,
            models=[b.model.info for b in self.batchers.values()],
            providers=self.providers,
            slot_bytes=self.slot_bytes,
            registered=registered,
            restarts=self.restarts,
            failed=self.failed,
            states=self.lifecycle.states(),
            control=self.settings.lifecycle.control,
            ring=ring,
        )

    def _hello(self, router: zmq.Socket[bytes], identity: bytes, msg: m.Hello) -> None:
        worker = self.workers.get(identity)
        current = worker.ring.name if worker is not None and worker.ring is not None else None
        if worker is not None and msg.replaces and msg.pid == worker.pid and current in (msg.ring, msg.replaces):
            # A bigger ring while serving (or the same Hello again): the old ring's jobs run on.
            registered = current == msg.ring
            if not registered:
                ring = map_ring(msg, self.slot_bytes)
                if ring is not None:
                    worker.replace(ring)
                    registered = True
                    logger.info("worker {} replaced ring {} by {}", msg.pid, msg.replaces, msg.ring)
        else:
            self._forget(identity)
            ring = map_ring(msg, self.slot_bytes) if msg.ring else None
            if ring is not None:
                self.workers[identity] = Worker(msg.pid, ring)
                logger.info("worker {} registered ring {} ({} slots)", msg.pid, msg.ring, msg.slots)
            registered = ring is not None
        self._send(router, identity, m.encode(self.ready_message(registered, msg.ring)))

    def _infer(self, router: zmq.Socket[bytes], identity: bytes, msg: m.Infer) -> None:
        try:
            job, batcher = self._validate(identity, msg)
            batcher.submit(job)
        except RingserveError as exc:
            logger.bind(request_id=msg.req_id).warning("rejected: {}: {}", exc.reason, exc.detail)
            metrics.ENGINE_ERRORS.labels(exc.reason).inc()
            err = m.Error(msg.req_id, msg.slot, msg.generation, exc.reason, exc.detail)
            self._send(router, identity, m.encode(err))
            return
        self._fed.add(batcher)
        self.workers[identity].busy.add(msg.slot)

    def _validate(self, identity: bytes, msg: m.Infer) -> tuple[Job, Batcher]:
        worker = self.workers.get(identity)
        if worker is None or worker.ring is None:
            # A worker that still believes in a previous engine instance: it must re-register.
            raise EngineUnavailable(f"this worker is not registered with engine {self.instance}; send Hello")
        batcher = self.lifecycle.route((msg.model, msg.version))
        if batcher is None:
            raise ModelNotFound(f"model {msg.model} version {msg.version} is not loaded")
        if (msg.height, msg.width, 3) != batcher.model.input_shape:
            raise BadInput(f"shape {msg.height}x{msg.width} does not match the model input")
        if msg.ring and msg.ring != worker.ring.name:
            raise BadInput(f"ring {msg.ring} is not this worker's registered ring {worker.ring.name}")
        if msg.slot in worker.busy:
            raise BadInput(f"slot {msg.slot} is already in use by a queued request")
        pixels = worker.ring.view(msg.slot, batcher.model.input_shape)
        if msg.deadline < time.time():
            raise DeadlineExceeded("deadline passed before the engine received the request")
        return Job(identity, msg, pixels, time.perf_counter()), batcher

    def _reply_from_batcher(self, answers: list[Answer]) -> None:
        # Encoded here, in the batcher's thread: an answer that cannot be encoded fails its batch
        # (the batcher answers every job of it with an error), not the loop. extend() of a list is
        # one C call: the loop never sends part of a batch's answers.
        self._outbox.extend([(job.identity, job.msg.ring, job.msg.slot, m.encode(msg)) for job, msg in answers])
        if self._wake_pending:
            return
        self._wake_pending = True
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(_REPLIES)
            self._local.push = sock
        sock.send(b"")

    # ----------------------------------------------------------------- workers
    def _forget(self, identity: bytes) -> None:
        worker = self.workers.pop(identity, None)
        if worker is not None:
            worker.close()

    def _forget_dead_workers(self) -> None:
        for identity, worker in list(self.workers.items()):
            if not pid_alive(worker.pid):
                logger.info("worker {} is gone; forgetting its ring", worker.pid)
                self._forget(identity)


def _recv(router: zmq.Socket[bytes]) -> list[bytes]:
    """One message's frames (raises zmq.Again when none is waiting): recv_multipart's work without
    its per-frame option lookups, which cost as much as the engine's validation of a request."""
    frames = [router.recv(zmq.NOBLOCK)]
    while router.getsockopt(zmq.RCVMORE):  # a message arrives whole: the rest is already here
        frames.append(router.recv(zmq.NOBLOCK))
    return frames


def count_start(run_dir: Path) -> int:
    """Starts of the engine in this run directory, minus one: its restarts, under any supervisor.

    ``ringserve serve`` removes the file when the appliance starts; under supervisord it lives as
    long as the run directory.
    """
    path = run_dir / STARTS_FILE
    try:
        starts = int(path.read_text()) + 1
    except (FileNotFoundError, ValueError):
        starts = 1
    path.write_text(str(starts))
    return starts - 1


def run(settings: EngineSettings) -> None:
    engine = Engine(settings)
    signal.signal(signal.SIGTERM, engine.request_stop)
    signal.signal(signal.SIGINT, engine.request_stop)
    try:
        engine.serve()
    except (ProviderUnavailable, RunDirBusy) as exc:
        logger.error("{}", exc)
        raise SystemExit(2) from None
    if engine.exit_code:
        raise SystemExit(engine.exit_code)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ringserve")
    except PackageNotFoundError:
        return "0.0.0"
