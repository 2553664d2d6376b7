"""model.toml parsing and the load-time checks against the ONNX graph (no processes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine.graph import prepare
from engine.repository import ModelConfigError, load_config, scan
from tests.models import write_pixel_detector


def identity_onnx(
    shape: list[int | str],
    dtype: int = TensorProto.FLOAT,
    out_shape: list[int | str] | None = None,
    extra_input: bool = False,
) -> onnx.ModelProto:
    """A graph whose output ``y`` is its input ``x`` (optionally reshaped to ``out_shape``)."""
    x = helper.make_tensor_value_info("x", dtype, shape)
    inputs = [x]
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1]))
    y = helper.make_tensor_value_info("y", dtype, out_shape or shape)
    model = helper.make_model(
        helper.make_graph(nodes, "identity", inputs, [y]), opset_imports=[helper.make_opsetid("", 18)]
    )
    model.ir_version = 9
    return model


def write_model(
    repo: Path,
    name: str,
    toml: str,
    model: onnx.ModelProto | None = None,
    versions: tuple[int, ...] = (1,),
    labels: str | None = None,
) -> Path:
    directory = repo / name
    directory.mkdir(parents=True, exist_ok=True)
    for v in versions:
        (directory / str(v)).mkdir(exist_ok=True)
        onnx.save(model or identity_onnx(["N", 3, 8, 8]), str(directory / str(v) / "model.onnx"))
    (directory / "model.toml").write_text(toml)
    if labels is not None:
        (directory / "labels.txt").write_text(labels)
    return directory


RAW = """task = "raw"
[input]
height = 8
width = 8
layout = "NCHW"
dtype = "float32"
"""


def test_a_complete_model_toml_parses(tmp_path: Path) -> None:
    toml = """task = "yolo"
labels = "labels.txt"
description = "a detector"
[source]
anything = "goes here"
[input]
name = "x"
height = 8
width = 8
resize = "letterbox"
pad_value = 0
color = "BGR"
layout = "NCHW"
dtype = "float16"
scale = 0.00392156862745098
mean = [0.485, 0.456, 0.406]
std = 0.5
[outputs]
output = "y"
[head]
layout = "v8"
[thresholds]
confidence = 0.25
iou = 0.6
max_detections = 30
[batching]
max_batch_size = 4
max_queue_delay_ms = 0
queue_limit = 10
"""
    cfg = load_config(write_model(tmp_path, "m", toml, versions=(1, 3, 2), labels="a\nb\n\n"))
    assert cfg.task == "yolo" and cfg.labels == ("a", "b") and cfg.num_classes == 2
    assert cfg.versions == (1, 2, 3)
    assert cfg.input.std == (0.5, 0.5, 0.5) and cfg.input.mean == (0.485, 0.456, 0.406)
    assert (cfg.input.color, cfg.input.layout, cfg.input.dtype, cfg.input.pad_value) == ("BGR", "NCHW", "float16", 0)
    assert (cfg.confidence, cfg.iou, cfg.max_detections, cfg.yolo_layout) == (0.25, 0.6, 30, "v8")
    assert (cfg.max_batch_size, cfg.max_queue_delay_ms, cfg.queue_limit) == (4, 0.0, 10)
    assert cfg.output_name("output") == "y"


def test_defaults_by_task(tmp_path: Path) -> None:
    cfg = load_config(write_model(tmp_path, "r", RAW))
    assert (cfg.input.resize, cfg.input.color, cfg.max_batch_size, cfg.confidence) == ("stretch", "RGB", 1, 0.5)
    yolo = load_config(write_model(tmp_path, "y", RAW.replace('"raw"', '"yolo"') + "[head]\nnum_classes = 80\n"))
    assert (yolo.input.resize, yolo.input.pad_value, yolo.num_classes, yolo.iou) == ("letterbox", 114, 80, 0.45)
    cls = load_config(write_model(tmp_path, "c", RAW.replace('"raw"', '"classify"') + "[thresholds]\ntop_k = 3\n"))
    # A classifier answers its top_k classes whatever their score, unless the client sets a floor.
    assert (cls.confidence, cls.max_detections, cls.softmax) == (0.0, 3, True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda t: t.replace('task = "raw"', 'task = "segment"'), "task"),
        (lambda t: t.replace('task = "raw"\n', ""), "task"),
        (lambda t: t.replace("height = 8\n", ""), "input.height"),
        (lambda t: t.replace("height = 8", "height = -8"), "input.height"),
        (lambda t: t.replace("width = 8", 'width = "8"'), "input.width"),
        (lambda t: t.replace('layout = "NCHW"', 'layout = "CHW"'), "input.layout"),
        (lambda t: t.replace('dtype = "float32"', 'dtype = "int8"'), "input.dtype"),
        (lambda t: t + 'resize = "fill"\n', "input.resize"),
        (lambda t: t + "heigth = 8\n", "input.heigth"),
        (lambda t: t + "std = [1, 0, 1]\n", "input.std"),
        (lambda t: t + "mean = [1, 2]\n", "input.mean"),
        (lambda t: t + "scale = nan\n", "input.scale"),
        (lambda t: t + "pad_value = 300\n", "input.pad_value"),
        (lambda t: t + "resize_short = 256\n", "input.resize_short"),
        (lambda t: t + 'resize = "center-crop"\nresize_short = 4\n', "input.resize_short"),
        (lambda t: t.replace('dtype = "float32"', 'dtype = "uint8"') + "scale = 0.5\n", "input.scale"),
        (lambda t: t + "[thresholds]\nconfidence = 1.5\n", "thresholds.confidence"),
        (lambda t: t + "[thresholds]\niou = 0\n", "thresholds.iou"),
        (lambda t: t + "[batching]\nmax_batch_size = 0\n", "batching.max_batch_size"),
        (lambda t: t + "[batching]\nmax_queue_delay_ms = true\n", "batching.max_queue_delay_ms"),
        (lambda t: t + '[outputs]\nboxes = "y"\n', "outputs.boxes"),
        (lambda t: t + "[head]\nsoftmax = false\n", "head.softmax"),
        (lambda t: t.replace('"raw"', '"yolo"'), "head.num_classes"),
        (lambda t: t + 'labels = "labels.txt"\n', "input.labels"),  # a top-level key after [input]
        (lambda t: 'labels = "missing.txt"\n' + t, "labels"),
        (lambda t: "softmax = false\n" + t, "softmax"),
        (lambda t: t + "input = 3\n", "input.input"),
        (lambda t: 'input = 3\ntask = "raw"\n', "input"),
    ],
)
def test_a_bad_field_is_named_with_its_file(tmp_path: Path, change, field: str) -> None:  # type: ignore[no-untyped-def]
    directory = write_model(tmp_path, "bad", change(RAW))
    with pytest.raises(ModelConfigError) as err:
        load_config(directory)
    message = str(err.value)
    assert message.startswith(f"{directory / 'model.toml'}: field '{field}'"), message


def test_not_toml_and_no_versions(tmp_path: Path) -> None:
    bad = write_model(tmp_path, "bad", "task = \n")
    with pytest.raises(ModelConfigError, match=r"model\.toml: not valid TOML"):
        load_config(bad)
    empty = tmp_path / "empty"
    (empty / "1").mkdir(parents=True)  # a version directory without model.onnx does not count
    (empty / "model.toml").write_text(RAW)
    with pytest.raises(ModelConfigError, match=r"no <version>/model\.onnx"):
        load_config(empty)


def test_scan_keeps_the_good_models_and_names_the_bad_ones(tmp_path: Path) -> None:
    write_pixel_detector(tmp_path, "good")
    write_model(tmp_path, "bad", RAW.replace("height = 8", "height = 0"))
    (tmp_path / ".hidden").mkdir()
    configs, failed = scan(tmp_path)
    assert [c.name for c in configs] == ["good"]
    assert set(failed) == {"bad"} and "field 'input.height'" in failed["bad"]
    configs, failed = scan(tmp_path, ["good", "absent"])
    assert [c.name for c in configs] == ["good"] and set(failed) == {"absent"}


@pytest.mark.parametrize(
    ("toml", "model", "field", "labels"),
    [
        (RAW, identity_onnx(["N", 3, 8, 9]), "input.width", None),
        (RAW, identity_onnx(["N", 3, 6, 8]), "input.height", None),
        (RAW.replace('"NCHW"', '"NHWC"'), identity_onnx(["N", 3, 8, 8]), "input.layout", None),
        (RAW.replace('"NCHW"', '"NHWC"'), identity_onnx(["N", 9, 8, 3]), "input.height", None),
        (RAW, identity_onnx(["N", 4, 8, 8]), "input.layout", None),
        (RAW, identity_onnx(["N", 8, 8]), "input.layout", None),
        (RAW, identity_onnx(["N", 3, 8, 8], TensorProto.UINT8), "input.dtype", None),
        (RAW + 'name = "image"\n', identity_onnx(["N", 3, 8, 8]), "input.name", None),
        (RAW, identity_onnx(["N", 3, 8, 8], extra_input=True), "input.name", None),
        (RAW + "[batching]\nmax_batch_size = 4\n", identity_onnx([1, 3, 8, 8]), "batching.max_batch_size", None),
        (RAW.replace('"raw"', '"classify"') + '[outputs]\nlogits = "probs"\n', None, "outputs.logits", None),
        (
            'labels = "labels.txt"\n' + RAW.replace('"raw"', '"classify"'),
            identity_onnx(["N", 3, 8, 8], out_shape=["N", 5]),
            "labels",
            "a\nb\nc\n",
        ),
        (
            'labels = "labels.txt"\n' + RAW.replace('"raw"', '"yolo"'),
            identity_onnx(["N", 3, 8, 8], out_shape=["N", 100, 9]),
            "head.num_classes",
            "a\nb\nc\n",
        ),
    ],
)
def test_the_graph_must_fit_the_model_toml(
    tmp_path: Path, toml: str, model: onnx.ModelProto | None, field: str, labels: str | None
) -> None:
    cfg = load_config(write_model(tmp_path, "m", toml, model, labels=labels))
    with pytest.raises(ModelConfigError) as err:
        prepare(cfg, cfg.onnx_path(1))
    message = str(err.value)
    assert message.startswith(f"{cfg.directory / 'model.toml'}: field '{field}'"), message


def test_a_fitting_graph_loads_with_symbolic_dims(tmp_path: Path) -> None:
    cfg = load_config(
        write_model(tmp_path, "m", RAW + "[batching]\nmax_batch_size = 8\n", identity_onnx(["batch", 3, "h", "w"]))
    )
    folded = onnx.load_from_string(prepare(cfg, cfg.onnx_path(1)))
    [wire] = folded.graph.input
    assert wire.type.tensor_type.elem_type == TensorProto.UINT8
    dims = [d.dim_value or d.dim_param for d in wire.type.tensor_type.shape.dim]
    assert dims == ["N", 8, 8, 3]


def test_an_unreadable_onnx_file_is_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(write_model(tmp_path, "m", RAW))
    cfg.onnx_path(1).write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ModelConfigError, match="is not a readable ONNX model"):
        prepare(cfg, cfg.onnx_path(1))
