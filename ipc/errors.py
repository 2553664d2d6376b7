"""Typed errors shared by both processes.

Each error has a stable ``reason`` code. The engine sends the code in an ``Error`` message; the
frontend turns it back into the exception with :func:`from_reason` and maps it to an HTTP status in
exactly one place (``frontend/errors.py``).
"""

from __future__ import annotations


class RingserveError(Exception):
    reason = "internal"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.reason)
        self.detail = detail or self.reason


class BadInput(RingserveError):
    reason = "bad_input"


class PayloadTooLarge(RingserveError):
    reason = "too_large"


class UnsupportedMedia(RingserveError):
    reason = "unsupported_media"


class InvalidParameter(RingserveError):
    reason = "invalid_parameter"


class ModelNotFound(RingserveError):
    reason = "model_not_found"


class EngineUnavailable(RingserveError):
    reason = "engine_down"


class QueueFull(RingserveError):
    reason = "overload"


class DeadlineExceeded(RingserveError):
    reason = "timeout"


class Unauthorized(RingserveError):
    reason = "unauthorized"


class InternalError(RingserveError):
    reason = "internal"


_BY_REASON: dict[str, type[RingserveError]] = {
    cls.reason: cls
    for cls in (
        BadInput,
        PayloadTooLarge,
        UnsupportedMedia,
        InvalidParameter,
        ModelNotFound,
        EngineUnavailable,
        QueueFull,
        DeadlineExceeded,
        Unauthorized,
        InternalError,
    )
}


def from_reason(reason: str, detail: str) -> RingserveError:
    return _BY_REASON.get(reason, InternalError)(detail)
