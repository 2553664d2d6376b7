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
    """TF Object Detection API layout: normalised (ymin, xmin, ymax, xmax), NMS done in graph."""
    boxes = _output(outputs, cfg, "boxes")
    scores = _output(outputs, cfg, "scores")
    classes = _output(outputs, cfg, "classes").astype(np.int64)
    count = _output(outputs, cfg, "count").reshape(len(params), -1)[:, 0].astype(np.int64)
    h, w = cfg.input.height, cfg.input.width
    scaled = boxes * np.array([h, w, h, w], dtype=np.float32)
    results = []
    for i, p in enumerate(params):
        n = min(int(count[i]), scores.shape[1])
        keep = np.flatnonzero(scores[i, :n] >= p.confidence)
        keep = keep[np.argsort(-scores[i, keep], kind="stable")][: p.max_detections]
        results.append(
            [
                Detection(
                    x1=float(scaled[i, k, 1]),
                    y1=float(scaled[i, k, 0]),
                    x2=float(scaled[i, k, 3]),
                    y2=float(scaled[i, k, 2]),
                    score=float(scores[i, k]),
                    class_id=int(classes[i, k]),
                    label=_label(cfg.labels, int(classes[i, k])),
                )
                for k in keep
            ]
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
    return [
        [
            Classification(class_id=int(c), label=_label(cfg.labels, int(c)), score=float(probs[i, c]))
            for c in top[i, : p.max_detections]
            if probs[i, c] >= p.confidence
        ]
        for i, p in enumerate(params)
    ]


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
