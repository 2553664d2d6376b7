"""The V2 wire format: datatypes, the binary tensor data extension, BYTES serialisation.

Binary extension: the body is the JSON header (``Inference-Header-Content-Length`` bytes) followed
by each binary tensor, in the order of the inputs (or outputs) in the JSON. A BYTES element is a
4-byte little-endian length and its bytes.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from frontend.params import ascii_int
from frontend.v2.errors import bad

# V2 datatype -> numpy dtype (BYTES: a Python object array of bytes)
NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_FROM_NUMPY = {dt.str: name for name, dt in NUMPY.items() if name != "BYTES"}

# ONNX Runtime type strings of ModelInfo.inputs/outputs -> V2 datatype
_ORT = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def from_numpy(dtype: np.dtype | str) -> str:
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _FROM_NUMPY[dt.newbyteorder("<").str if dt.byteorder == ">" else dt.str]
    except KeyError:
        raise ValueError(f"no V2 datatype for numpy {dt}") from None


def from_ort(ort_type: str) -> str:
    return _ORT.get(ort_type, "BYTES" if "string" in ort_type else "FP32")


def config_type(datatype: str) -> str:
    """V2 datatype -> Triton model-configuration data_type."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def element_count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ------------------------------------------------------------------ request body
def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo a request ``Content-Encoding`` (gzip or deflate, as tritonclient sends), bounded."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise bad(f"unsupported Content-Encoding '{encoding}' (gzip and deflate are)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad(f"the {encoding} request body cannot be decompressed: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise bad(f"the decompressed request body exceeds the limit of {limit} bytes")
    return out


def split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, memoryview(b"")
    n = ascii_int(header_length.strip())
    if n is None:
        raise bad(f"Inference-Header-Content-Length must be a non-negative integer, got '{header_length}'")
    if n == 0 or n > len(body):
        raise bad(f"Inference-Header-Content-Length {n} does not fit a request body of {len(body)} bytes")
    view = memoryview(body)
    return body[:n], view[n:]


# ------------------------------------------------------------------ BYTES
def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def deserialize_bytes(buf: memoryview | bytes, count: int, what: str) -> list[bytes]:
    """Exactly ``count`` length-prefixed elements filling ``buf``."""
    view = memoryview(buf)
    items, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(view):
            raise bad(f"{what}: BYTES data ends inside an element length")
        (size,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + size > len(view):
            raise bad(f"{what}: a BYTES element of {size} bytes runs past the end of the data")
        items.append(bytes(view[pos : pos + size]))
        pos += size
    if pos != len(view):
        raise bad(f"{what}: {len(view) - pos} bytes left after {count} BYTES elements")
    return items
