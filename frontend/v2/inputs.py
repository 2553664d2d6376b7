"""The input of a V2 request: raw pixels or encoded images, from JSON, binary data or shared memory.

Two forms are accepted under the model's input name (the datatype tells them apart):

- UINT8 ``[N, H, W, 3]`` (or ``[H, W, 3]``, a batch of one): RGB pixels of exactly the model's
  input size, copied straight into the ring slot;
- BYTES ``[N]`` (or ``[N, 1]``): encoded images (JPEG, PNG, WebP, BMP, GIF, TIFF), decoded and
  resized like the REST path. As JSON ``data`` each element is the image in base64 (raw image
  bytes are not valid JSON strings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from frontend.params import b64decode
from frontend.v2 import codec
from frontend.v2.errors import bad
from frontend.v2.schemas import InferRequest, RequestInput, int_param
from frontend.v2.shm import ShmRegistry
from ipc.messages import ModelInfo


@dataclass(frozen=True)
class Images:
    pixels: np.ndarray | None = None  # (N, H, W, 3) uint8, maybe a view of the body or a region
    encoded: tuple[bytes, ...] = ()

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.encoded)


def input_name(info: ModelInfo) -> str:
    return info.inputs[0][0] if info.inputs else "image"


def read(req: InferRequest, binary: memoryview, info: ModelInfo, shm: ShmRegistry) -> Images:
    name = input_name(info)
    if len(req.inputs) != 1 or req.inputs[0].name != name:
        given = [i.name for i in req.inputs]
        raise bad(f"expected 1 input named '{name}' for model '{info.name}', got {given}")
    inp = req.inputs[0]
    raw = _raw(inp, binary, shm)
    if inp.datatype == "UINT8":
        images = Images(pixels=_pixels(inp, raw, info))
    elif inp.datatype == "BYTES":
        images = Images(encoded=_encoded(inp, raw))
    else:
        raise bad(
            f"inference input '{name}' data-type is '{inp.datatype}', but model '{info.name}' "
            "expects 'UINT8' (pixels) or 'BYTES' (encoded images)"
        )
    limit = max(info.max_batch_size, 1)
    if not 1 <= images.count <= limit:
        raise bad(f"inference request batch-size must be <= {limit} for '{info.name}', got {images.count}")
    return images


def _raw(inp: RequestInput, binary: memoryview, shm: ShmRegistry) -> memoryview | None:
    """The tensor's bytes when sent as binary data or in shared memory; None for JSON ``data``."""
    what = f"input '{inp.name}'"
    p = inp.parameters
    size = int_param(p, "binary_data_size", what)
    region = p.get("shared_memory_region")
    sources = (size is not None) + (region is not None) + (inp.data is not None)
    if sources != 1:
        raise bad(f"{what} needs exactly one of 'data', binary_data_size or shared_memory_region")
    if size is not None:
        if size != len(binary):
            raise bad(f"{what}: binary_data_size is {size} but {len(binary)} bytes follow the JSON header")
        return binary
    if region is not None:
        if not isinstance(region, str):
            raise bad(f"{what}: shared_memory_region must be a string")
        byte_size = int_param(p, "shared_memory_byte_size", what)
        if byte_size is None:
            raise bad(f"{what}: shared_memory_byte_size is required with shared_memory_region")
        offset = int_param(p, "shared_memory_offset", what, 0) or 0
        return shm.read(region, offset, byte_size, what)
    if binary:
        raise bad(f"{len(binary)} bytes of binary data follow the JSON header but no input claims them")
    return None


def _pixels(inp: RequestInput, raw: memoryview | None, info: ModelInfo) -> np.ndarray:
    h, w = info.input.height, info.input.width
    shape = list(inp.shape)
    if shape[1:] == [h, w, 3] and len(shape) == 4:
        n = shape[0]
    elif shape == [h, w, 3]:
        n = 1
    else:
        raise bad(
            f"unexpected shape for input '{inp.name}' for model '{info.name}'. Expected [-1,{h},{w},3], got {shape}"
        )
    count = n * h * w * 3
    if raw is not None:
        if len(raw) != count:
            raise bad(f"unexpected total byte size {len(raw)} for input '{inp.name}', expecting {count}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(n, h, w, 3)
    try:
        values = np.asarray(inp.data)
        if values.dtype.kind not in "iub" or values.size != count:
            raise ValueError
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError
    except (ValueError, TypeError):
        raise bad(f"input '{inp.name}': 'data' must hold {count} integers in 0..255 (row-major)") from None
    return values.astype(np.uint8).reshape(n, h, w, 3)


def _encoded(inp: RequestInput, raw: memoryview | None) -> tuple[bytes, ...]:
    shape = list(inp.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise bad(f"input '{inp.name}': a BYTES tensor of encoded images must be [N] or [N,1], got {shape}")
    n = shape[0]
    if raw is not None:
        return tuple(codec.deserialize_bytes(raw, n, f"input '{inp.name}'"))
    data = inp.data
    if not isinstance(data, list):
        raise bad(f"input '{inp.name}': 'data' must be a list of base64 strings")
    flat = [x for row in data for x in row] if data and isinstance(data[0], list) else data
    if len(flat) != n or not all(isinstance(x, str) for x in flat):
        raise bad(f"input '{inp.name}': 'data' must hold {n} base64 strings")
    return tuple(b64decode(x, f"input '{inp.name}': a JSON BYTES element") for x in flat)
