"""Malformed and hostile messages sent straight to the real engine socket: rejected, never fatal."""

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
from ipc.sockets import make_socket, socket_path
from tests.harness import bare_engine
from tests.models import write_pixel_detector


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[str]:
    repo = tmp_path / "repo"
    write_pixel_detector(repo, size=8, max_batch_size=4, delay_ms=1.0)
    with bare_engine(repo) as (address, proc):
        yield address
    assert proc.returncode == 0
    path = socket_path(address)
    assert path is not None and not path.exists()


def _ask(sock: zmq.Socket, msg: object, timeout_ms: int = 5000) -> m.Message:  # type: ignore[type-arg]
    sock.send(m.encode(msg) if not isinstance(msg, bytes) else msg)  # type: ignore[arg-type]
    return _receive(sock, timeout_ms)


def _receive(sock: zmq.Socket, timeout_ms: int = 5000) -> m.Message:  # type: ignore[type-arg]
    """The engine's next message that is not a heartbeat."""
    while True:
        assert sock.poll(timeout_ms), "no answer from the engine"
        reply = m.decode(sock.recv())
        if not isinstance(reply, m.Heartbeat):
            return reply


def _infer(slot: int, gen: int = 1, **kw: object) -> m.Infer:
    fields = {
        "req_id": "t",
        "model": "pixels",
        "version": 1,
        "slot": slot,
        "generation": gen,
        "height": 8,
        "width": 8,
        "deadline": time.time() + 10,
    }
    fields.update(kw)
    return m.Infer(**fields)  # type: ignore[arg-type]


def test_engine_rejects_malformed_messages_and_keeps_serving(engine: str, no_leaks: None) -> None:
    ctx = zmq.Context()
    sock = make_socket(ctx, engine, zmq.DEALER, bind=False, immediate=False)
    ring = Ring(2, 8 * 8 * 3)
    try:
        # Garbage and unexpected frames get no answer but do not hurt.
        sock.send(b"\x00garbage")
        sock.send_multipart([b"two", b"frames"])
        sock.send(m.encode(m.Result("x", 0, 0, "pixels", 1, 1, 0.0, 0.0)))
        # Infer before Hello.
        err = _ask(sock, _infer(0))
        assert isinstance(err, m.Error) and err.reason == "engine_down"
        # A ring that is not ours / does not exist / has the wrong size.
        bad = _ask(sock, m.Hello(pid=os.getpid(), ring="ringserve-0-1-0", slots=1, slot_bytes=4096))
        assert isinstance(bad, m.Ready) and not bad.registered
        bad = _ask(sock, m.Hello(pid=os.getpid(), ring=ring.name, slots=5, slot_bytes=ring.slot_bytes))
        assert isinstance(bad, m.Ready) and not bad.registered
        bad = _ask(sock, m.Hello(pid=1, ring=ring.name, slots=2, slot_bytes=ring.slot_bytes))
        assert isinstance(bad, m.Ready) and not bad.registered
        ok = _ask(sock, m.Hello(pid=os.getpid(), ring=ring.name, slots=2, slot_bytes=ring.slot_bytes))
        assert isinstance(ok, m.Ready) and ok.registered
        cases = [
            (_infer(2), "bad_input"),  # slot out of range
            (_infer(-1), "bad_input"),
            (_infer(0, height=9), "bad_input"),  # shape does not match the model
            (_infer(0, model="nope"), "model_not_found"),
            (_infer(0, version=7), "model_not_found"),
            (_infer(0, deadline=time.time() - 1), "timeout"),
        ]
        for msg, reason in cases:
            reply = _ask(sock, msg)
            assert isinstance(reply, m.Error) and reply.reason == reason, (msg, reply)
        # A real request after all that is still answered correctly.
        ring.view(0, (8, 8, 3))[...] = np.array([255, 0, 0], dtype=np.uint8)
        result = _ask(sock, _infer(0))
        assert isinstance(result, m.Result)
        [det] = result.detections
        assert (det.x1, det.y1, det.x2, det.y2) == pytest.approx((4.0, 0.0, 6.0, 2.0))
    finally:
        sock.close()
        ctx.term()
        ring.close()


def test_engine_refuses_a_slot_already_queued(engine: str, no_leaks: None) -> None:
    ctx = zmq.Context()
    sock = make_socket(ctx, engine, zmq.DEALER, bind=False, immediate=False)
    ring = Ring(1, 8 * 8 * 3)
    try:
        assert _ask(sock, m.Hello(pid=os.getpid(), ring=ring.name, slots=1, slot_bytes=ring.slot_bytes)).registered  # type: ignore[union-attr]
        replies = []
        for _ in range(20):  # the same slot again and again, without waiting
            sock.send(m.encode(_infer(0)))
        while len(replies) < 20:
            assert sock.poll(5000)
            replies += [r for r in m.unpack(m.decode(sock.recv())) if not isinstance(r, m.Heartbeat)]
        assert any(isinstance(r, m.Result) for r in replies)
        dupes = [r for r in replies if isinstance(r, m.Error)]
        assert all(r.reason == "bad_input" and "already in use" in r.detail for r in dupes)
    finally:
        sock.close()
        ctx.term()
        ring.close()


def test_a_batch_answers_its_worker_in_one_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The answers to a batch of one worker's requests come back together, as one Replies."""
    monkeypatch.setenv("RINGSERVE_INSTANCES", "1")  # one instance: the four form one batch
    monkeypatch.setenv("RINGSERVE_CPU_MAX_BATCH", "0")  # the model's max_batch_size, not a measured one
    repo = tmp_path / "repo"
    write_pixel_detector(repo, size=8, max_batch_size=4, delay_ms=10_000.0, wait_alone=True)
    ring = Ring(4, 8 * 8 * 3)
    ctx = zmq.Context()
    try:
        with bare_engine(repo) as (address, _):
            sock = make_socket(ctx, address, zmq.DEALER, bind=False, immediate=False)
            ready = _ask(sock, m.Hello(pid=os.getpid(), ring=ring.name, slots=4, slot_bytes=ring.slot_bytes))
            assert isinstance(ready, m.Ready) and ready.registered
            pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
            for slot in range(4):
                ring.view(slot, (8, 8, 3))[...] = pixels
                sock.send(m.encode(_infer(slot, req_id=f"r{slot}")))
            # The batch closes when it is full, long before its delay of 10 s or this poll's 5 s.
            reply = _receive(sock)
            assert isinstance(reply, m.Replies), reply
            answers = m.unpack(reply)
            assert [(r.req_id, r.slot, r.batch_size) for r in answers if isinstance(r, m.Result)] == [
                (f"r{slot}", slot, 4) for slot in range(4)
            ]
    finally:
        ctx.destroy(linger=0)  # closes the socket too, also when an assertion above failed
        ring.close()


def test_replies_bundled_from_encoded_answers_decode_as_replies() -> None:
    thing = m.Detection(1.0, 2.0, 3.0, 4.0, 0.9, 1, "thing")
    result = m.Result("a", 0, 1, "pixels", 1, 2, 0.1, 0.2, detections=[thing])
    error = m.Error("b", 1, 1, "timeout", "deadline passed while queued")
    wire = m.bundle([m.encode(result), m.encode(error)])
    assert wire == m.encode(m.Replies([result, error]))
    assert m.unpack(m.decode(wire)) == [result, error]
    assert m.unpack(result) == [result]
