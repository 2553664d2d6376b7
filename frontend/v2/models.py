"""Model resolution with Triton's errors, model metadata and the model configuration extension."""

from __future__ import annotations

from typing import Any

from frontend.client import EngineClient
from frontend.params import positive_version
from frontend.v2 import codec
from frontend.v2.errors import V2Error, bad
from frontend.v2.inputs import input_name
from frontend.v2.outputs import extra_output, output_specs
from ipc.errors import EngineUnavailable
from ipc.messages import ModelInfo

PLATFORM = "onnxruntime_onnx"


def known(client: EngineClient) -> dict[tuple[str, int], ModelInfo]:
    """The models the engine announced (kept while it restarts, for metadata)."""
    if not client.models:
        raise EngineUnavailable("the engine has not announced its models yet")
    return client.models


def versions(client: EngineClient, name: str) -> list[int]:
    return sorted(v for n, v in known(client) if n == name)


def resolve(client: EngineClient, name: str, version: str) -> ModelInfo:
    """The model version named by a V2 path, with tritonserver's messages and codes."""
    available = versions(client, name)
    if not available:
        raise bad(f"Request for unknown model: '{name}' is not found")
    if not version:
        return client.models[(name, available[-1])]
    number = positive_version(version)
    if number is None:
        raise bad(f"failed to parse model version '{version}' of model '{name}'")
    info = client.models.get((name, number))
    if info is None:
        raise V2Error(404, f"Request for unknown model: '{name}' version {version} is not found")
    return info


def is_ready(client: EngineClient, info: ModelInfo) -> bool:
    return client.is_ready and (info.name, info.version) in client.models


def metadata(client: EngineClient, info: ModelInfo, versioned: bool) -> dict[str, Any]:
    h, w = info.input.height, info.input.width
    return {
        "name": info.name,
        "versions": [str(info.version)] if versioned else [str(v) for v in versions(client, info.name)],
        "platform": PLATFORM,
        "inputs": [{"name": input_name(info), "datatype": "UINT8", "shape": [-1, h, w, 3]}],
        "outputs": [{"name": n, "datatype": t, "shape": s} for n, t, s in output_specs(info)],
    }


def config(client: EngineClient, info: ModelInfo) -> dict[str, Any]:
    """Triton's model configuration (model_config.proto as JSON) describing what is served."""
    gpu = bool(client.ready and client.ready.providers and client.ready.providers[0].startswith("CUDA"))
    extra = extra_output(info)
    return {
        "name": info.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"specific": {"versions": [info.version]}},
        "max_batch_size": info.max_batch_size,
        "input": [
            {
                "name": input_name(info),
                "data_type": "TYPE_UINT8",
                "format": "FORMAT_NHWC",
                "dims": [info.input.height, info.input.width, 3],
            }
        ],
        "output": [{"name": n, "data_type": codec.config_type(t), "dims": s[1:]} for n, t, s in output_specs(info)],
        "dynamic_batching": {
            "preferred_batch_size": [info.max_batch_size],
            "max_queue_delay_microseconds": round(info.max_queue_delay_ms * 1000),
            "preserve_ordering": False,
            "default_queue_policy": {"max_queue_size": info.queue_limit, "timeout_action": "REJECT"},
        },
        "instance_group": [{"name": f"{info.name}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1}],
        "parameters": {
            "task": {"string_value": info.task},
            "resize": {"string_value": info.input.resize},
            "encoded_images": {
                "string_value": (
                    f"input '{input_name(info)}' also accepts a BYTES tensor [N] of encoded images "
                    "(JPEG, PNG, WebP, BMP, GIF, TIFF), resized like the REST API"
                )
            },
            **(
                {
                    "extra_output": {
                        "string_value": (f"'{extra}' is a BYTES tensor [N] of JSON, the REST answer for each image")
                    }
                }
                if extra
                else {}
            ),
        },
    }
