"""Preprocessing folded into the graph gives what numpy preprocessing gives (within float tolerance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from engine.graph import WIRE_INPUT, needs_folding, prepare
from engine.repository import load_config
from tests.harness import ROOT
from tests.test_repository import identity_onnx, write_model

H, W = 6, 10
_ONNX_TYPE = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def numpy_preprocess(
    pixels: np.ndarray,
    *,
    color: str,
    layout: str,
    dtype: str,
    scale: float,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> np.ndarray:
    """The reference: what a client would do before feeding the original graph (in float64)."""
    x = pixels[..., ::-1] if color == "BGR" else pixels
    if dtype != "uint8":
        x = (x.astype(np.float64) * scale - np.array(mean)) / np.array(std)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return x.astype(dtype)


def run(model: bytes, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    [wire] = session.get_inputs()
    assert (wire.name, wire.type) == (WIRE_INPUT, "tensor(uint8)")
    return session.run(None, {WIRE_INPUT: pixels})[0]


CASES = {
    "nchw-float32-imagenet": dict(
        color="RGB",
        layout="NCHW",
        dtype="float32",
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    "nchw-float32-bgr-caffe": dict(
        color="BGR", layout="NCHW", dtype="float32", scale=1.0, mean=(103.94, 116.78, 123.68), std=(1.0, 1.0, 1.0)
    ),
    "nhwc-float32-scale": dict(
        color="RGB", layout="NHWC", dtype="float32", scale=1 / 255, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
    ),
    "nhwc-float32-bgr-127": dict(
        color="BGR", layout="NHWC", dtype="float32", scale=1.0, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0)
    ),
    "nchw-float16-bgr": dict(
        color="BGR", layout="NCHW", dtype="float16", scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 0.2)
    ),
    "nchw-uint8": dict(color="RGB", layout="NCHW", dtype="uint8", scale=1.0, mean=(0, 0, 0), std=(1, 1, 1)),
    "nhwc-uint8-bgr": dict(color="BGR", layout="NHWC", dtype="uint8", scale=1.0, mean=(0, 0, 0), std=(1, 1, 1)),
}


def toml_for(case: dict) -> str:  # type: ignore[type-arg]
    text = (
        f'task = "raw"\n[input]\nheight = {H}\nwidth = {W}\ncolor = "{case["color"]}"\n'
        f'layout = "{case["layout"]}"\ndtype = "{case["dtype"]}"\n'
    )
    if case["dtype"] != "uint8":
        text += f"scale = {case['scale']!r}\nmean = {list(case['mean'])}\nstd = {list(case['std'])}\n"
    return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_folded_graph_equals_numpy_preprocessing(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    shape = ["N", 3, H, W] if case["layout"] == "NCHW" else ["N", H, W, 3]
    cfg = load_config(write_model(tmp_path, "m", toml_for(case), identity_onnx(shape, _ONNX_TYPE[case["dtype"]])))
    assert needs_folding(cfg)
    pixels = np.random.default_rng(7).integers(0, 256, size=(3, H, W, 3), dtype=np.uint8)
    pixels[0, 0, 0] = (0, 128, 255)  # the extremes and a known channel order
    got = run(prepare(cfg, cfg.onnx_path(1)), pixels)
    want = numpy_preprocess(pixels, **case)
    assert got.dtype == want.dtype and got.shape == want.shape
    if case["dtype"] == "uint8":
        np.testing.assert_array_equal(got, want)
    else:
        tol = 2e-2 if case["dtype"] == "float16" else 1e-5
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)


def test_a_uint8_nhwc_rgb_model_is_served_as_it_is(tmp_path: Path) -> None:
    cfg = load_config(
        write_model(
            tmp_path,
            "m",
            f'task = "raw"\n[input]\nheight = {H}\nwidth = {W}\n',
            identity_onnx(["N", H, W, 3], TensorProto.UINT8),
        )
    )
    assert not needs_folding(cfg)
    assert prepare(cfg, cfg.onnx_path(1)) == cfg.onnx_path(1).read_bytes()


def test_folded_efficientnet_matches_numpy_preprocessing() -> None:
    """The real classifier (when `ringserve models pull efficientnet-lite0` has built it)."""
    directory = ROOT / "models" / "efficientnet-lite0"
    if not (directory / "1" / "model.onnx").is_file():
        pytest.skip("efficientnet-lite0 is not built (ringserve models pull efficientnet-lite0)")
    cfg = load_config(directory)
    pixels = np.random.default_rng(3).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    folded = run(prepare(cfg, cfg.onnx_path(1)), pixels)
    i = cfg.input
    reference = numpy_preprocess(
        pixels, color=i.color, layout=i.layout, dtype=i.dtype, scale=i.scale, mean=i.mean, std=i.std
    )
    original = ort.InferenceSession(str(cfg.onnx_path(1)), providers=["CPUExecutionProvider"])
    want = original.run(None, {i.name: reference})[0]
    np.testing.assert_allclose(folded, want, rtol=1e-3, atol=1e-3)
    assert onnx.load(str(cfg.onnx_path(1))).graph.input[0].name == "images"  # the stored model is untouched
