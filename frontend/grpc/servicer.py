"""``inference.GRPCInferenceService``: Triton's gRPC API over the V2 implementation of the HTTP routes.

Every RPC calls what the V2 HTTP routes call (``frontend.v2``: model resolution, metadata, the
model configuration, statistics, system shared memory) and converts the result to Triton's
protobuf message; errors get Triton's gRPC codes (``frontend.grpc.errors``).
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as rpc

from frontend.client import EngineClient
from frontend.grpc import convert
from frontend.grpc.errors import GrpcError, status_of, unimplemented
from frontend.grpc.infer import Call, model_infer
from frontend.service import ImageService
from frontend.v2 import models, repository, stats
from frontend.v2.schemas import RegisterRequest
from frontend.v2.state import V2State

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]
STREAM_IN_FLIGHT = 64  # requests of one stream being served at once; past it the stream is not read
_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id(context: grpc.aio.ServicerContext) -> str:
    given = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    return given if isinstance(given, str) and _ID_RE.match(given) else uuid.uuid4().hex


def rpc_method(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Errors become the gRPC status Triton would answer."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            code, message = status_of(exc, fn.__name__)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return wrapper


class InferenceService(rpc.GRPCInferenceServiceServicer):
    def __init__(self, state: V2State, client: EngineClient, service: ImageService) -> None:
        self.state = state
        self.client = client
        self.service = service

    def _call(self, context: Any, req_id: str) -> Call:
        return Call(req_id, context.time_remaining(), time.monotonic())

    # ----------------------------------------------------------------- server
    @rpc_method
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc_method
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.client.is_ready and self.client.models))

    @rpc_method
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="ringserve", version=self.state.version, extensions=self.state.extensions()
        )

    @rpc_method
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        rows = await repository.index_rows(self.client, request.ready)
        return convert.parse({"models": rows}, pb.RepositoryIndexResponse())

    @rpc_method
    async def RepositoryModelLoad(self, request: Any, context: Any) -> pb.RepositoryModelLoadResponse:
        # As over HTTP: load parameters (config overrides, files) are not supported and not read.
        await repository.control(self.client, "load", request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc_method
    async def RepositoryModelUnload(self, request: Any, context: Any) -> pb.RepositoryModelUnloadResponse:
        await repository.control(self.client, "unload", request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # ----------------------------------------------------------------- models
    @rpc_method
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        known = self.client.models.get((request.name, int(request.version))) if request.version.isdigit() else None
        if not request.version:
            versions = sorted(v for n, v in self.client.models if n == request.name)
            known = self.client.models.get((request.name, versions[-1])) if versions else None
        return pb.ModelReadyResponse(ready=known is not None and models.is_ready(self.client, known))

    @rpc_method
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        info = models.resolve(self.client, request.name, request.version)
        body = models.metadata(self.client, info, versioned=bool(request.version))
        return convert.parse(body, pb.ModelMetadataResponse())

    @rpc_method
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        info = models.resolve(self.client, request.name, request.version)
        return pb.ModelConfigResponse(config=convert.parse(models.config(self.client, info), mc.ModelConfig()))

    @rpc_method
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if not request.name:
            keys = sorted(models.known(self.client))
        elif request.version:
            info = models.resolve(self.client, request.name, request.version)
            keys = [(info.name, info.version)]
        else:
            models.resolve(self.client, request.name, "")
            keys = [(request.name, v) for v in models.versions(self.client, request.name)]
        totals = stats.read_totals(self.state.stats.path.parent)
        body = {"model_stats": [stats.model_stat(n, v, totals.get((n, v))) for n, v in keys]}
        return convert.parse(body, pb.ModelStatisticsResponse())

    # ----------------------------------------------------------------- inference
    @rpc_method
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        call = self._call(context, request_id(context))
        return await model_infer(self.state, self.client, self.service, request, call)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests of one stream are served concurrently; responses go out as they complete, each
        with its request's id; an error answers that request only. At most STREAM_IN_FLIGHT requests
        are being served or waiting for the client to read their response: past that the stream is
        not read, so HTTP/2 flow control holds the client back."""
        stream_id = request_id(context)
        out: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()

        async def one(r: pb.ModelInferRequest, call: Call) -> None:
            try:
                answer = await model_infer(self.state, self.client, self.service, r, call)
                reply = pb.ModelStreamInferResponse(infer_response=answer)
            except Exception as exc:
                _, message = status_of(exc, "ModelStreamInfer")
                head = pb.ModelInferResponse(model_name=r.model_name, model_version=r.model_version, id=r.id)
                reply = pb.ModelStreamInferResponse(error_message=message, infer_response=head)
            out.put_nowait(reply)

        async def read() -> None:
            try:
                n = 0
                async for r in requests:
                    await room.acquire()
                    task = asyncio.create_task(one(r, self._call(context, f"{stream_id}.{n}")))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                await asyncio.gather(*list(tasks))
            finally:
                out.put_nowait(None)  # the end, or the reader failed: its error is raised below

        reader = asyncio.create_task(read())
        try:
            while (reply := await out.get()) is not None:
                yield reply
                room.release()
            await reader
        finally:
            for task in [reader, *tasks]:
                task.cancel()

    # ----------------------------------------------------------------- shared memory
    @rpc_method
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        regions = {str(r["name"]): r for r in self.state.shm.status(request.name)}
        return convert.parse({"regions": regions}, pb.SystemSharedMemoryStatusResponse())

    @rpc_method
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        try:
            r = RegisterRequest(key=request.key, offset=request.offset, byte_size=request.byte_size)
        except ValueError as exc:
            raise GrpcError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed register request: {exc}") from None
        self.state.shm.register(request.name, r.key, r.offset, r.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc_method
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.state.shm.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # ----------------------------------------------------------------- not served
    @rpc_method
    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        raise unimplemented(_NO_CUDA_SHM)

    @rpc_method
    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise unimplemented(_NO_CUDA_SHM)

    @rpc_method
    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        raise unimplemented(_NO_CUDA_SHM)

    @rpc_method
    async def TraceSetting(self, request: Any, context: Any) -> Any:
        raise unimplemented("the trace extension is not supported by ringserve")

    @rpc_method
    async def LogSettings(self, request: Any, context: Any) -> Any:
        raise unimplemented("the logging extension is not supported by ringserve (see RINGSERVE_LOG_LEVEL)")


_NO_CUDA_SHM = "CUDA shared memory is not supported by ringserve; use system shared memory"
