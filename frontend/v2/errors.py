"""V2 errors: ``{"error": "..."}`` with Triton's status codes, never the REST error shape.

Triton maps its error codes to HTTP in one place (``HttpCodeFromError``): INVALID_ARG -> 400,
NOT_FOUND -> 404, UNAVAILABLE -> 503, UNSUPPORTED -> 501, INTERNAL -> 500. ringserve's typed errors
are mapped the same way here, so a client sees what tritonserver would have answered.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi.routing import APIRoute
from loguru import logger
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from frontend.body import BodyTimeout
from ipc import errors as e

STATUS: dict[type[e.RingserveError], int] = {
    e.BadInput: 400,
    e.InvalidParameter: 400,
    e.UnsupportedMedia: 400,
    e.PayloadTooLarge: 400,  # Triton: INVALID_ARG for an oversized request
    e.ModelNotFound: 400,  # Triton: "Request for unknown model" is INVALID_ARG
    e.Unauthorized: 401,
    e.EngineUnavailable: 503,
    e.QueueFull: 503,
    e.DeadlineExceeded: 503,  # Triton: a request past its timeout is UNAVAILABLE
    e.InternalError: 500,
    BodyTimeout: 408,  # the client did not send its body in time
}


class V2Error(Exception):
    """An error raised by the V2 routes with the status Triton would use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> V2Error:
    return V2Error(400, message)


def error_response(status: int, message: str) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return Response(orjson.dumps({"error": message}), status, headers, media_type="application/json")


def to_response(request: Request, exc: Exception) -> Response:
    if isinstance(exc, V2Error):
        status, message = exc.status, exc.message
    elif isinstance(exc, e.RingserveError):
        status, message = STATUS.get(type(exc), 500), _text(exc.detail)
    else:
        logger.exception("unhandled error in {} {}", request.method, request.url.path)
        return error_response(500, "internal server error")
    log = logger.warning if status >= 500 else logger.info
    log("{} {} -> {}: {}", request.method, request.url.path, status, message)
    return error_response(status, message)


def _text(detail: object) -> str:
    if isinstance(detail, list):  # pydantic-style [{"loc", "msg"}] details of InvalidParameter
        return "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg', '')}" for d in detail)
    return str(detail)


class V2Route(APIRoute):
    """Every exception of a V2 endpoint becomes a V2 error here, before the app's REST handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ClientDisconnect:
                raise
            except Exception as exc:
                return to_response(request, exc)

        return handle


# What the schema promises for errors: Triton's ``{"error": "..."}`` with its status codes (above).
_ERROR_BODY = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": what, "content": {"application/json": {"schema": _ERROR_BODY}}}
    for code, what in (
        (400, "invalid request or unknown model"),
        (401, "missing or wrong API key"),
        (404, "not found"),
        (500, "internal error"),
        (503, "engine unavailable or overloaded"),
    )
}
