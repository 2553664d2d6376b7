"""``POST /api/v1/predict`` for its two common bodies, in plain ASGI (issue 15).

The route the appliance answers most went through FastAPI's router (a regex per route), its
request handler and dependency solving, and Starlette's form machinery (an ``UploadFile`` on a
spooled temporary file per part): a good part of the 2.4 ms of Python that a worker's event loop
spent per Lite0 request, the largest overhead left against the ceiling on a 2-core box. Answered
here, a request costs the worker about 0.9 ms less CPU (README, Benchmark).

Here it answers what it can answer exactly as the route would: a raw image body, or a multipart
body whose only part is the file ``image``, with no query string and no Content-Encoding, for
the default model. Everything else goes on to the FastAPI route: before the body is read (another
path, method or body type, a model that is not served, a body over the limit), or, once it is
read, with that body replayed (form fields, more parts, a malformed body), so every rare case and
every parse error keeps its one implementation. What the fast path itself answers goes through
the same service (``app.state.service``: cache and prediction log included), the same error
mapping (frontend/errors.py) and the same metrics route label as the route.
"""

from __future__ import annotations

import time
from typing import Any

import python_multipart
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend import errors
from frontend.body import read_limited
from frontend.jsonresp import JSONResponse
from frontend.params import ascii_int, parse_params
from frontend.predict import RAW_ACCEPTED
from frontend.service import ImageRequest
from ipc.errors import RingserveError

PATH = "/api/v1/predict"
_RAW = frozenset(t.encode() for t in RAW_ACCEPTED)
_DEFAULTS = parse_params({})


class _Fallback(Exception):
    """Not a body the fast path answers: the route answers it."""


class PredictFastPath:
    def __init__(self, app: ASGIApp, route: Any) -> None:
        self.app = app
        self.route = route  # the route's APIRoute: the metrics' route label

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST" or scope["query_string"]:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        kind, options = parse_options_header(headers.get(b"content-type", b""))
        boundary = options.get(b"boundary") if kind == b"multipart/form-data" else None
        app = scope["app"]
        settings = app.state.settings
        declared = ascii_int(headers.get(b"content-length", b"").decode("latin-1"))
        if (
            (kind not in _RAW and not boundary)
            or declared is None
            or declared > settings.max_body_bytes
            or headers.get(b"content-encoding", b"identity").strip().lower() not in (b"", b"identity")
        ):
            await self.app(scope, receive, send)
            return
        service = app.state.service
        try:
            service.model(settings.default_model, None)
        except RingserveError:
            await self.app(scope, receive, send)  # the route's 404 / 503, before the body is read
            return
        scope["route"] = self.route
        try:
            body = await read_limited(Request(scope, receive), settings.max_body_bytes, settings.body_timeout_s)
        except RingserveError as exc:  # 413, 408
            await errors.to_response(Request(scope), exc)(scope, receive, send)
            return
        except ClientDisconnect:  # the client left: the route logs it as it always has
            await self.app(scope, _replay(None, receive), send)
            return
        try:
            image = _only_image(body, boundary) if boundary else body
        except _Fallback:
            await self.app(scope, _replay(body, receive), send)
            return
        del body  # a multipart body is not kept beside its image while the engine answers
        request_id = scope["state"]["request_id"]
        req = ImageRequest(settings.default_model, None, _DEFAULTS, request_id, time.monotonic(), image=image)
        try:
            result = await service.predict(req)
        except RingserveError as exc:
            await errors.to_response(Request(scope), exc)(scope, receive, send)
            return
        except Exception:
            await errors.internal(Request(scope))(scope, receive, send)
            return
        await JSONResponse(result.response().model_dump(mode="json", exclude_none=True))(scope, receive, send)


def _only_image(body: bytes, boundary: bytes) -> bytes:
    """The data of the body's only part, when that part is the file ``image``; else _Fallback."""
    parts: list[tuple[dict[bytes, bytes], list[bytes]]] = []
    field = value = b""

    def on_part_begin() -> None:
        parts.append(({}, []))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        nonlocal field
        field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        nonlocal value
        value += data[start:end]

    def on_header_end() -> None:
        nonlocal field, value
        parts[-1][0][field.lower()] = value
        field = value = b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1][1].append(data[start:end])

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    try:
        parser = python_multipart.MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except Exception:  # python-multipart raises several types; the route words the error
        raise _Fallback from None
    if len(parts) != 1:
        raise _Fallback
    headers, data = parts[0]
    disposition, options = parse_options_header(headers.get(b"content-disposition", b""))
    if disposition != b"form-data" or options.get(b"name") != b"image" or b"filename" not in options:
        raise _Fallback
    return b"".join(data)


def _replay(body: bytes | None, receive: Receive) -> Receive:
    """A receive that gives the body already read (None: the disconnect), then the connection's own
    messages."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            if body is None:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
