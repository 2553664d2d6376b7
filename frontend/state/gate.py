"""Pure ASGI middleware in front of the routes: who the client is, and its rate limit.

It sits inside :class:`frontend.middleware.RequestContext` (so the API key has been checked and
the request id is set) and before the routes. It puts the client's identity in a context
variable that the prediction log and the jobs read, and, when ``RINGSERVE_RATE_LIMIT`` is set,
answers 429 + Retry-After (the error shape) to a client over its limit. A rate-limit database
that is locked, full or corrupt lets the request through (a counter and a warning say so): the
limit is a guard, not a reason to fail predictions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from frontend.middleware import OPEN_PATHS
from frontend.state.db import StoreError
from frontend.state.ratelimit import RateLimits


@dataclass(frozen=True)
class Client:
    """The caller of the current request: its limit key, its job owner, what the log records."""

    key: str  # "key:<hash of the API key>" or "ip:<address>"
    owner: str  # hash of the API key, "" without keys
    address: str
    route: str


CLIENT: ContextVar[Client | None] = ContextVar("ringserve_client", default=None)


def key_hash(key: bytes) -> str:
    return hashlib.sha256(b"ringserve-api-key\0" + key).hexdigest()[:32]


def identify(scope: Scope) -> Client:
    headers = dict(scope.get("headers") or [])
    key = headers.get(b"x-api-key", b"")
    auth = headers.get(b"authorization", b"")
    if not key and auth[:7].lower() == b"bearer ":
        key = auth[7:].strip()
    address = (scope.get("client") or ("-", 0))[0]
    owner = key_hash(key) if key else ""
    return Client(key=f"key:{owner}" if owner else f"ip:{address}", owner=owner, address=address, route=scope["path"])


def _limited(path: str) -> bool:
    return not (path == "/" or path.startswith("/static") or any(path.startswith(p) for p in OPEN_PATHS if p != "/"))


class ClientGate:
    def __init__(
        self,
        app: ASGIApp,
        limits: Callable[[], RateLimits | None],
        on_error: Callable[[StoreError], None],
        on_refused: Callable[[], None],
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_error = on_error
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = identify(scope)
        token = CLIENT.set(client)
        try:
            limits = self.limits()
            if limits is not None and _limited(scope["path"]):
                try:
                    verdict = await limits.check(client.key)
                except StoreError as exc:
                    self.on_error(exc)
                else:
                    if not verdict.allowed:
                        self.on_refused()
                        await _too_many(scope, send, verdict.retry_after_s, verdict.limit)
                        return
            await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)


async def _too_many(scope: Scope, send: Send, retry_after: int, limit: str) -> None:
    request_id = scope.get("state", {}).get("request_id", "-")
    prefix = "http"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": "rate limited"})
            return
        prefix = "websocket.http"
    body = orjson.dumps(
        {
            "error": "rate_limited",
            "detail": f"over the rate limit {limit}; retry in {retry_after} s",
            "request_id": request_id,
        }
    )
    headers = [(b"content-type", b"application/json"), (b"retry-after", str(retry_after).encode())]
    await send({"type": f"{prefix}.response.start", "status": 429, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})
