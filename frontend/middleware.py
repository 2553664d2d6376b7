"""Pure ASGI middleware: request id in and out, Host and Origin checks, optional API key, one log line.

Browsers on the LAN are the threat the checks answer, most of all without an API key (the default):
a cross-site page may open a WebSocket to the appliance or POST to it (a browser sends ``Origin``
with both), and a DNS-rebinding name may point at it. A request whose ``Origin`` is another site is
refused unless CORS allows that origin; with ``RINGSERVE_ALLOWED_HOSTS`` set, an unknown ``Host`` is
refused. Clients that are not browsers send no ``Origin`` and are not affected.

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


_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RequestContext:
    def __init__(
        self,
        app: ASGIApp,
        api_key: str = "",
        observe: Observe | None = None,
        allowed_origins: list[str] | None = None,
        allowed_hosts: list[str] | None = None,
    ) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.observe = observe
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins or []}
        self.allowed_hosts = [h.lower() for h in allowed_hosts or []]

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> tuple[int, str, str] | None:
        """(status, error, detail) when the Host or Origin check refuses the request."""
        host = headers.get(b"host", b"").decode("latin-1").lower()
        if self.allowed_hosts and not _host_allowed(_hostname(host), self.allowed_hosts):
            return 400, "invalid_host", f"host {host!r} is not in RINGSERVE_ALLOWED_HOSTS"
        origin = headers.get(b"origin")
        if origin is None or (scope["type"] == "http" and scope["method"] not in _UNSAFE):
            return None
        value = origin.decode("latin-1").rstrip("/").lower()
        if value != "null" and value.partition("://")[2] == host:
            return None  # same origin: the console served by this appliance
        if value in self.allowed_origins or "*" in self.allowed_origins:
            return None
        return 403, "forbidden_origin", f"origin {value!r} is not allowed (RINGSERVE_CORS_ORIGINS)"

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
            refused = self._refusal(scope, headers)
            if refused is not None:
                logger.warning("refused {} {}: {}", scope["type"], path, refused[2])
                await _refuse(scope, send_with_id, request_id, *refused)
            elif (
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


def _hostname(host: str) -> str:
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _host_allowed(name: str, allowed: list[str]) -> bool:
    """Exact names, ``*`` for any, ``*.example.com`` for its subdomains (Starlette's TrustedHost rules)."""
    return any(a == "*" or name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


async def _unauthorised(scope: Scope, send: Send, request_id: str) -> None:
    await _refuse(scope, send, request_id, 401, "unauthorized", "a valid API key is required")


async def _refuse(scope: Scope, send: Send, request_id: str, status: int, error: str, detail: str) -> None:
    """The JSON error; for a WebSocket handshake too, where the server can answer it in HTTP."""
    prefix = "http"
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": error})  # 403
            return
        prefix = "websocket.http"
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    body = orjson.dumps({"error": error, "detail": detail, "request_id": request_id})
    await send({"type": f"{prefix}.response.start", "status": status, "headers": headers})
    await send({"type": f"{prefix}.response.body", "body": body})
