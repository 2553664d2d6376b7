"""Fold preprocessing into the graph, so the wire format is always uint8 NHWC RGB.

In front of the model's own input we add: Cast to the model's dtype, channel flip (RGB->BGR), the
normalisation ``(x * scale - mean) / std`` and NHWC->NCHW, as the model.toml asks. The engine then
copies ring slots into the batch and does no per-pixel Python work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from engine.repository import ModelConfig

_DTYPES = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
_NP = {"float32": np.float32, "float16": np.float16}
WIRE_INPUT = "ringserve_pixels"


def needs_folding(cfg: ModelConfig) -> bool:
    i = cfg.input
    # A uint8 input takes the pixels as they are; normalisation only applies to float inputs.
    return not (i.dtype == "uint8" and i.layout == "NHWC" and i.color == "RGB")


def prepare(cfg: ModelConfig, path: Path) -> bytes:
    """The model's bytes, with a preprocessing prefix when its input is not uint8 NHWC RGB."""
    if not needs_folding(cfg):
        return path.read_bytes()
    model = onnx.load(str(path))
    return fold(model, cfg).SerializeToString()


def fold(model: onnx.ModelProto, cfg: ModelConfig) -> onnx.ModelProto:
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    target = cfg.input.name or inputs[0].name
    if target not in {i.name for i in inputs}:
        raise ValueError(f"{cfg.directory}/model.toml: field 'input.name': no graph input {target!r}")
    i = cfg.input
    dtype = _NP.get(i.dtype, np.float32)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = WIRE_INPUT

    def step(op: str, *args: str, **attrs: object) -> None:
        nonlocal current
        out = f"ringserve_pre_{len(nodes)}"
        nodes.append(helper.make_node(op, [current, *args], [out], **attrs))
        current = out

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, f"ringserve_{name}"))
        return f"ringserve_{name}"

    if i.color == "BGR":
        step("Gather", const("bgr", np.array([2, 1, 0], dtype=np.int64)), axis=3)
    if i.dtype != "uint8":
        step("Cast", to=_DTYPES[i.dtype])
        mean = np.array(i.mean, dtype=dtype) / np.array(i.std, dtype=dtype)
        factor = dtype(i.scale) / np.array(i.std, dtype=dtype)
        if not np.all(factor == 1):
            step("Mul", const("factor", factor.astype(dtype)))
        if np.any(mean != 0):
            step("Sub", const("mean", mean.astype(dtype)))
    if i.layout == "NCHW":
        step("Transpose", perm=[0, 3, 1, 2])
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
