"""The grpc.aio server of one HTTP worker, started and stopped by the app's lifespan.

Every worker binds the same port with SO_REUSEPORT, so the kernel spreads gRPC connections over
the workers as it spreads HTTP ones; each worker serves through its own engine client, so the model
stays in the engine. Message sizes: a request may be as large as an HTTP body may
(RINGSERVE_MAX_BODY_BYTES, plus the protobuf framing); responses are not limited, as tritonserver.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from loguru import logger
from tritonclient.grpc import service_pb2_grpc as rpc

from frontend.client import EngineClient
from frontend.grpc.health import Health
from frontend.grpc.observe import Observe, prometheus_recorder
from frontend.grpc.servicer import InferenceService
from frontend.service import ImageService
from frontend.settings import Settings
from frontend.v2.settings import V2Settings
from frontend.v2.state import V2State

FRAMING_BYTES = 64 * 1024  # the ModelInferRequest around the tensor bytes
STOP_GRACE_S = 5.0
_OPEN = (
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
)


class ApiKey(grpc.aio.ServerInterceptor):
    """RINGSERVE_API_KEY as the metadata ``x-api-key`` (or ``authorization: Bearer <key>``), as for
    HTTP; health and liveness/readiness stay open, as /health and /v2/health are."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(_OPEN) or self._authorised(details):
            return handler
        return _deny(handler)

    def _authorised(self, details: grpc.HandlerCallDetails) -> bool:
        meta = dict(details.invocation_metadata or ())
        key = meta.get("x-api-key", "")
        auth = meta.get("authorization", "")
        if not key and isinstance(auth, str) and auth[:7].lower() == "bearer ":
            key = auth[7:].strip()
        given = key.encode() if isinstance(key, str) else bytes(key)
        return hmac.compare_digest(given, self.key)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required")

    if handler.request_streaming or handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class GrpcServer:
    """None of it exists when RINGSERVE_GRPC_PORT is 0."""

    def __init__(self, server: grpc.aio.Server | None, address: str) -> None:
        self.server = server
        self.address = address

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(STOP_GRACE_S)
            logger.info("gRPC server on {} stopped", self.address)


async def serve(settings: Settings, client: EngineClient, service: ImageService) -> GrpcServer:
    if settings.grpc_port == 0:
        return GrpcServer(None, "")
    limit = settings.max_body_bytes + FRAMING_BYTES
    server = grpc.aio.server(
        interceptors=[Observe(prometheus_recorder()), *([ApiKey(settings.api_key)] if settings.api_key else [])],
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
        ],
    )
    rpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(V2State(settings, V2Settings()), client, service), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(Health(client), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot serve gRPC on {address} (RINGSERVE_GRPC_PORT): {exc}") from None
    await server.start()
    logger.info("serving gRPC on {}", address)
    return GrpcServer(server, address)
