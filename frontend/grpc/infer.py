"""One gRPC ``ModelInfer``: the V2 inference path of the HTTP routes, answered in protobuf.

Parsing into the V2 request, the parameters, the input checks, the per-image engine calls, the
output tensors and the box-wide statistics are those of ``frontend.v2``; only the wire format
differs. Outputs are always sent as ``raw_output_contents`` (as tritonserver does), or written to a
registered system shared-memory region when the request asks for it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tritonclient.grpc import service_pb2 as pb

from frontend.client import EngineClient
from frontend.grpc import convert
from frontend.service import ImageService
from frontend.v2 import classification, infer, inputs, models, outputs
from frontend.v2.schemas import InferRequest
from frontend.v2.state import V2State
from ipc.messages import ModelInfo


@dataclass(frozen=True)
class Call:
    """What the transport knows about one request."""

    req_id: str
    time_left: float | None  # seconds until the client's gRPC deadline, if it set one
    accepted: float  # time.monotonic() when the request arrived: deadlines count from it


async def model_infer(
    state: V2State, client: EngineClient, service: ImageService, r: pb.ModelInferRequest, call: Call
) -> pb.ModelInferResponse:
    info = models.resolve(client, r.model_name, r.model_version)
    started = time.perf_counter_ns()
    try:
        return await _infer(state, service, info, r, call, started)
    except Exception:
        state.stats.failure(info.name, info.version, time.perf_counter_ns() - started)
        raise


async def _infer(
    state: V2State, service: ImageService, info: ModelInfo, r: pb.ModelInferRequest, call: Call, started: int
) -> pb.ModelInferResponse:
    settings, shm = state.settings, state.shm
    req, binary = convert.request(r)
    opts = infer.options(req.parameters, settings)
    if call.time_left is not None:
        opts = infer.Options(opts.confidence, opts.max_detections, max(min(opts.timeout, call.time_left), 1e-3))
    counts = classification.requested(req.outputs)
    wanted, raw = outputs.check_requested(info, req.outputs)
    outputs.check_regions(req.outputs, shm)
    images = inputs.read(req, binary, info, shm)
    outcome = await infer.run(service, info, images, call.req_id, opts, raw=raw, accepted=call.accepted)
    building = time.perf_counter_ns()
    tensors = classification.apply(info, outputs.build(info, outcome, wanted), counts)
    response = _response(info, req, tensors, state)
    done = time.perf_counter_ns()
    state.stats.success(info.name, info.version, outcome.sample(done - started, done - building))
    return response


def _response(
    info: ModelInfo, req: InferRequest, tensors: list[outputs.Tensor], state: V2State
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=info.name, model_version=str(info.version), id=req.id)
    params = {o.name: o.parameters for o in req.outputs or []}
    order = {o.name: i for i, o in enumerate(req.outputs or [])}
    for t in sorted(tensors, key=lambda t: order.get(t.name, 0)):
        p = params.get(t.name, {})
        region = p.get("shared_memory_region")
        if region is None:
            response.outputs.append(convert.output_tensor(t, {}))
            response.raw_output_contents.append(t.data)
            continue
        offset = p.get("shared_memory_offset", 0) or 0
        state.shm.write(region, offset, p.get("shared_memory_byte_size", 0), t.data, f"output '{t.name}'")
        written: dict[str, bool | int | str | float] = {
            "shared_memory_region": region,
            "shared_memory_byte_size": len(t.data),
        }
        if offset:
            written["shared_memory_offset"] = offset
        response.outputs.append(convert.output_tensor(t, written))
        response.raw_output_contents.append(b"")  # keeps raw_output_contents[i] aligned with outputs[i]
    return response
