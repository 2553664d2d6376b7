"""Prometheus metrics of the gRPC API: RPCs by method and status code, and their durations.

Beside the HTTP ones of frontend/metrics.py, in the same multiprocess directory, so /metrics shows
them for every worker. A stream counts once, when it ends, with its whole duration.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

Record = Callable[[str, str, float], None]


@functools.cache  # once per process: prometheus_client refuses a metric registered twice
def prometheus_recorder() -> Record:
    """Imported here, at the server's start: prometheus_client must see the worker's metrics dir."""
    from prometheus_client import Counter, Histogram

    from frontend.metrics import _BUCKETS

    requests = Counter("ringserve_grpc_requests", "gRPC calls by method and status code", ["method", "code"])
    duration = Histogram("ringserve_grpc_request_duration_seconds", "gRPC call duration", ["method"], buckets=_BUCKETS)

    def record(method: str, code: str, seconds: float) -> None:
        requests.labels(method, code).inc()
        duration.labels(method).observe(seconds)

    return record


def _code(context: grpc.aio.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class Observe(grpc.aio.ServerInterceptor):
    def __init__(self, record: Record) -> None:
        self.record = record

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # grpc.health.v1 Watch
            return grpc.unary_stream_rpc_method_handler(
                self._stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, inner: Any) -> Any:
        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, failed = time.perf_counter(), True
            try:
                reply = await inner(request, context)
                failed = False
                return reply
            finally:
                self.record(method, _code(context, failed), time.perf_counter() - started)

        return timed

    def _stream(self, method: str, inner: Any) -> Any:
        async def timed(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, failed = time.perf_counter(), True
            try:
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for reply in result:
                        yield reply
                else:  # a handler that writes with context.write, or only aborts
                    await result
                failed = False
            finally:
                self.record(method, _code(context, failed), time.perf_counter() - started)

        return timed
