"""Check a model's graph against its model.toml, and fold preprocessing into the graph.

The wire format is always uint8 NHWC RGB at the model's input size. In front of the model's own
input we add, as the model.toml asks: channel flip (RGB->BGR), Cast to the model's dtype, the
normalisation ``(x * scale - mean) / std`` and NHWC->NCHW. The engine then copies ring slots into
the batch and does no per-pixel Python work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.repository import ModelConfig

_DTYPES = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_NAMES: dict[int, str] = {int(v): k for k, v in _DTYPES.items()}
_NP = {"float32": np.float32, "float16": np.float16}
WIRE_INPUT = "ringserve_pixels"


def needs_folding(cfg: ModelConfig) -> bool:
    i = cfg.input
    # A uint8 input takes the pixels as they are; normalisation only applies to float inputs.
    return not (i.dtype == "uint8" and i.layout == "NHWC" and i.color == "RGB")


@dataclass(frozen=True)
class Prepared:
    """What the engine loads: the graph's bytes, and how large its control-flow subgraphs are."""

    data: bytes
    subgraph_nodes: int


def prepare(cfg: ModelConfig, path: Path) -> bytes:
    """The model's bytes, checked against the model.toml, with a preprocessing prefix if needed."""
    return prepare_model(cfg, path).data


def prepare_model(cfg: ModelConfig, path: Path) -> Prepared:
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises protobuf's DecodeError, OSError and others
        raise cfg.error("version", f"{path} is not a readable ONNX model: {exc}") from None
    check(model, cfg)
    nodes = subgraph_nodes(model.graph)
    if not needs_folding(cfg):
        return Prepared(path.read_bytes(), nodes)
    return Prepared(fold(model, cfg).SerializeToString(), nodes)


def subgraph_nodes(graph: onnx.GraphProto) -> int:
    """Nodes inside Loop/If/Scan bodies, at any depth (the SSD's NMS loop has about 5,500)."""
    total = 0
    for node in graph.node:
        for attr in node.attribute:
            for body in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                total += len(body.node) + subgraph_nodes(body)
    return total


def _dims(value: onnx.ValueInfoProto) -> list[int | str] | None:
    """Static dims as ints, symbolic ones as their name ("" when unnamed); None when unranked."""
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]


def _input_of(model: onnx.ModelProto, cfg: ModelConfig) -> onnx.ValueInfoProto:
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if not inputs:
        raise cfg.error("input.name", "the graph has no input")
    target = cfg.input.name or names[0]
    if target not in names:
        raise cfg.error("input.name", f"the graph has no input {target!r} (it has {names})")
    if len(inputs) > 1:
        others = [n for n in names if n != target]
        raise cfg.error("input.name", f"the graph has other inputs {others} that the engine cannot feed")
    return inputs[names.index(target)]


def check(model: onnx.ModelProto, cfg: ModelConfig) -> None:
    """Refuse a graph whose input or outputs do not fit the model.toml, naming the field."""
    i = cfg.input
    value = _input_of(model, cfg)
    elem = value.type.tensor_type.elem_type
    if elem != _DTYPES[i.dtype]:
        actual = _NAMES.get(elem, TensorProto.DataType.Name(elem).lower())
        raise cfg.error("input.dtype", f"is {i.dtype!r}, but graph input {value.name!r} is {actual}")
    dims = _dims(value)
    if dims is not None:
        if len(dims) != 4:
            raise cfg.error("input.layout", f"graph input {value.name!r} has rank {len(dims)}, expected 4 ({i.layout})")
        n, h, w, c = (dims[0], dims[2], dims[3], dims[1]) if i.layout == "NCHW" else dims
        if isinstance(c, int) and c != 3:
            raise cfg.error("input.layout", f"is {i.layout}, but graph input {value.name!r} has shape {dims}")
        for key, want, got in (("height", i.height, h), ("width", i.width, w)):
            if isinstance(got, int) and got != want:
                raise cfg.error(
                    f"input.{key}", f"is {want}, but graph input {value.name!r} has shape {dims} ({i.layout})"
                )
        if isinstance(n, int) and n != 0 and n < cfg.max_batch_size:
            raise cfg.error(
                "batching.max_batch_size",
                f"is {cfg.max_batch_size}, but graph input {value.name!r} has a fixed batch of {n}",
            )
    outputs = {o.name: o for o in model.graph.output}
    for role, name in cfg.outputs.items():
        if name not in outputs:
            raise cfg.error(f"outputs.{role}", f"the graph has no output {name!r} (it has {sorted(outputs)})")
    if cfg.task == "classify" and cfg.labels:
        logits = outputs.get(cfg.output_name("logits")) or model.graph.output[0]
        shape = _dims(logits)
        classes = shape[-1] if shape else None
        if isinstance(classes, int) and classes > 0 and classes != len(cfg.labels):
            raise cfg.error("labels", f"has {len(cfg.labels)} lines, but output {logits.name!r} has {classes} classes")
    if cfg.task == "yolo":
        out = outputs.get(cfg.output_name("output")) or model.graph.output[0]
        shape = _dims(out)
        if shape is not None and len(shape) == 3:
            c = cfg.num_classes
            fits = {s for s in shape[1:] if isinstance(s, int)}
            if len(fits) == 2 and not fits & {4 + c, 5 + c}:
                raise cfg.error(
                    "head.num_classes",
                    f"is {c}, but output {out.name!r} has shape {shape}: "
                    f"neither [N, A, 5+{c}] (v5) nor [N, 4+{c}, A] (v8)",
                )


def fold(model: onnx.ModelProto, cfg: ModelConfig) -> onnx.ModelProto:
    graph = model.graph
    target = _input_of(model, cfg).name
    i = cfg.input
    dtype = _NP.get(i.dtype, np.float32)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = WIRE_INPUT

    def step(op: str, *args: str, **attrs: Any) -> None:
        nonlocal current
        out = f"ringserve_pre_{len(nodes)}"
        nodes.append(helper.make_node(op, [current, *args], [out], **attrs))
        current = out

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, f"ringserve_{name}"))
        return f"ringserve_{name}"

    if i.color == "BGR":
        step("Gather", const("bgr", np.array([2, 1, 0], dtype=np.int64)), axis=3)
    # The layout first, on the uint8 pixels (a quarter of the bytes of the float tensor): measured
    # with ORT 1.31 on EfficientNet-Lite0, one thread, 82-89 runs/s with the Transpose after the
    # float ops against 97-103 before them (the model alone on float input: 102-103).
    channels = [1, 3, 1, 1] if i.layout == "NCHW" else [3]
    if i.layout == "NCHW":
        step("Transpose", perm=[0, 3, 1, 2])
    if i.dtype != "uint8":
        step("Cast", to=_DTYPES[i.dtype])
        # (x * scale - mean) / std == x * (scale / std) - mean / std: one Mul and one Sub.
        std = np.array(i.std, dtype=np.float64)
        factor = i.scale / std
        offset = np.array(i.mean, dtype=np.float64) / std
        if not np.all(factor == 1):
            step("Mul", const("factor", factor.astype(dtype).reshape(channels)))
        if np.any(offset != 0):
            step("Sub", const("offset", offset.astype(dtype).reshape(channels)))
    # The last prefix node writes the model's original input name; the original input goes away.
    nodes[-1].output[0] = target
    wire = helper.make_tensor_value_info(WIRE_INPUT, TensorProto.UINT8, ["N", i.height, i.width, 3])
    kept = [x for x in graph.input if x.name != target]
    del graph.input[:]
    graph.input.extend([wire, *kept])
    graph.initializer.extend(inits)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    return model
