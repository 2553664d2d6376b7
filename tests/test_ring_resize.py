"""A worker replaces its ring by a bigger one while requests on the old one are queued: the engine
answers those from the old ring, takes new ones on the new ring, and unmaps the old one once
its jobs are answered. Straight to the real engine socket, with real rings."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from ipc import messages as m
from ipc.ring import Ring
from ipc.sockets import make_socket
from tests.harness import bare_engine, wait_for
from tests.models import write_pixel_detector

RED_BOX = (4.0, 0.0, 6.0, 2.0)  # what the 8x8 pixel detector answers for a red image
GREEN_BOX = (0.0, 4.0, 2.0, 6.0)


@pytest.fixture
def slow_engine(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """An engine whose model takes a while per batch, so a request is still queued when the next
    message arrives. Yields its address and pid."""
    repo = tmp_path / "repo"
    write_pixel_detector(repo, size=8, max_batch_size=1, delay_ms=0.0, busy=8)
    with bare_engine(repo) as (address, proc):
        yield address, proc.pid


def _replies(sock: zmq.Socket, n: int) -> list[m.Message]:  # type: ignore[type-arg]
    out: list[m.Message] = []
    while len(out) < n:
        assert sock.poll(10_000), f"no answer from the engine after {out}"
        out += [r for r in m.unpack(m.decode(sock.recv())) if not isinstance(r, m.Heartbeat)]
    return out


def _infer(ring: Ring, slot: int, generation: int) -> bytes:
    msg = m.Infer("t", "pixels", 1, slot, generation, 8, 8, time.time() + 30, ring=ring.name)
    return m.encode(msg)


def _box(result: m.Message) -> tuple[float, ...]:
    assert isinstance(result, m.Result), result
    [det] = result.detections
    return (det.x1, det.y1, det.x2, det.y2)


def test_a_ring_replaced_while_its_requests_are_queued(slow_engine: tuple[str, int], no_leaks: None) -> None:
    address, engine_pid = slow_engine
    ctx = zmq.Context()
    sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False)
    old, new = Ring(2, 8 * 8 * 3), Ring(2, 2 * 8 * 8 * 3, first_generation=10)
    try:
        sock.send(m.encode(m.Hello(os.getpid(), old.name, old.slots, old.slot_bytes)))
        [ready] = _replies(sock, 1)
        assert isinstance(ready, m.Ready) and ready.registered and ready.ring == old.name
        old.view(0, (8, 8, 3))[...] = np.array([255, 0, 0], dtype=np.uint8)
        new.view(0, (8, 8, 3))[...] = np.array([0, 255, 0], dtype=np.uint8)
        # Back to back: a request on the old ring, the bigger ring, a request on it, and a late
        # one on the old ring (a worker takes no slot between its Hello and the answer).
        sock.send(_infer(old, 0, 1))
        sock.send(m.encode(m.Hello(os.getpid(), new.name, new.slots, new.slot_bytes, replaces=old.name)))
        sock.send(_infer(new, 0, 11))
        sock.send(_infer(old, 1, 1))
        got = _replies(sock, 4)
        readies = [r for r in got if isinstance(r, m.Ready)]
        assert [(r.registered, r.ring) for r in readies] == [(True, new.name)], got
        answers = {(r.slot, r.generation): r for r in got if isinstance(r, (m.Result, m.Error))}
        assert got.index(readies[0]) < got.index(answers[(0, 1)]), "the old ring's request was still queued"
        assert _box(answers[(0, 1)]) == pytest.approx(RED_BOX), "the queued request read the old ring"
        assert _box(answers[(0, 11)]) == pytest.approx(GREEN_BOX), "the next one read the new ring"
        late = answers[(1, 1)]
        assert isinstance(late, m.Error) and late.reason == "bad_input" and old.name in late.detail
        # The engine unmaps the old ring once its request is answered.
        maps = Path(f"/proc/{engine_pid}/maps")
        wait_for(lambda: old.name not in maps.read_text(), 10, "the engine to unmap the old ring")
        assert new.name in maps.read_text()
        # The same Hello again (its answer was lost, say) changes nothing.
        sock.send(m.encode(m.Hello(os.getpid(), new.name, new.slots, new.slot_bytes, replaces=old.name)))
        [again] = _replies(sock, 1)
        assert isinstance(again, m.Ready) and again.registered and again.ring == new.name
        # A replacement the engine refuses (slots too small) leaves the registered ring serving.
        sock.send(m.encode(m.Hello(os.getpid(), old.name, old.slots, 100, replaces=new.name)))
        [refused] = _replies(sock, 1)
        assert isinstance(refused, m.Ready) and not refused.registered and refused.ring == old.name
        sock.send(_infer(new, 0, 12))
        [result] = _replies(sock, 1)
        assert _box(result) == pytest.approx(GREEN_BOX)
    finally:
        sock.close(linger=0)
        ctx.term()
        old.close()
        new.close()
