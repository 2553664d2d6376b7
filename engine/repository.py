"""The model repository: ``<repo>/<model>/model.toml`` + ``<repo>/<model>/<version>/model.onnx``."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("ssd", "yolo", "classify", "raw")
RESIZES = ("stretch", "letterbox", "center-crop")


class ModelConfigError(ValueError):
    """A model.toml that cannot be served; the message names the file and the field."""


@dataclass(frozen=True)
class InputConfig:
    name: str = ""
    height: int = 0
    width: int = 0
    resize: str = "stretch"
    pad_value: int = 114
    resize_short: int = 0
    color: str = "RGB"
    layout: str = "NHWC"
    dtype: str = "uint8"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    directory: Path
    task: str
    input: InputConfig
    outputs: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    confidence: float = 0.5
    iou: float = 0.45
    max_detections: int = 100
    top_k: int = 5
    softmax: bool = True
    max_batch_size: int = 1
    max_queue_delay_ms: float = 2.0
    queue_limit: int = 64
    versions: tuple[int, ...] = ()

    def onnx_path(self, version: int) -> Path:
        return self.directory / str(version) / "model.onnx"


class _Reader:
    """Typed access to one table of a model.toml, with errors that name file and field."""

    def __init__(self, path: Path, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.table, self.prefix = path, table, prefix

    def fail(self, key: str, why: str) -> ModelConfigError:
        return ModelConfigError(f"{self.path}: field '{self.prefix}{key}': {why}")

    def get(self, key: str, kind: type, default: Any) -> Any:
        value = self.table.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise self.fail(key, "must be finite")
        return value

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.get(key, str, default)
        if value not in options:
            raise self.fail(key, f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    def positive(self, key: str, kind: type, default: Any, *, zero: bool = False) -> Any:
        value = self.get(key, kind, default)
        if value < 0 or (value == 0 and not zero):
            raise self.fail(key, f"must be {'>= 0' if zero else '> 0'}, got {value}")
        return value

    def triple(self, key: str, default: tuple[float, float, float]) -> tuple[float, ...]:
        value = self.table.get(key, list(default))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not (isinstance(value, list) and len(value) == 3):
            raise self.fail(key, "expected a number or a list of 3 numbers")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in value):
            raise self.fail(key, "expected finite numbers")
        return tuple(float(v) for v in value)

    def sub(self, key: str) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        return _Reader(self.path, value, f"{self.prefix}{key}.")


def versions_of(directory: Path) -> tuple[int, ...]:
    return tuple(
        sorted(
            int(p.name)
            for p in directory.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()
        )
    )


def load_config(directory: Path) -> ModelConfig:
    path = directory / "model.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path}: missing") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ModelConfigError(f"{path}: not valid TOML: {exc}") from exc
    top = _Reader(path, raw)
    inp, out = top.sub("input"), top.sub("outputs")
    thr, bat = top.sub("thresholds"), top.sub("batching")
    task = top.choice("task", TASKS, "")
    input_cfg = InputConfig(
        name=inp.get("name", str, ""),
        height=inp.positive("height", int, 0),
        width=inp.positive("width", int, 0),
        resize=inp.choice("resize", RESIZES, "letterbox" if task == "yolo" else "stretch"),
        pad_value=inp.get("pad_value", int, 114),
        resize_short=inp.positive("resize_short", int, 0, zero=True),
        color=inp.choice("color", ("RGB", "BGR"), "RGB"),
        layout=inp.choice("layout", ("NHWC", "NCHW"), "NHWC"),
        dtype=inp.choice("dtype", ("uint8", "float32", "float16"), "uint8"),
        scale=inp.get("scale", float, 1.0),
        mean=inp.triple("mean", (0.0, 0.0, 0.0)),  # type: ignore[arg-type]
        std=inp.triple("std", (1.0, 1.0, 1.0)),  # type: ignore[arg-type]
    )
    if any(s == 0 for s in input_cfg.std):
        raise inp.fail("std", "must not contain 0")
    if not 0 <= input_cfg.pad_value <= 255:
        raise inp.fail("pad_value", "must be within 0..255")
    outputs = {k: out.get(k, str, "") for k in out.table}
    labels_name = top.get("labels", str, "")
    labels: tuple[str, ...] = ()
    if labels_name:
        labels_path = directory / labels_name
        if not labels_path.is_file():
            raise top.fail("labels", f"labels file {labels_path} does not exist")
        labels = tuple(line.strip() for line in labels_path.read_text().splitlines())
    confidence = thr.get("confidence", float, 0.5)
    if not 0.0 <= confidence <= 1.0:
        raise thr.fail("confidence", "must be within 0..1")
    iou = thr.get("iou", float, 0.45)
    if not 0.0 < iou <= 1.0:
        raise thr.fail("iou", "must be within (0, 1]")
    versions = versions_of(directory)
    if not versions:
        raise ModelConfigError(f"{directory}: no <version>/model.onnx found")
    return ModelConfig(
        name=directory.name,
        directory=directory,
        task=task,
        input=input_cfg,
        outputs=outputs,
        labels=labels,
        confidence=confidence,
        iou=iou,
        max_detections=thr.positive("max_detections", int, 100),
        top_k=thr.positive("top_k", int, 5),
        softmax=top.get("softmax", bool, True),
        max_batch_size=bat.positive("max_batch_size", int, 1),
        max_queue_delay_ms=bat.positive("max_queue_delay_ms", float, 2.0, zero=True),
        queue_limit=bat.positive("queue_limit", int, 64),
        versions=versions,
    )


def scan(repo: Path, only: list[str] | None = None) -> tuple[list[ModelConfig], dict[str, str]]:
    """Every model directory of ``repo``: (configs that parsed, {model: error} for the others)."""
    configs: list[ModelConfig] = []
    failed: dict[str, str] = {}
    if not repo.is_dir():
        return configs, {"<repository>": f"{repo} is not a directory (run `ringserve models pull`)"}
    for directory in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if only and directory.name not in only:
            continue
        try:
            configs.append(load_config(directory))
        except (ModelConfigError, OSError, ValueError) as exc:
            failed[directory.name] = str(exc)
    return configs, failed
