"""``grpc.health.v1.Health`` for Kubernetes' gRPC probes, from the worker's view of the engine.

Services: ``""`` and ``inference.GRPCInferenceService`` are SERVING when the engine is connected
and its models are loaded (readiness); ``live`` is SERVING while the worker answers (liveness).
Any other name is NOT_FOUND, as the protocol asks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from frontend.client import EngineClient

Status = health_pb2.HealthCheckResponse.ServingStatus
SERVICE = "inference.GRPCInferenceService"
WATCH_EVERY_S = 0.25


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self, client: EngineClient) -> None:
        self.client = client
        self._status: dict[str, Callable[[], bool]] = {
            "": self._ready,
            SERVICE: self._ready,
            "live": lambda: True,
        }

    def _ready(self) -> bool:
        return bool(self.client.is_ready and self.client.models)

    def _check(self, service: str) -> int | None:
        probe = self._status.get(service)
        if probe is None:
            return None
        return health_pb2.HealthCheckResponse.SERVING if probe() else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        status = self._check(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now, then each change (the worker's view changes with heartbeats; polled)."""
        last: int | None = -1
        while True:
            status = self._check(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if status is None else status
                )
                last = status
            await asyncio.sleep(WATCH_EVERY_S)
