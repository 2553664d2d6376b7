"""Tiny ONNX models generated in the tests, whose outputs are known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# boxes = 0.5 * mean colour mapped: xmin = R/2, ymin = G/2, xmax = R/2 + 0.25 + B/4, ymax = G/2 + 0.25
_W = np.array([[0, 0.5, 0, 0.5], [0.5, 0, 0.5, 0], [0, 0, 0, 0.25]], dtype=np.float32)
_B = np.array([0, 0, 0.25, 0.25], dtype=np.float32)


def expected_box(rgb: tuple[int, int, int], width: int, height: int) -> list[float]:
    """[x1, y1, x2, y2] in original pixels that the pixel detector answers for a flat colour."""
    r, g, b = (c / 255 for c in rgb)
    return [r / 2 * width, g / 2 * height, (r / 2 + 0.25 + b / 4) * width, (g / 2 + 0.25) * height]


def pixel_detector_onnx(size: int = 64, busy: int = 0) -> onnx.ModelProto:
    """An SSD-layout detector whose single box is a function of the image's mean colour.

    ``busy`` > 0 makes it slow for real: that many 512x512 float MatMuls on a state seeded from
    the input (so ONNX Runtime cannot fold them away), whose result enters the scores times zero.
    """
    x = helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, 3])
    outs = [
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["N", 1, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("classes", TensorProto.FLOAT, ["N", 1]),
        helper.make_tensor_value_info("count", TensorProto.FLOAT, ["N"]),
    ]
    inits = [
        numpy_helper.from_array(_W, "W"),
        numpy_helper.from_array(_B, "B"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes_hw"),
        numpy_helper.from_array(np.array([255.0], dtype=np.float32), "k255"),
        numpy_helper.from_array(np.zeros((3, 1), dtype=np.float32), "Z"),
        numpy_helper.from_array(np.array([0.9], dtype=np.float32), "score"),
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf", "axes_hw"], ["mean"], keepdims=0),
        helper.make_node("Div", ["mean", "k255"], ["m"]),
        helper.make_node("MatMul", ["m", "W"], ["b0"]),
        helper.make_node("Add", ["b0", "B"], ["b1"]),
        helper.make_node("Unsqueeze", ["b1", "ax1"], ["boxes"]),
        helper.make_node("MatMul", ["m", "Z"], ["zero"]),
        helper.make_node("Add", ["zero", "score"], ["scores0" if busy else "scores"]),
        helper.make_node("Add", ["zero", "one"], ["classes"]),
        helper.make_node("Reshape", ["classes", "flat"], ["count"]),
    ]
    if busy:
        _add_busy_chain(nodes, inits, busy)
    graph = helper.make_graph(nodes, "pixel_detector", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _add_busy_chain(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], rounds: int) -> None:
    n = 512
    inits += [
        numpy_helper.from_array(np.eye(n, dtype=np.float32), "busy_eye"),
        numpy_helper.from_array(np.array([n, n], dtype=np.int64), "busy_shape"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "busy_zero"),
    ]
    nodes += [
        helper.make_node("ReduceMean", ["xf"], ["busy_seed"], keepdims=0),
        helper.make_node("Expand", ["busy_seed", "busy_shape"], ["busy_s"]),
        helper.make_node("Add", ["busy_s", "busy_eye"], ["busy_0"]),
    ]
    for k in range(rounds):
        nodes.append(helper.make_node("MatMul", [f"busy_{k}", "busy_eye"], [f"busy_{k + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"busy_{rounds}"], ["busy_sum"], keepdims=0),
        helper.make_node("Mul", ["busy_sum", "busy_zero"], ["busy_nil"]),
        helper.make_node("Add", ["scores0", "busy_nil"], ["scores"]),
    ]


def write_pixel_detector(
    repo: Path,
    name: str = "pixels",
    *,
    size: int = 64,
    versions: tuple[int, ...] = (1,),
    max_batch_size: int = 8,
    delay_ms: float = 5.0,
    queue_limit: int = 256,
    busy: int = 0,
    wait_alone: bool = False,
) -> Path:
    directory = repo / name
    for v in versions:
        (directory / str(v)).mkdir(parents=True, exist_ok=True)
        onnx.save(pixel_detector_onnx(size, busy), str(directory / str(v) / "model.onnx"))
    (directory / "labels.txt").write_text("background\nthing\n")
    (directory / "model.toml").write_text(
        f"""task = "ssd"
labels = "labels.txt"
[input]
height = {size}
width = {size}
resize = "stretch"
[outputs]
boxes = "boxes"
scores = "scores"
classes = "classes"
count = "count"
[thresholds]
confidence = 0.5
max_detections = 10
[batching]
max_batch_size = {max_batch_size}
max_queue_delay_ms = {delay_ms}
queue_limit = {queue_limit}
wait_alone = {str(wait_alone).lower()}
"""
    )
    return directory
