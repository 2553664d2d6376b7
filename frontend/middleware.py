"""Pure ASGI middleware: request id in and out, optional API key, one log line per request.

A response that starts before the request body has been read to its end (413, 408, 401, 404...)
carries ``Connection: close``: uvicorn then closes the connection after it, so a client streaming a
huge or endless body stops, instead of the server draining that body to keep the connection alive.
"""

from __future__ import annotations

import hmac
import re
import time
import uuid
from collections.abc import Callable

import orjson
from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Observe = Callable[[str, str, int, float], None]
_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
OPEN_PATHS = ("/health", "/v2/health", "/metrics", "/", "/favicon.ico")
# DeepStack's API sends its key in the body (form field api_key): frontend/routes/deepstack.py, which
# owns every path under it, checks the key (form field or these headers) once it has read the body.
KEY_IN_BODY = "/v1/"


class RequestContext:
    def __init__(self, app: ASGIApp, api_key: str = "", observe: Observe | None = None) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = [0]
        body_done = [scope["type"] != "http" or not _declares_body(headers)]

        async def receive_tracked() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" or (
                message["type"] == "http.request" and not message.get("more_body", False)
            ):
                body_done[0] = True
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                status[0] = message["status"]
                own = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                own.append((b"x-request-id", request_id.encode()))
                if not body_done[0] and not any(k.lower() == b"connection" for k, _ in own):
                    own.append((b"connection", b"close"))
                message = {**message, "headers": own}
            await send(message)

        path: str = scope["path"]
        with logger.contextualize(request_id=request_id):
            if (
                self.api_key
                and not _is_open(path)
                and not _is_preflight(scope, headers)
                and not (scope["type"] == "http" and path.startswith(KEY_IN_BODY))
                and not self._authorised(headers)
            ):
                await _unauthorised(scope, send_with_id, request_id)
            else:
                await self.app(scope, receive_tracked, send_with_id)
            if scope["type"] != "http":
                return
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "<unmatched>")
            if self.observe is not None:
                self.observe(route, scope["method"], status[0], elapsed)
            if not path.startswith(("/health", "/metrics")):
                logger.info("{} {} {} {:.1f}ms", scope["method"], path, status[0], elapsed * 1000)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        key = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if not key and auth[:7].lower() == b"bearer ":
            key = auth[7:].strip()
        return hmac.compare_digest(key, self.api_key)


def _is_open(path: str) -> bool:
    if "/." in path or "//" in path:  # no "/health/../api/..." past the key, whatever routes it reaches
        return False
    return path == "/" or any(path == p or path.startswith(p + "/") for p in OPEN_PATHS if p != "/")


def _is_preflight(scope: Scope, headers: dict[bytes, bytes]) -> bool:
    """A CORS preflight: browsers never send credentials with it, so the CORS layer answers it."""
    return (
        scope["type"] == "http"
        and scope["method"] == "OPTIONS"
        and b"origin" in headers
        and b"access-control-request-method" in headers
    )


def _declares_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length")
    return b"transfer-encoding" in headers or (length is not None and length.strip() not in (b"", b"0"))


async def _unauthorised(scope: Scope, send: Send, request_id: str) -> None:
    """401 with the JSON error; for a WebSocket handshake too, where the server can answer it in HTTP."""
    prefix = "http"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})  # 403
            return
        prefix = "websocket.http"
    body = orjson.dumps({"error": "unauthorized", "detail": "a valid API key is required", "request_id": request_id})
    await send(
        {
            "type": f"{prefix}.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
        }
    )
    await send({"type": f"{prefix}.response.body", "body": body})
