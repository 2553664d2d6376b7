"""The outputs of a V2 inference and the response body (JSON, binary tensors or shared memory).

Outputs are the model's raw output tensors, batch dimension first, plus one convenience output
for detectors (``detections``) and classifiers (``classes``): a BYTES tensor ``[N]`` whose element
i is the JSON array the REST API answers for image i, e.g. ``[{"label": "cat", "class_id": 17,
"confidence": 0.87, "bbox": [x1, y1, x2, y2]}]`` with boxes in pixels of the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from frontend.service import ImageResult
from frontend.v2 import codec
from frontend.v2.errors import V2Error, bad
from frontend.v2.infer import Outcome
from frontend.v2.schemas import RequestOutput, bool_param, int_param
from frontend.v2.shm import ShmRegistry
from ipc import messages as m


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: bytes  # row-major little-endian; BYTES serialised with length prefixes
    items: tuple[bytes, ...] = ()  # BYTES elements, for JSON

    def json_data(self) -> Any:
        if self.datatype == "BYTES":
            return [x.decode("utf-8", errors="replace") for x in self.items]
        return np.frombuffer(self.data, dtype=codec.NUMPY[self.datatype])


def extra_output(info: m.ModelInfo) -> str | None:
    """The name of the convenience output of this model's task, unless the graph uses it."""
    name = {"ssd": "detections", "yolo": "detections", "classify": "classes"}.get(info.task)
    return name if name and name not in {o[0] for o in info.outputs} else None


def output_specs(info: m.ModelInfo) -> list[tuple[str, str, list[int]]]:
    """(name, V2 datatype, shape with -1 batch) of every output a request may ask for."""
    specs = [(name, codec.from_ort(t), [-1, *shape[1:]]) for name, t, shape in info.outputs]
    extra = extra_output(info)
    if extra:
        specs.append((extra, "BYTES", [-1]))
    return specs


def check_requested(info: m.ModelInfo, requested: list[RequestOutput] | None) -> tuple[set[str], bool]:
    """The names to compute, and whether the engine must send its raw tensors."""
    known = [s[0] for s in output_specs(info)]
    if not requested:  # none named: all of them, as tritonserver
        return set(known), True
    names = [o.name for o in requested]
    for o in requested:
        if o.name not in known and info.outputs:
            raise bad(f"unexpected inference output '{o.name}' for model '{info.name}'")
    if len(set(names)) != len(names):
        raise bad("an output is requested more than once")
    return set(names), any(name != extra_output(info) for name in names)


def build(info: m.ModelInfo, outcome: Outcome, wanted: set[str]) -> list[Tensor]:
    tensors: list[Tensor] = []
    results = outcome.results
    n = len(results)
    for name in [t.name for t in results[0].tensors] if results else []:
        if name not in wanted:
            continue
        parts = [_find(r, name) for r in results]
        shapes = {tuple(p.shape) for p in parts}
        if len(shapes) != 1:
            raise V2Error(500, f"output '{name}' has different shapes across the batch: {sorted(shapes)}")
        tensors.append(
            Tensor(name, codec.from_numpy(parts[0].dtype), [n, *parts[0].shape], b"".join(p.data for p in parts))
        )
    extra = extra_output(info)
    if extra and extra in wanted:
        items = tuple(orjson.dumps(_summary(info, r)) for r in results)
        tensors.append(Tensor(extra, "BYTES", [n], codec.serialize_bytes(list(items)), items))
    missing = wanted - {t.name for t in tensors}
    if missing:
        raise V2Error(500, f"the engine returned no data for output(s) {sorted(missing)}")
    return tensors


def _find(result: ImageResult, name: str) -> m.Tensor:
    for t in result.tensors:
        if t.name == name:
            return t
    raise V2Error(500, f"the engine returned no output '{name}' for one image")


def _summary(info: m.ModelInfo, r: ImageResult) -> list[dict[str, Any]]:
    """Exactly what the REST API answers for this image."""
    found = r.classes if info.task == "classify" else r.detections
    return [x.model_dump(mode="json") for x in found]


def _region(name: str, p: dict[str, Any]) -> tuple[str, int, int] | None:
    """(region, offset, byte_size) when the output goes to shared memory."""
    region = p.get("shared_memory_region")
    if region is None:
        return None
    what = f"output '{name}'"
    capacity = int_param(p, "shared_memory_byte_size", what)
    if not isinstance(region, str) or capacity is None:
        raise bad(f"{what} needs shared_memory_region (a string) and shared_memory_byte_size")
    return region, int_param(p, "shared_memory_offset", what, 0) or 0, capacity


def check_regions(requested: list[RequestOutput] | None, shm: ShmRegistry) -> None:
    """Refuse bad output regions before any inference runs."""
    for o in requested or []:
        target = _region(o.name, o.parameters)
        if target is not None:
            shm.check(*target, f"output '{o.name}'")


def encode(
    header: dict[str, Any],
    tensors: list[Tensor],
    requested: list[RequestOutput] | None,
    binary_default: bool,
    shm: ShmRegistry,
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    params = {o.name: o.parameters for o in requested or []}
    order = {o.name: i for i, o in enumerate(requested or [])}
    blobs: list[bytes] = []
    outputs = []
    for t in sorted(tensors, key=lambda t: order.get(t.name, 0)):
        p = params.get(t.name, {})
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        target = _region(t.name, p)
        if target is not None:
            region, offset, capacity = target
            shm.write(region, offset, capacity, t.data, f"output '{t.name}'")
            out["parameters"] = {"shared_memory_region": region, "shared_memory_byte_size": len(t.data)}
            if offset:
                out["parameters"]["shared_memory_offset"] = offset
        elif bool_param(p, "binary_data", binary_default):
            out["parameters"] = {"binary_data_size": len(t.data)}
            blobs.append(t.data)
        else:
            out["data"] = t.json_data()
        outputs.append(out)
    body = orjson.dumps({**header, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return body, None
    return body + b"".join(blobs), len(body)
