"""Triton's classification extension: an output asked for with ``classification: k`` (tritonclient's
``class_count``) answers, per batch item, the k largest values of the tensor as BYTES strings
``"score:index"``, with ``":label"`` appended when the model has a label for the index.

As tritonserver does: the values are the output's own (no softmax), sorted in descending order; the
score is printed like C++ ``std::to_string`` (``%f``); the shape is ``[batch, min(k, classes)]``;
a BYTES or BOOL output cannot be classified. Labels are the model's labels file, for an output whose
per-item element count is the number of labels (the logits of a classifier).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from frontend.v2 import codec
from frontend.v2.errors import bad
from frontend.v2.outputs import Tensor
from frontend.v2.schemas import RequestOutput
from ipc.messages import ModelInfo

KEY = "classification"


def requested(outs: list[RequestOutput] | None) -> dict[str, int]:
    """Output name -> class count, for the outputs that ask for classification."""
    counts: dict[str, int] = {}
    for o in outs or []:
        if KEY not in o.parameters:
            continue
        k: Any = o.parameters[KEY]
        if isinstance(k, bool) or not isinstance(k, int):
            raise bad(f"invalid value type for '{KEY}' parameter of output '{o.name}', expected an integer")
        if k < 1:
            raise bad(f"invalid value for '{KEY}' parameter of output '{o.name}', expected >= 1")
        counts[o.name] = k
    return counts


def apply(info: ModelInfo, tensors: list[Tensor], counts: dict[str, int]) -> list[Tensor]:
    """The tensors, those named in ``counts`` replaced by their top-k classification."""
    return [top_k(t, counts[t.name], info.labels) if t.name in counts else t for t in tensors]


def top_k(t: Tensor, k: int, labels: list[str]) -> Tensor:
    dtype = codec.NUMPY.get(t.datatype)
    if dtype is None or t.datatype in ("BYTES", "BOOL"):
        raise bad(f"class result not available for output '{t.name}' due to unsupported type '{t.datatype}'")
    n = t.shape[0] if t.shape else 1
    values = np.frombuffer(t.data, dtype=dtype).reshape(n, -1)
    classes = values.shape[1]
    count = min(k, classes)
    order = np.argsort(-values.astype(np.float64), axis=1, kind="stable")[:, :count]
    named = labels if len(labels) == classes else []
    floating = values.dtype.kind == "f"
    items: list[bytes] = []
    for row, top in zip(values, order, strict=True):
        for i in top:
            text = f"{float(row[i]):f}:{int(i)}" if floating else f"{int(row[i])}:{int(i)}"
            if named:
                text += f":{named[i]}"
            items.append(text.encode())
    return Tensor(t.name, "BYTES", [n, count], codec.serialize_bytes(items), tuple(items))
