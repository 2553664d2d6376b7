"""The workers the engine knows: each one's registered ring, the slots queued in it, and the rings
it replaced by bigger ones while serving (mapped until their queued requests are answered)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loguru import logger

from ipc import messages as m
from ipc.errors import BadInput
from ipc.ring import MappedRing


@dataclass
class Worker:
    pid: int
    ring: MappedRing | None = None
    busy: set[int] = field(default_factory=set)
    # Rings replaced by a bigger one while serving, mapped until their queued requests are answered.
    draining: dict[str, tuple[MappedRing, set[int]]] = field(default_factory=dict)

    def answered(self, ring: str, slot: int) -> None:
        if self.ring is not None and ring in ("", self.ring.name):
            self.busy.discard(slot)
            return
        old = self.draining.get(ring)
        if old is not None:
            old[1].discard(slot)
            if not old[1]:
                old[0].close()
                del self.draining[ring]

    def replace(self, ring: MappedRing) -> None:
        """``ring`` takes new requests; the old one drains."""
        if self.ring is not None:
            if self.busy:
                self.draining[self.ring.name] = (self.ring, self.busy)
            else:
                self.ring.close()
        self.ring, self.busy = ring, set()

    def close(self) -> None:
        for ring in [*([self.ring] if self.ring else []), *(r for r, _ in self.draining.values())]:
            ring.close()
        self.ring, self.draining = None, {}


def map_ring(msg: m.Hello, slot_bytes: int) -> MappedRing | None:
    """The ring of ``msg``, mapped, if its slots hold ``slot_bytes`` and it really is that pid's."""
    if msg.slot_bytes < slot_bytes:
        # The worker replaces a ring that is too small (Ready says the size).
        logger.info(
            "refused ring {} of pid {}: {} bytes per slot, the models need {}",
            msg.ring,
            msg.pid,
            msg.slot_bytes,
            slot_bytes,
        )
        return None
    try:
        ring = MappedRing(msg.ring, msg.slots, msg.slot_bytes)
    except (BadInput, OSError) as exc:
        logger.warning("refused ring {} of pid {}: {}", msg.ring, msg.pid, exc)
        return None
    if ring.owner_pid != msg.pid:
        ring.close()
        logger.warning("refused ring {}: it is not pid {}'s", msg.ring, msg.pid)
        return None
    return ring
