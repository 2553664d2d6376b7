"""The classification head: softmax or probabilities, top-k and a confidence floor per request."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine import heads
from engine.repository import InputConfig, ModelConfig

CFG = ModelConfig(
    name="c",
    directory=Path("/nonexistent"),
    task="classify",
    input=InputConfig(height=8, width=8),
    labels=("cat", "dog", "cup", "car"),
    confidence=0.0,
    max_detections=3,
    top_k=3,
)


def test_softmax_top_k_with_labels() -> None:
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 0.0, 5.0]], dtype=np.float32)
    p = heads.Params(confidence=0.0, max_detections=3)
    first, second = heads.classify({"logits": logits}, CFG, [p, p])
    e = np.exp(logits[0] - 3.0)
    assert [c.label for c in first] == ["dog", "cup", "cat"]
    assert [c.score for c in first] == pytest.approx((e / e.sum())[[1, 2, 0]].tolist())
    assert (second[0].class_id, second[0].label) == (3, "car")


def test_probabilities_floor_and_count_per_request() -> None:
    probs = np.array([[0.1, 0.6, 0.25, 0.05]] * 3, dtype=np.float32).reshape(3, 1, 4)  # [N, 1, C] also fits
    cfg = replace(CFG, softmax=False)
    params = [heads.Params(0.0, 3), heads.Params(0.2, 3), heads.Params(0.0, 1)]
    a, b, c = heads.classify({"probs": probs}, cfg, params)
    assert [(x.label, x.score) for x in a] == [
        ("dog", pytest.approx(0.6)),
        ("cup", pytest.approx(0.25)),
        ("cat", pytest.approx(0.1)),
    ]
    assert [x.label for x in b] == ["dog", "cup"]
    assert [x.label for x in c] == ["dog"]


SSD_CFG = ModelConfig(
    name="d",
    directory=Path("/nonexistent"),
    task="ssd",
    input=InputConfig(height=30, width=40),
    labels=("person", "cat", "dog"),
    confidence=0.5,
    max_detections=100,
)


def _ssd_one_by_one(outputs: dict[str, np.ndarray], params: list[heads.Params]) -> list[list[tuple]]:
    """The SSD head's contract, image by image: the first ``count`` rows, the floor, score order, the cap."""
    out = []
    for i, p in enumerate(params):
        n = min(int(outputs["count"][i]), outputs["scores"].shape[1])
        rows = [k for k in range(n) if outputs["scores"][i, k] >= np.float32(p.confidence)]
        rows.sort(key=lambda k: -outputs["scores"][i, k])  # stable: the earlier row first on a tie
        found = []
        for k in rows[: p.max_detections]:
            ymin, xmin, ymax, xmax = (outputs["boxes"][i, k] * np.float32([30, 40, 30, 40])).tolist()
            c = int(outputs["classes"][i, k])
            found.append(
                (xmin, ymin, xmax, ymax, float(outputs["scores"][i, k]), c, SSD_CFG.labels[c] if c < 3 else str(c))
            )
        out.append(found)
    return out


def test_ssd_head_filters_orders_and_caps_each_image_of_a_batch() -> None:
    rng = np.random.default_rng(7)
    for trial in range(50):
        n, slots = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        scores = rng.choice(np.float32([0.2, 0.5, 0.7, 0.9, 0.95]), size=(n, slots)).astype(np.float32)  # ties
        outputs = {
            "boxes": rng.random((n, slots, 4), dtype=np.float32),
            "scores": scores,
            "classes": rng.integers(0, 5, size=(n, slots)).astype(np.float32),  # 3, 4: no label
            "count": rng.integers(0, slots + 3, size=n).astype(np.float32),  # may claim more rows than exist
        }
        params = [heads.Params(float(rng.choice([0.0, 0.5, 0.8])), int(rng.integers(1, 4))) for _ in range(n)]
        got = heads.ssd(outputs, SSD_CFG, params)
        expected = _ssd_one_by_one(outputs, params)
        assert [[(d.x1, d.y1, d.x2, d.y2, d.score, d.class_id, d.label) for d in image] for image in got] == expected, (
            trial
        )
