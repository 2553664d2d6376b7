"""Output heads: turn a batch of raw model outputs into per-request results (vectorised)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine import yolo as yolo_decode
from engine.repository import ModelConfig
from ipc.messages import Classification, Detection, Tensor


@dataclass(frozen=True)
class Params:
    confidence: float
    max_detections: int


def _label(labels: tuple[str, ...], class_id: int) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)


def _output(outputs: dict[str, np.ndarray], cfg: ModelConfig, key: str) -> np.ndarray:
    name = cfg.outputs.get(key, key)
    if name not in outputs:
        raise KeyError(f"model {cfg.name} has no output {name!r} (outputs.{key} in model.toml)")
    return outputs[name]


def ssd(outputs: dict[str, np.ndarray], cfg: ModelConfig, params: list[Params]) -> list[list[Detection]]:
    """TF Object Detection API layout: normalised (ymin, xmin, ymax, xmax), NMS done in graph.

    The whole batch is filtered and ordered in a few array operations (each request's floor and
    count, then score order within each image), and the kept rows leave NumPy once, as lists:
    per-detection indexing of arrays cost more than the model on small inputs (profiled).
    """
    n = len(params)
    boxes = _output(outputs, cfg, "boxes")[:n]
    scores = _output(outputs, cfg, "scores")[:n]
    classes = _output(outputs, cfg, "classes")[:n]
    count = _output(outputs, cfg, "count").reshape(n, -1)[:, 0].astype(np.int64)
    floors = np.array([p.confidence for p in params], dtype=scores.dtype)[:, None]
    valid = (np.arange(scores.shape[1]) < count[:, None]) & (scores >= floors)
    rows, cols = np.nonzero(valid)  # by image, then by position
    kept = scores[rows, cols]
    order = np.lexsort((-kept, rows))  # by image, then by score (stable: position breaks ties)
    rows, cols = rows[order], cols[order]
    h, w = cfg.input.height, cfg.input.width
    scaled = (boxes[rows, cols] * np.array([h, w, h, w], dtype=np.float32)).tolist()
    labels = cfg.labels
    results: list[list[Detection]] = [[] for _ in params]
    for r, (y1, x1, y2, x2), score, class_id in zip(
        rows.tolist(), scaled, kept[order].tolist(), classes[rows, cols].astype(np.int64).tolist(), strict=True
    ):
        found = results[r]
        if len(found) < params[r].max_detections:
            found.append(
                Detection(x1=x1, y1=y1, x2=x2, y2=y2, score=score, class_id=class_id, label=_label(labels, class_id))
            )
    return results


def classify(outputs: dict[str, np.ndarray], cfg: ModelConfig, params: list[Params]) -> list[list[Classification]]:
    """Top classes per image: softmax over logits (unless the model outputs probabilities,
    ``[head] softmax = false``), the best ``max_detections`` (default: ``top_k``) above the floor."""
    logits = _output(outputs, cfg, "logits") if "logits" in cfg.outputs else next(iter(outputs.values()))
    logits = logits.reshape(len(params), -1).astype(np.float32)
    if cfg.softmax:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
    else:
        probs = logits
    k = min(max(p.max_detections for p in params), probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_probs = np.take_along_axis(probs, top, axis=1)
    above = top_probs >= np.array([p.confidence for p in params], dtype=probs.dtype)[:, None]
    results = []
    for p, ids, scores, keep in zip(params, top.tolist(), top_probs.tolist(), above.tolist(), strict=True):
        results.append(
            [
                Classification(class_id=c, label=_label(cfg.labels, c), score=score)
                for c, score, ok in zip(ids[: p.max_detections], scores, keep, strict=False)
                if ok
            ]
        )
    return results


def raw(outputs: dict[str, np.ndarray], n: int) -> list[list[Tensor]]:
    return [
        [
            Tensor(
                name=name, dtype=str(arr.dtype), shape=list(arr.shape[1:]), data=np.ascontiguousarray(arr[i]).tobytes()
            )
            for name, arr in outputs.items()
        ]
        for i in range(n)
    ]


def yolo(outputs: dict[str, np.ndarray], cfg: ModelConfig, params: list[Params]) -> list[list[Detection]]:
    """Decode the whole batch at once, then per image: confidence floor and class-aware NMS."""
    raw_out = _output(outputs, cfg, "output") if "output" in cfg.outputs else next(iter(outputs.values()))
    boxes, scores, class_ids = yolo_decode.decode(raw_out[: len(params)], cfg.num_classes, cfg.yolo_layout)
    results = []
    for i, p in enumerate(params):
        mask = np.flatnonzero(scores[i] >= p.confidence)
        b, s, c = boxes[i, mask], scores[i, mask], class_ids[i, mask]
        keep = yolo_decode.nms(b, s, c, cfg.iou, p.max_detections)
        results.append(
            [
                Detection(
                    x1=float(b[k, 0]),
                    y1=float(b[k, 1]),
                    x2=float(b[k, 2]),
                    y2=float(b[k, 3]),
                    score=float(s[k]),
                    class_id=int(c[k]),
                    label=_label(cfg.labels, int(c[k])),
                )
                for k in keep
            ]
        )
    return results
