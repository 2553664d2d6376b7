"""Tiny generated models that trip the engine on purpose (issue 14), built on tests/models.py."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from tests.models import pixel_detector_onnx, write_pixel_detector


def scalar_output_detector(size: int = 64) -> onnx.ModelProto:
    """The pixel detector plus a 0-d output ``level`` (mean of every pixel of the batch).

    A 0-d tensor has no batch dimension, so per-image raw tensors cannot be cut from it: the V2
    path that asks for raw outputs fails inside the batcher on every request, after the session ran.
    """
    model = pixel_detector_onnx(size)
    graph = model.graph
    graph.node.append(helper.make_node("ReduceMean", ["xf"], ["level"], keepdims=0))
    graph.output.append(helper.make_tensor_value_info("level", TensorProto.FLOAT, []))
    onnx.checker.check_model(model)
    return model


def write_scalar_output_detector(repo: Path, name: str = "scalar", size: int = 64) -> Path:
    directory = write_pixel_detector(repo, name, size=size, max_batch_size=4, delay_ms=2.0)
    onnx.save(scalar_output_detector(size), str(directory / "1" / "model.onnx"))
    return directory
