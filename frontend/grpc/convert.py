"""Triton's gRPC messages to and from the V2 request and tensors that the HTTP routes use.

A ``ModelInferRequest`` becomes the same ``InferRequest`` (and binary data) that the V2 HTTP
routes parse from JSON, so inputs, parameters, shared memory and outputs are checked by one code.
Tensor data arrives either as ``raw_input_contents`` (what ``tritonclient.grpc`` sends) or as typed
``contents`` (``uint_contents`` for UINT8, ``bytes_contents`` for BYTES, as Triton reads them);
both become the binary tensor bytes of the HTTP binary extension.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from frontend.v2 import codec
from frontend.v2.errors import bad
from frontend.v2.outputs import Tensor
from frontend.v2.schemas import InferRequest, RequestInput, RequestOutput

# V2 datatype -> the field of InferTensorContents that carries it (Triton's grpc_utils)
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def param_value(p: pb.InferParameter) -> Any:
    choice = p.WhichOneof("parameter_choice")
    return None if choice is None else getattr(p, choice)


def params(m: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as the dict of the JSON protocol."""
    return {k: param_value(v) for k, v in m.items()}


def set_param(m: Any, key: str, value: bool | int | str | float) -> None:
    p = m[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


def request(r: pb.ModelInferRequest) -> tuple[InferRequest, memoryview]:
    """The V2 request of a gRPC one, and the binary data its single input points at."""
    if r.raw_input_contents and len(r.raw_input_contents) != len(r.inputs):
        raise bad(f"expected {len(r.inputs)} raw input contents, got {len(r.raw_input_contents)}")
    binary = memoryview(b"")
    inputs = []
    for i, inp in enumerate(r.inputs):
        p = params(inp.parameters)
        data = _typed(inp)
        if r.raw_input_contents:
            if data is not None:
                raise bad(f"contents field must not be specified for input '{inp.name}' when using raw_input_contents")
            data = r.raw_input_contents[i]
        if data is not None:
            if "shared_memory_region" in p:
                raise bad(f"input '{inp.name}' has both tensor data and shared_memory_region")
            p["binary_data_size"] = len(data)
            binary = memoryview(data)
        inputs.append({"name": inp.name, "shape": list(inp.shape), "datatype": inp.datatype, "parameters": p})
    if len(inputs) > 1:  # the checks of frontend.v2.inputs refuse it with Triton's message
        binary = memoryview(b"")
    outputs = [{"name": o.name, "parameters": params(o.parameters)} for o in r.outputs]
    try:
        req = InferRequest(
            id=r.id,
            parameters=params(r.parameters),
            inputs=[RequestInput.model_validate(x) for x in inputs],
            outputs=[RequestOutput.model_validate(x) for x in outputs] or None,
        )
    except ValueError as exc:
        raise bad(f"malformed inference request: {exc}") from None
    return req, binary


def _typed(inp: pb.ModelInferRequest.InferInputTensor) -> bytes | None:
    """Typed contents as the tensor's row-major bytes (BYTES: length-prefixed elements)."""
    if not inp.HasField("contents"):
        return None
    field = _CONTENTS.get(inp.datatype)
    values = getattr(inp.contents, field) if field else ()
    if inp.datatype == "BYTES":
        return codec.serialize_bytes(list(values))
    if field is None:
        raise bad(f"input '{inp.name}': datatype '{inp.datatype}' cannot be sent as typed contents")
    dtype = codec.NUMPY[inp.datatype]
    array = np.asarray(values)
    if array.size and array.dtype.kind in "iu" and dtype.kind in "iu":
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise bad(f"input '{inp.name}': {field} holds values out of range for {inp.datatype}")
    return array.astype(dtype).tobytes()


def output_tensor(
    t: Tensor, parameters: dict[str, bool | int | str | float]
) -> pb.ModelInferResponse.InferOutputTensor:
    out = pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
    for key, value in parameters.items():
        set_param(out.parameters, key, value)
    return out


def parse(data: dict[str, Any], message: Message) -> Any:
    """A JSON body of the V2 HTTP routes as the protobuf message Triton's gRPC API answers."""
    return json_format.ParseDict(data, message, ignore_unknown_fields=False)
