"""gRPC status codes for ringserve's errors, the way tritonserver chooses them.

Triton maps its error codes to gRPC in one place (``GrpcStatusUtil::CodeToStatus``): INVALID_ARG ->
INVALID_ARGUMENT, NOT_FOUND -> NOT_FOUND, UNAVAILABLE -> UNAVAILABLE, UNSUPPORTED -> UNIMPLEMENTED,
INTERNAL -> INTERNAL, ALREADY_EXISTS -> ALREADY_EXISTS. The V2 HTTP routes already map every error
of ringserve to Triton's HTTP status (``frontend.v2.errors``); this module turns that status into
the gRPC code Triton would send for the same error, so both protocols agree by construction.
"""

from __future__ import annotations

import grpc
from loguru import logger

from frontend.v2.errors import STATUS, V2Error
from frontend.v2.errors import _text as detail_text
from ipc import errors as e

# Triton's HTTP status -> Triton's gRPC code for the same TRITONSERVER_Error
CODE: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ALREADY_EXISTS,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class GrpcError(Exception):
    """An error with the gRPC code Triton would answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def unimplemented(message: str) -> GrpcError:
    return GrpcError(grpc.StatusCode.UNIMPLEMENTED, message)


def status_of(exc: BaseException, what: str) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for an exception raised while serving ``what``."""
    if isinstance(exc, GrpcError):
        code, message = exc.code, exc.message
    elif isinstance(exc, V2Error):
        code, message = CODE.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message
    elif isinstance(exc, e.RingserveError):
        code, message = CODE.get(STATUS.get(type(exc), 500), grpc.StatusCode.INTERNAL), detail_text(exc.detail)
    else:
        logger.opt(exception=exc).error("unhandled error in {}", what)
        return grpc.StatusCode.INTERNAL, "internal server error"
    (logger.warning if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE) else logger.info)(
        "{} -> {}: {}", what, code.name, message
    )
    return code, message
