"""YOLO decoding, vectorised over the batch, and class-aware NMS.

Layouts (boxes are centre-x, centre-y, width, height in model-input pixels):

- v5: ``[N, A, 5 + C]``: box, objectness, C class scores; a score is objectness * class score.
- v8: ``[N, 4 + C, A]``: box, C class scores, no objectness. Some exports transpose it to
  ``[N, A, 4 + C]``; "auto" accepts that too.
"""

from __future__ import annotations

import numpy as np

MAX_CANDIDATES = 4096  # best-scoring boxes per image that go into NMS (the rest cannot matter)


def resolve_layout(shape: tuple[int, ...], num_classes: int, layout: str = "auto") -> str:
    """``v5``, ``v8`` or ``v8t`` (v8 transposed) for an output of ``shape`` ([N, ., .])."""
    if len(shape) != 3:
        raise ValueError(f"a YOLO output has 3 dimensions [N, ., .], got shape {list(shape)}")
    _, d1, d2 = shape
    c = num_classes
    if layout == "v5":
        if d2 != 5 + c:
            raise ValueError(f"output shape {list(shape)} is not v5 [N, A, 5+{c}]")
        return "v5"
    if layout == "v8":
        if d1 == 4 + c:
            return "v8"
        if d2 == 4 + c:
            return "v8t"
        raise ValueError(f"output shape {list(shape)} is not v8 [N, 4+{c}, A]")
    if d1 == 4 + c and d2 != 4 + c and d2 != 5 + c:
        return "v8"
    if d2 == 5 + c and d1 != 4 + c:
        return "v5"
    if d2 == 4 + c and d1 != 4 + c:
        return "v8t"
    raise ValueError(
        f"output shape {list(shape)} fits neither YOLO layout for {c} classes, or both: "
        'set [head] layout = "v5" or "v8" in model.toml'
    )


def decode(raw: np.ndarray, num_classes: int, layout: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes_xyxy [N, A, 4], scores [N, A], class_ids [N, A]) for a batch of raw outputs."""
    kind = resolve_layout(raw.shape, num_classes, layout)
    rows = raw.transpose(0, 2, 1) if kind == "v8" else raw  # [N, A, 4(+1)+C], a view
    rows = rows.astype(np.float32, copy=False)
    if kind == "v5":
        cls_scores = rows[..., 5:] * rows[..., 4:5]
    else:
        cls_scores = rows[..., 4:]
    class_ids = cls_scores.argmax(axis=2)
    scores = np.take_along_axis(cls_scores, class_ids[..., None], axis=2)[..., 0]
    half = rows[..., 2:4] / 2
    boxes = np.concatenate([rows[..., 0:2] - half, rows[..., 0:2] + half], axis=2)
    return boxes, scores, class_ids


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Class-aware greedy NMS: indices kept, best first.

    Boxes of different classes never suppress each other: each class is shifted by more than the
    extent of all boxes, so boxes of two classes cannot overlap.
    """
    if len(boxes) == 0 or limit <= 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")[:MAX_CANDIDATES]
    span = float(boxes[order].max() - boxes[order].min()) + 1.0
    b = boxes.astype(np.float64) + class_ids[:, None].astype(np.float64) * span
    areas = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(b[i, 0], b[rest, 0])
        yy1 = np.maximum(b[i, 1], b[rest, 1])
        xx2 = np.minimum(b[i, 2], b[rest, 2])
        yy2 = np.minimum(b[i, 3], b[rest, 3])
        inter = (xx2 - xx1).clip(0) * (yy2 - yy1).clip(0)
        union = areas[i] + areas[rest] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)
