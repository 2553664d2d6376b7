"""Helpers of the shared-state tests (issue 17): a slow detector, photos, the data dir, counters."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from prometheus_client.mmap_dict import MmapedDict

from tests.models import pixel_detector_onnx, write_pixel_detector


def slow_detector_onnx(size: int = 64, iterations: int = 80_000) -> onnx.ModelProto:
    """The pixel detector plus a Loop whose result (times zero) is added to the score.

    The answers are the pixel detector's, exactly; each run takes about 1 ms per 800 iterations
    on one of these cores, so a job of a few images is still running when a test kills something.
    """
    model = pixel_detector_onnx(size)
    g = model.graph
    body = helper.make_graph(
        [
            helper.make_node("Sin", ["v_in"], ["v_sin"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_sin", "v_in"], ["v_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
    )
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trip"),
            numpy_helper.from_array(np.array(True), "cond0"),
            numpy_helper.from_array(np.zeros(1, np.float32), "v0"),
            numpy_helper.from_array(np.zeros(1, np.float32), "zero1"),
        ]
    )
    for node in g.node:
        if list(node.output) == ["scores"]:
            node.output[0] = "scores_raw"
    g.node.extend(
        [
            helper.make_node("Loop", ["trip", "cond0", "v0"], ["spun"], body=body),
            helper.make_node("Mul", ["spun", "zero1"], ["nothing"]),
            helper.make_node("Add", ["scores_raw", "nothing"], ["scores"]),
        ]
    )
    onnx.checker.check_model(model)
    return model


def write_slow_detector(repo: Path, name: str = "slow", iterations: int = 80_000) -> Path:
    directory = write_pixel_detector(repo, name, max_batch_size=1, delay_ms=0.5)
    onnx.save(slow_detector_onnx(iterations=iterations), str(directory / "1" / "model.onnx"))
    return directory


def png(rgb: tuple[int, int, int], size: tuple[int, int] = (96, 72)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, "PNG")
    return out.getvalue()


def data_dir(repo: Path) -> Path:
    """Where the workers keep their databases by default: data/ beside the model repository."""
    return repo.parent / "data"


def query(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    """A read of a shared database, as any other process on the box would do it."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def counter_by_pid(metrics_dir: Path, name: str, **labels: str) -> dict[int, float]:
    """One counter's value per process, read from the prometheus multiprocess files of the run."""
    found: dict[int, float] = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = f.stem.split("_")[-1]
        if not pid.isdigit():
            continue
        d = MmapedDict(str(f), read_mode=True)
        try:
            for key, value, _ts in d.read_all_values():
                _metric, sample, sample_labels, _help = json.loads(key)
                if sample == f"{name}_total" and sample_labels == labels:
                    found[int(pid)] = found.get(int(pid), 0.0) + value
        finally:
            d.close()
    return found


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a /metrics scrape (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}}") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
