"""The one place where typed errors become HTTP responses: ``{error, detail, request_id}``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from loguru import logger
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, HTTPConnection

from frontend.body import BodyTimeout
from frontend.jsonresp import JSONResponse
from frontend.params import invalid
from ipc import errors as e

STATUS: dict[type[e.RingserveError], int] = {
    e.BadInput: 400,
    e.Unauthorized: 401,
    e.ModelNotFound: 404,
    BodyTimeout: 408,
    e.PayloadTooLarge: 413,
    e.UnsupportedMedia: 415,
    e.InvalidParameter: 422,
    e.EngineUnavailable: 503,
    e.QueueFull: 503,
    e.DeadlineExceeded: 504,
    e.InternalError: 500,
}
RETRY_AFTER = {e.EngineUnavailable: "1", e.QueueFull: "1"}


def request_id(request: HTTPConnection) -> str:
    return getattr(request.state, "request_id", "-")


def error_response(request: HTTPConnection, status: int, error: str, detail: object) -> JSONResponse:
    headers = {"X-Request-ID": request_id(request)}
    return JSONResponse(
        {"error": error, "detail": detail, "request_id": request_id(request)},
        status_code=status,
        headers=headers,
    )


def to_response(request: HTTPConnection, exc: e.RingserveError) -> JSONResponse:
    """The error body, status and Retry-After of ``exc``, counted and logged (also a refused WebSocket)."""
    count = getattr(request.app.state, "count_error", None)
    if count is not None:
        count(exc.reason)
    status = STATUS.get(type(exc), 500)
    response = error_response(request, status, exc.reason, exc.detail)
    if type(exc) in RETRY_AFTER:
        response.headers["Retry-After"] = RETRY_AFTER[type(exc)]
    log = logger.bind(request_id=request_id(request))
    (log.error if status >= 500 and status != 503 else log.info)(
        "{} {} -> {} {}: {}", request.scope.get("method", "WS"), request.url.path, status, exc.reason, exc.detail
    )
    return response


def install(app: FastAPI) -> None:
    @app.exception_handler(e.RingserveError)
    async def _ringserve(request: Request, exc: e.RingserveError) -> JSONResponse:
        return to_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return to_response(request, invalid(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        names = {400: "bad_input", 404: "not_found", 405: "method_not_allowed"}
        response = error_response(request, exc.status_code, names.get(exc.status_code, "http_error"), exc.detail)
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # The client left before its body was complete: nobody reads this answer, and it is no
        # server error (nginx logs such a request as 499).
        logger.bind(request_id=request_id(request)).info(
            "{} {}: the client disconnected before its body was complete", request.method, request.url.path
        )
        return error_response(request, 400, "client_disconnected", "the client disconnected")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return internal(request)


def internal(request: HTTPConnection) -> JSONResponse:
    """The 500 of an unexpected exception (call it while handling one: its traceback is logged)."""
    logger.bind(request_id=request_id(request)).exception("unhandled error")
    return error_response(request, 500, "internal", "internal server error")
