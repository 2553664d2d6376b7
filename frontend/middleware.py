"""Pure ASGI middleware: request id in and out, optional API key, one log line per request."""

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        path: str = scope["path"]
        with logger.contextualize(request_id=request_id):
            if self.api_key and not _is_open(path) and not self._authorised(headers):
                await _unauthorised(scope, send_with_id, request_id)
            else:
                await self.app(scope, receive, send_with_id)
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
    return path == "/" or any(path == p or path.startswith(p + "/") for p in OPEN_PATHS if p != "/")


async def _unauthorised(scope: Scope, send: Send, request_id: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
        return
    body = orjson.dumps({"error": "unauthorized", "detail": "a valid API key is required", "request_id": request_id})
    await send({
        "type": "http.response.start",
        "status": 401,
        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
    })
    await send({"type": "http.response.body", "body": body})
