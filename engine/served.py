"""The pieces the model lifecycle moves between its threads: counted batchers and events."""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass, field

from engine.batcher import Answer, Batcher, Job, Reply
from engine.models import LoadedModel
from engine.watch import Fingerprint, Snapshot, Want
from ipc import messages as m

Key = tuple[str, int]


class Counted(Batcher):
    """A batcher that knows how many of its requests are unanswered, and when the last one came."""

    def __init__(self, model: LoadedModel, reply: Reply, instances: int) -> None:
        self._lock = threading.Lock()
        self.inflight = 0
        self.last_submit = 0.0
        self.started = False

        def counted(answers: list[Answer]) -> None:
            with self._lock:
                self.inflight -= len(answers)
            reply(answers)

        super().__init__(model, counted, instances)

    def start(self) -> None:
        self.started = True
        super().start()

    def join(self, timeout: float) -> None:
        if self.started:
            super().join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            self.inflight += 1
            self.last_submit = time.monotonic()
        try:
            super().submit(job)
        except BaseException:
            with self._lock:
                self.inflight -= 1
            raise


@dataclass
class Retiring:
    key: Key
    batcher: Counted
    since: float


@dataclass
class Pending:
    identity: bytes
    msg: m.Control
    keys: set[Key] = field(default_factory=set)


@dataclass(frozen=True)
class Loaded:
    key: Key
    fingerprint: Fingerprint
    batcher: Counted


@dataclass(frozen=True)
class Failed:
    key: Key
    fingerprint: Fingerprint
    reason: str


@dataclass(frozen=True)
class WantTask:
    key: Key
    want: Want


@dataclass(frozen=True)
class Freed:
    key: Key


Event = Snapshot | Loaded | Failed | Freed


def trim() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so unloading shows in the PSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
