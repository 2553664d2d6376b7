"""YOLO decoding, vectorised: v5-style [N, A, 5+C] (with objectness) and v8-style [N, 4+C, A]."""

from __future__ import annotations

import numpy as np


def candidates(raw: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes_xyxy [A,4], scores [A], class_ids [A]) for one image's raw output.

    The layout is told apart by shape: v8 puts the 4+C channels first (``[4+C, A]``).
    """
    if raw.ndim != 2:
        raise ValueError(f"expected a 2-D output per image, got shape {raw.shape}")
    if raw.shape[0] == 4 + num_classes and raw.shape[1] != 4 + num_classes:
        rows = raw.T  # v8: [A, 4+C], no objectness
        cls_scores = rows[:, 4:]
    elif raw.shape[1] == 5 + num_classes:
        rows = raw  # v5: [A, 5+C], objectness * class score
        cls_scores = rows[:, 5:] * rows[:, 4:5]
    elif raw.shape[1] == 4 + num_classes:
        rows = raw
        cls_scores = rows[:, 4:]
    else:
        raise ValueError(f"output shape {raw.shape} fits neither YOLO layout for {num_classes} classes")
    class_ids = cls_scores.argmax(axis=1)
    scores = cls_scores[np.arange(len(rows)), class_ids]
    cx, cy, w, h = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, scores, class_ids


def nms(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Class-aware NMS: indices kept, best first. Classes are separated by offsetting boxes."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    offset = class_ids[:, None].astype(np.float32) * (float(boxes.max()) + 1.0)
    b = boxes + offset
    areas = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    order = np.argsort(-scores, kind="stable")
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
        overlap = inter / (areas[i] + areas[rest] - inter + 1e-9)
        order = rest[overlap <= iou]
    return np.array(keep, dtype=np.int64)
