"""``WS /ws/stream[/{model}]``: video frames in, one JSON answer per answered frame out.

Per connection at most one frame is in flight (decode, engine round trip, reply sent) and one waits
behind it. A newer frame replaces the waiting one (latest wins) and the replaced frame is counted
in ``dropped``, so a client that sends faster than the model runs, or reads slower, costs the worker
two frames of memory, never a queue. Replies leave in the order the frames arrived; a bad frame gets
an error reply in its place and the connection stays open. When the client goes away, the frame in
flight still runs to the engine's answer, which is what frees its ring slot.

Frames: binary messages are the encoded image (JPEG, PNG...) and their frame id is the message
counter of the connection (0, 1, 2...); with ``?framing=id`` a binary message starts with the frame
id as a 4-byte big-endian unsigned integer. Text messages are JSON ``{frame_id?, image_b64,
confidence_threshold?, max_detections?, timeout_s?}``. Query parameters ``confidence_threshold``,
``max_detections`` and ``timeout_s`` are the connection's defaults; ``version`` picks a model version.
A handshake that cannot be served (bad query, unknown model, engine down) gets the REST error
response instead of the upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from loguru import logger
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from frontend import errors
from frontend.params import PARAM_NAMES, Params, b64decode, check_names, invalid, merge, parse_params, positive_version
from frontend.schemas_batch import StreamError, StreamFrameJSON, StreamResult
from frontend.service import ImageRequest, ImageService
from frontend.settings import Settings
from ipc.errors import BadInput, InternalError, InvalidParameter, PayloadTooLarge, RingserveError

router = APIRouter(tags=["stream"])

FRAMINGS = ("raw", "id")


@dataclass(frozen=True)
class Frame:
    seq: int  # the message counter of the connection
    frame_id: int | str
    image: bytes = b""
    params: Params | None = None  # None: the frame could not be read (``error``)
    error: RingserveError | None = None
    received: float = 0.0  # time.monotonic(): the frame's deadline base


@dataclass(frozen=True)
class Options:
    framing: str
    version: int | None
    params: Params


def _options(ws: WebSocket) -> Options:
    query = ws.query_params
    framing = query.get("framing") or "raw"
    if framing not in FRAMINGS:
        raise InvalidParameter(f"framing must be one of {list(FRAMINGS)}, not {framing!r}")
    text = query.get("version") or None
    version = positive_version(text)
    if text is not None and version is None:
        raise InvalidParameter(f"version must be a positive integer, not {text!r}")
    check_names(query, {"framing", "version", *PARAM_NAMES}, "query parameters")
    params = parse_params({k: v for k, v in query.items() if k in PARAM_NAMES})
    return Options(framing, version, params)


class Stream:
    """One connection: a reader that always reads, and a worker that answers one frame at a time."""

    def __init__(self, ws: WebSocket, model: str, options: Options) -> None:
        self.ws = ws
        self.model = model
        self.options = options
        self.service: ImageService = ws.app.state.service
        self.settings: Settings = ws.app.state.settings
        self.request_id = errors.request_id(ws)
        self.count_error = getattr(ws.app.state, "count_error", None)  # a metrics hook, when the app has one
        self.waiting: deque[Frame] = deque()
        self.wake = asyncio.Event()
        self.busy = False
        self.closed = False
        self.received = self.answered = self.dropped = 0

    async def run(self) -> None:
        worker = asyncio.create_task(self._work(), name=f"stream-{self.request_id}")
        try:
            await self._read()
        finally:
            self.closed = True
            self.waiting.clear()
            self.wake.set()
            await worker  # the frame in flight completes, so the engine's answer frees its slot
            logger.info("stream closed: {} frames, {} answered, {} dropped", self.received, self.answered, self.dropped)

    async def _read(self) -> None:
        while True:
            try:
                message = await self.ws.receive()
            except (WebSocketDisconnect, WebSocketDisconnected):
                return
            if message["type"] == "websocket.disconnect":
                return
            self.waiting.append(self._parse(message))
            self.received += 1
            # An idle worker has not yet taken the oldest waiting frame: it counts as in flight.
            keep = 1 if self.busy else 2
            while len(self.waiting) > keep:
                self.waiting.popleft()
                self.dropped += 1
            self.wake.set()

    async def _work(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting and not self.closed:
                frame = self.waiting.popleft()
                self.busy = True
                try:
                    reply = await self._answer(frame)
                    if self.closed:
                        return
                    await self.ws.send_text(reply.decode())
                    self.answered += 1
                except (WebSocketDisconnect, WebSocketDisconnected, OSError):
                    return  # the client is gone; the reader sees the disconnect too
                finally:
                    self.busy = False

    def _parse(self, message: Mapping[str, Any]) -> Frame:
        seq, now = self.received, time.monotonic()
        limit = self.settings.max_body_bytes
        defaults = self.options.params
        data = message.get("bytes")
        if isinstance(data, bytes):
            if len(data) > limit:
                return Frame(seq, seq, error=PayloadTooLarge(f"frame is {len(data)} bytes; the limit is {limit}"))
            if self.options.framing == "raw":
                return Frame(seq, seq, data, defaults, received=now)
            if len(data) < 4:
                return Frame(seq, seq, error=BadInput("a frame starts with its 4-byte big-endian frame id"))
            return Frame(seq, int.from_bytes(data[:4], "big"), data[4:], defaults, received=now)
        text = message.get("text")
        if not isinstance(text, str):
            return Frame(seq, seq, error=BadInput("an empty message"))
        if len(text) > limit:
            return Frame(seq, seq, error=PayloadTooLarge(f"frame is {len(text)} bytes; the limit is {limit}"))
        try:
            payload = StreamFrameJSON.model_validate_json(text)
        except ValidationError as exc:
            return Frame(seq, _frame_id_of(text, seq), error=invalid(exc))
        frame_id = seq if payload.frame_id is None else payload.frame_id
        try:
            data = b64decode(payload.image_b64)
        except BadInput as exc:
            return Frame(seq, frame_id, error=exc)
        return Frame(seq, frame_id, data, merge(defaults, payload), received=now)

    async def _answer(self, frame: Frame) -> bytes:
        error = frame.error
        if frame.params is not None:
            try:
                req = ImageRequest(
                    self.model,
                    self.options.version,
                    frame.params,
                    f"{self.request_id}.{frame.seq}",
                    frame.received,
                    image=frame.image,
                )
                answer = (await self.service.predict(req)).response()
                body = answer.model_dump(mode="json", exclude_none=True, exclude={"request_id"})
                return _dump(StreamResult.model_validate({"frame_id": frame.frame_id, **body, "dropped": self.dropped}))
            except RingserveError as exc:
                error = exc
            except Exception:  # one frame's bug must not end the stream
                logger.exception("stream frame {} failed", frame.seq)
                error = InternalError("internal server error")
        assert error is not None
        if self.count_error is not None:
            self.count_error(error.reason)
        logger.debug("stream frame {} -> {}: {}", frame.seq, error.reason, error.detail)
        return _dump(
            StreamError(frame_id=frame.frame_id, error=error.reason, detail=error.detail, dropped=self.dropped)
        )


def _dump(reply: StreamResult | StreamError) -> bytes:
    return orjson.dumps(reply.model_dump(mode="json", exclude_none=True))


def _frame_id_of(text: str, seq: int) -> int | str:
    """The client's frame id from a frame that failed validation, when it can be read."""
    with contextlib.suppress(orjson.JSONDecodeError):
        raw = orjson.loads(text)
        frame_id = raw.get("frame_id") if isinstance(raw, dict) else None
        if isinstance(frame_id, int | str):
            return frame_id
    return seq


async def _refuse(ws: WebSocket, exc: RingserveError) -> None:
    """Answer the handshake with the REST error (status + ``{error, detail, request_id}``)."""
    response = errors.to_response(ws, exc)
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(response)
    else:
        await ws.close(code=1008, reason=exc.reason)


async def _serve(ws: WebSocket, model: str) -> None:
    try:
        options = _options(ws)
        ws.app.state.service.model(model, options.version)
    except RingserveError as exc:
        await _refuse(ws, exc)
        return
    await ws.accept()
    logger.info("stream opened on {} ({} framing)", model, options.framing)
    await Stream(ws, model, options).run()


@router.websocket("/ws/stream")
async def stream_default(ws: WebSocket) -> None:
    await _serve(ws, ws.app.state.settings.default_model)


@router.websocket("/ws/stream/{model}")
async def stream_model(ws: WebSocket, model: str) -> None:
    await _serve(ws, model)
