"""A worker's shared-memory rings while it serves: the registered one, a bigger one on its way, and
old ones draining.

A model whose input does not fit the registered ring's slots is served once a bigger ring is
registered, without a restart and without failing a request: the worker creates the bigger ring
and sends Hello(replaces=old). From that moment until the engine answers (one round trip), no new
slot is taken, so every request naming the old ring reached the engine before the Hello; those
run on there while new ones use the new ring. The old ring is unlinked when its last slot comes
back. The new ring's generations start above the old one's, so a reply's (slot, generation) names
exactly one ring.
"""

from __future__ import annotations

import asyncio
import os
import time

from loguru import logger

from ipc import messages as m
from ipc.errors import DeadlineExceeded
from ipc.ring import Ring

Key = tuple[str, int]
RESEND_S = 0.25  # a Hello the engine has not answered is sent again
RETRY_S = 2.0  # after a bigger ring could not be created or was refused (the engine logs why)


def input_bytes(info: m.ModelInfo) -> int:
    return info.input.height * info.input.width * 3


class Rings:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.current: Ring | None = None  # registered, or to be registered: new slots come from it
        self.next: Ring | None = None  # bigger, sent in a Hello the engine has not answered yet
        self.retired: list[Ring] = []  # replaced, with slots the engine has not answered yet
        self.settled = asyncio.Event()  # no bigger ring waiting for the engine: slots may be taken
        self.settled.set()
        self.fault = ""  # why no ring could be created (say /dev/shm is full)
        self._sent = 0.0
        self._retry_at = 0.0

    @property
    def in_use(self) -> int:
        return sum(r.in_use for r in self._all())

    def _all(self) -> list[Ring]:
        return [r for r in (self.current, self.next, *self.retired) if r is not None]

    async def settle(self, timeout: float) -> float:
        """Wait (one round trip) while a bigger ring is being registered; the time left."""
        if self.settled.is_set():
            return timeout
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.settled.wait(), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"this worker's ring was not replaced within {timeout:.1f}s") from None
        return timeout - (time.monotonic() - started)

    def split(self, models: list[m.ModelInfo]) -> tuple[dict[Key, m.ModelInfo], dict[Key, m.ModelInfo]]:
        """The models the current ring's slots hold, and those that need a bigger ring."""
        room = self.current.slot_bytes if self.current is not None else 0
        fit = {(x.name, x.version): x for x in models if input_bytes(x) <= room}
        return fit, {(x.name, x.version): x for x in models if (x.name, x.version) not in fit}

    def fresh(self, slot_bytes: int) -> bool:
        """Not registered: a new ring in place of the current one, once all its slots are back."""
        if self.in_use:
            return False
        self.close()
        try:
            self.current = Ring(self.slots, slot_bytes)
        except OSError as exc:
            self._failed(exc)
            return False
        if self.fault:
            logger.info("ring created: {}", self.current.name)
        self.fault = ""
        return True

    def resize(self, needed: int, now: float) -> m.Hello | None:
        """Registered: a bigger ring when the models need one, and its Hello until answered."""
        if self.current is None:
            return None
        if self.next is None:
            if needed <= self.current.slot_bytes or now < self._retry_at:
                return None
            top = max(max(r.generation) for r in self._all())
            try:
                self.next = Ring(self.slots, needed, first_generation=top + 1)
            except OSError as exc:
                self._failed(exc)
                self._retry_at = now + RETRY_S
                return None
            self.fault, self._sent = "", 0.0
            self.settled.clear()
        if now - self._sent <= RESEND_S:
            return None
        self._sent = now
        n = self.next
        return m.Hello(os.getpid(), n.name, n.slots, n.slot_bytes, replaces=self.current.name)

    def end(self, registered: bool) -> None:
        """The engine registered the bigger ring (it takes the new slots), or refused it."""
        if self.next is None or self.current is None:
            return
        if registered:
            logger.info(
                "ring {} replaced by {} ({} bytes per slot)", self.current.name, self.next.name, self.next.slot_bytes
            )
            self.retired.append(self.current)
            self.current = self.next
            self._drop_drained()
        else:
            logger.warning("the engine refused this worker's bigger ring {}; again in {}s", self.next.name, RETRY_S)
            self._retry_at = time.monotonic() + RETRY_S
            self.next.close()
        self.next = None
        self.settled.set()

    def release(self, slot: int, generation: int) -> None:
        for ring in (self.current, *self.retired):
            if ring is not None and ring.release(slot, generation):
                self._drop_drained()
                return

    def reset(self) -> None:
        """The engine is gone: every slot is ours again; a bigger ring on its way becomes the one."""
        if self.next is not None:
            if self.current is not None:
                self.current.close()
            self.current, self.next = self.next, None
        for ring in self.retired:
            ring.close()
        self.retired = []
        if self.current is not None:
            self.current.release_all()
        self.settled.set()

    def close(self) -> None:
        for ring in self._all():
            ring.close()
        self.current, self.next, self.retired = None, None, []
        self.settled.set()

    def _drop_drained(self) -> None:
        for ring in [r for r in self.retired if not r.in_use]:
            ring.close()
            self.retired.remove(ring)

    def _failed(self, exc: OSError) -> None:
        if str(exc) != self.fault:
            logger.error("cannot create this worker's ring: {}", exc)
        self.fault = str(exc)
