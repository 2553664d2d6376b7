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
