"""The YOLO head: decode of both layouts, class-aware NMS, and the generated YOLO-format models that
test_models_api.py serves end to end with letterboxed non-square photos."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from engine import heads
from engine.repository import InputConfig, ModelConfig
from engine.yolo import decode, nms, resolve_layout
from ipc.shm import pid_alive
from tests.harness import Appliance, segments

CLASSES = ("person", "dog", "kite")
# Candidates of the generated models, as (multiplier of the box found in the image, offset in model
# pixels [cx, cy, w, h], objectness, class scores). Expected after NMS (iou 0.45, confidence 0.3):
# 0 kept; 1 (same class, shifted 3 px) suppressed by 0; 2 (same box, other class) kept; 3 under
# the confidence floor; 4 a constant box of another class, kept.
ANCHORS = (
    (1.0, (0, 0, 0, 0), 1.0, (0.9, 0.05, 0.0)),
    (1.0, (3, 2, 0, 0), 1.0, (0.8, 0.1, 0.0)),
    (1.0, (0, 0, 0, 0), 0.875, (0.1, 0.8, 0.0)),  # v5: 0.875 * 0.8 = 0.7
    (1.0, (0, 0, 10, 10), 1.0, (0.0, 0.0, 0.2)),
    (0.0, (128, 128, 20, 16), 1.0, (0.0, 0.0, 0.6)),
)
CONST_BOX = (118.0, 120.0, 138.0, 136.0)  # anchor 4 as x1, y1, x2, y2 in model-input pixels


def yolo_onnx(height: int, width: int, layout: str) -> onnx.ModelProto:
    """A YOLO-format detector, float32 NCHW input in 0..1 like an Ultralytics export.

    It finds the bounding box of the bright (> 0.5) pixels of its input and answers the candidates
    of ANCHORS around it, as [N, A, 5+C] (v5) or [N, 4+C, A] (v8).
    """
    a, c = len(ANCHORS), len(CLASSES)
    mult = np.array([[m] for m, *_ in ANCHORS], dtype=np.float32)  # [A, 1]
    offset = np.array([o for _, o, *_ in ANCHORS], dtype=np.float32)  # [A, 4]
    obj = np.array([[ob] for *_, ob, _ in ANCHORS], dtype=np.float32)  # [A, 1]
    cls = np.array([s for *_, s in ANCHORS], dtype=np.float32)  # [A, C]
    if layout == "v8":  # no objectness: the product is the class score
        cls = cls * obj
    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "ax2"),
        numpy_helper.from_array(np.array([0.5], dtype=np.float32), "half"),
        numpy_helper.from_array(np.array([1.0], dtype=np.float32), "one"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"),
        numpy_helper.from_array(mult, "mult"),
        numpy_helper.from_array(offset, "offset"),
        numpy_helper.from_array(obj, "obj"),
        numpy_helper.from_array(cls, "cls"),
    ]
    nodes = [
        helper.make_node("ReduceMax", ["images", "ax1"], ["bright"], keepdims=0),  # [N, H, W]
        helper.make_node("Greater", ["bright", "half"], ["on"]),
        helper.make_node("Cast", ["on"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["mask", "ax1"], ["cols"], keepdims=0),  # [N, W]
        helper.make_node("ReduceMax", ["mask", "ax2"], ["rows"], keepdims=0),  # [N, H]
    ]
    for name, profile in (("x", "cols"), ("y", "rows")):
        nodes += [
            helper.make_node("ArgMax", [profile], [f"{name}1i"], axis=1, keepdims=1),
            helper.make_node("ArgMax", [profile], [f"{name}2i"], axis=1, keepdims=1, select_last_index=1),
            helper.make_node("Cast", [f"{name}1i"], [f"{name}1"], to=TensorProto.FLOAT),
            helper.make_node("Cast", [f"{name}2i"], [f"{name}2l"], to=TensorProto.FLOAT),
            helper.make_node("Add", [f"{name}2l", "one"], [f"{name}2"]),  # the last bright pixel's far edge
            helper.make_node("Add", [f"{name}1", f"{name}2"], [f"{name}s"]),
            helper.make_node("Mul", [f"{name}s", "half"], [f"c{name}"]),
            helper.make_node("Sub", [f"{name}2", f"{name}1"], [f"{name}w"]),
        ]
    nodes += [
        helper.make_node("Concat", ["cx", "cy", "xw", "yw"], ["box"], axis=1),  # [N, 4]
        helper.make_node("Unsqueeze", ["box", "ax1"], ["box1"]),  # [N, 1, 4]
        helper.make_node("Mul", ["box1", "mult"], ["scaled"]),  # [N, A, 4]
        helper.make_node("Add", ["scaled", "offset"], ["boxes"]),
        helper.make_node("Slice", ["box1", "ax1", "ax2", "ax2"], ["one_col"]),  # [N, 1, 1]: the batch
        helper.make_node("Mul", ["one_col", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "cls"], ["scores"]),  # [N, A, C]
        helper.make_node("Add", ["nothing", "obj"], ["objectness"]),  # [N, A, 1]
    ]
    if layout == "v5":
        nodes.append(helper.make_node("Concat", ["boxes", "objectness", "scores"], ["output"], axis=2))
        out_shape: list[int | str] = ["N", a, 5 + c]
    else:
        nodes += [
            helper.make_node("Concat", ["boxes", "scores"], ["rows_v8"], axis=2),
            helper.make_node("Transpose", ["rows_v8"], ["output"], perm=[0, 2, 1]),
        ]
        out_shape = ["N", 4 + c, a]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, height, width])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)
    model = helper.make_model(
        helper.make_graph(nodes, f"yolo_{layout}", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def write_yolo(
    repo: Path,
    name: str,
    layout: str,
    *,
    height: int = 256,
    width: int = 256,
    task: str = "yolo",
    versions: tuple[int, ...] = (1,),
    max_batch_size: int = 8,
    delay_ms: float = 2.0,
) -> Path:
    directory = repo / name
    for v in versions:
        (directory / str(v)).mkdir(parents=True, exist_ok=True)
        onnx.save(yolo_onnx(height, width, layout), str(directory / str(v) / "model.onnx"))
    (directory / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    head = f'[head]\nlayout = "{layout}"\n' if task == "yolo" and layout == "v5" else ""  # v8: "auto"
    thresholds = "[thresholds]\nconfidence = 0.3\niou = 0.45\n" if task == "yolo" else ""
    (directory / "model.toml").write_text(
        f"""task = "{task}"
labels = "labels.txt"
[input]
name = "images"
height = {height}
width = {width}
{'resize = "letterbox"' if task == "yolo" else 'resize = "stretch"'}
pad_value = 114
layout = "NCHW"
dtype = "float32"
scale = 0.00392156862745098
{head}{thresholds}[batching]
max_batch_size = {max_batch_size}
max_queue_delay_ms = {delay_ms}
"""
    )
    return directory


@contextmanager
def serving(app: Appliance, timeout: float = 90) -> Iterator[Appliance]:
    """``with Appliance(...)``, but a start that fails also stops what it started; then no segment of
    a process that is gone may be left in /dev/shm (live ones may be other tests')."""
    before = segments()
    try:
        yield app.start(timeout)
    finally:
        app.__exit__()
        left = [s for s in segments() - before if not pid_alive(int(s.split("-")[2]))]
        assert not left, f"segments left in /dev/shm: {left}"


def rectangle_png(size: tuple[int, int], box: tuple[int, int, int, int]) -> bytes:
    """A black image with a white rectangle covering pixels [x1, x2) x [y1, y2)."""
    img = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = 255
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def letterbox_back(box: tuple[float, ...], size: tuple[int, int], height: int, width: int) -> list[float]:
    """Model-input pixels -> original pixels, computed independently of frontend/imaging.py."""
    r = min(width / size[0], height / size[1])
    nw, nh = round(size[0] * r), round(size[1] * r)
    left, top = (width - nw) // 2, (height - nh) // 2
    sx, sy = nw / size[0], nh / size[1]
    return [(box[0] - left) / sx, (box[1] - top) / sy, (box[2] - left) / sx, (box[3] - top) / sy]


# ------------------------------------------------------------------ unit: decode and NMS


def _cfg(layout: str = "auto", num_classes: int = 3) -> ModelConfig:
    return ModelConfig(
        name="y",
        directory=Path("/nonexistent"),
        task="yolo",
        input=InputConfig(height=64, width=64),
        labels=CLASSES[:num_classes],
        num_classes=num_classes,
        yolo_layout=layout,
        iou=0.5,
    )


def test_decode_reads_both_layouts_the_same() -> None:
    rng = np.random.default_rng(1)
    n, a, c = 2, 50, 3
    rows = np.concatenate([rng.uniform(10, 50, (n, a, 4)), rng.uniform(0, 1, (n, a, c))], axis=2).astype(np.float32)
    v8 = rows.transpose(0, 2, 1)
    obj = np.full((n, a, 1), 0.5, dtype=np.float32)
    v5 = np.concatenate([rows[..., :4], obj, rows[..., 4:] * 2], axis=2)  # 0.5 * 2x = the same scores
    b8, s8, c8 = decode(v8, c)
    b5, s5, c5 = decode(v5, c)
    bt, st, ct = decode(rows, c)  # v8 exported transposed
    for b, s, k in ((b5, s5, c5), (bt, st, ct)):
        np.testing.assert_allclose(b, b8, rtol=1e-6)
        np.testing.assert_allclose(s, s8, rtol=1e-6)
        np.testing.assert_array_equal(k, c8)
    cx, cy, w, h = rows[1, 7, :4]
    np.testing.assert_allclose(b8[1, 7], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], rtol=1e-6)
    assert s8[1, 7] == rows[1, 7, 4:].max() and c8[1, 7] == rows[1, 7, 4:].argmax()


def test_layout_resolution() -> None:
    assert resolve_layout((1, 84, 8400), 80) == "v8"
    assert resolve_layout((1, 25200, 85), 80) == "v5"
    assert resolve_layout((1, 8400, 84), 80) == "v8t"
    with pytest.raises(ValueError, match="neither"):
        resolve_layout((1, 7, 8), 3)  # [4+C, 5+C]: both fit, the model.toml must say
    assert resolve_layout((1, 7, 8), 3, "v5") == "v5" and resolve_layout((1, 7, 8), 3, "v8") == "v8"
    with pytest.raises(ValueError, match="is not v5"):
        resolve_layout((1, 84, 8400), 80, "v5")


def test_nms_is_class_aware() -> None:
    boxes = np.array(
        [
            [10, 10, 50, 50],
            [12, 11, 51, 52],
            [10, 10, 50, 50],
            [100, 100, 120, 130],
            [-30, -20, 5, 5],
            [-29, -20, 5, 6],
        ],
        dtype=np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], dtype=np.float32)
    classes = np.array([0, 0, 1, 0, 2, 2])
    keep = nms(boxes, scores, classes, 0.45, 100)
    # 1 overlaps 0 (same class); 2 is the same box as 0 but another class; 5 overlaps 4 (negative coords)
    assert keep.tolist() == [0, 2, 3, 4]
    assert nms(boxes, scores, classes, 0.45, 2).tolist() == [0, 2]
    assert nms(boxes, scores, np.zeros(6, dtype=np.int64), 0.45, 100).tolist() == [0, 3, 4]
    assert nms(boxes[:0], scores[:0], classes[:0], 0.45, 100).tolist() == []


def test_head_applies_confidence_and_limit_per_request() -> None:
    # batch of 2 with the same candidates; request 1 asks for a higher floor and one detection
    rows = np.array(
        [
            [30, 30, 20, 20, 0.9, 0.0, 0.0],
            [31, 30, 20, 20, 0.8, 0.0, 0.0],
            [30, 30, 20, 20, 0.0, 0.6, 0.0],
            [5, 5, 4, 4, 0.0, 0.0, 0.35],
        ],
        dtype=np.float32,
    )
    batch = np.stack([rows.T, rows.T])  # v8
    params = [heads.Params(confidence=0.3, max_detections=100), heads.Params(confidence=0.5, max_detections=1)]
    first, second = heads.yolo({"output": batch}, _cfg(), params)
    assert [(d.label, round(d.score, 2)) for d in first] == [("person", 0.9), ("dog", 0.6), ("kite", 0.35)]
    assert [(d.label, d.x1, d.y1, d.x2, d.y2) for d in second] == [("person", 20, 20, 40, 40)]
