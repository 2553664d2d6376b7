"""The model repository: ``<repo>/<model>/model.toml`` + ``<repo>/<model>/<version>/model.onnx``.

Parsing only: every field is checked here with an error that names the file and the field. What
needs the ONNX graph (input shape, output names) is checked when a version loads (engine/graph.py).
The schema, with an example, is in README.md ("Model repository").
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("ssd", "yolo", "classify", "raw")
RESIZES = ("stretch", "letterbox", "center-crop")
YOLO_LAYOUTS = ("auto", "v5", "v8")
# The graph outputs each head reads; ``[outputs]`` maps these roles to graph output names.
OUTPUT_ROLES: dict[str, tuple[str, ...]] = {
    "ssd": ("boxes", "scores", "classes", "count"),
    "yolo": ("output",),
    "classify": ("logits",),
    "raw": (),
}
_KEYS: dict[str, tuple[str, ...]] = {
    "": (
        "task",
        "labels",
        "description",
        "source",
        "input",
        "outputs",
        "head",
        "thresholds",
        "batching",
        "version_policy",
        "warmup",
    ),
    "input.": (
        "name",
        "height",
        "width",
        "resize",
        "pad_value",
        "resize_short",
        "color",
        "layout",
        "dtype",
        "scale",
        "mean",
        "std",
    ),
    "head.": ("layout", "num_classes", "softmax"),
    "thresholds.": ("confidence", "iou", "max_detections", "top_k"),
    "batching.": ("max_batch_size", "max_queue_delay_ms", "queue_limit"),
    "version_policy.": ("all", "latest", "specific"),
    "warmup.": ("runs", "batch_sizes", "data"),
}
WARMUP_DATA = ("zeros", "random")


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
    yolo_layout: str = "auto"
    num_classes: int = 0  # yolo/classify: classes of the output (0: unknown, from the labels)
    max_batch_size: int = 1
    max_queue_delay_ms: float = 2.0
    queue_limit: int = 64
    versions: tuple[int, ...] = ()  # on disk
    policy: str = "all"  # all | latest | specific: which of ``versions`` are served
    policy_latest: int = 1
    policy_specific: tuple[int, ...] = ()
    warmup_runs: int = 1  # runs per warm-up batch size before a version is served (0: none)
    warmup_batch_sizes: tuple[int, ...] = ()  # () = 1 and max_batch_size
    warmup_data: str = "zeros"

    def served_versions(self) -> tuple[int, ...]:
        """The versions the version policy selects among those on disk, ascending."""
        if self.policy == "latest":
            return self.versions[-self.policy_latest :]
        if self.policy == "specific":
            return tuple(v for v in self.versions if v in self.policy_specific)
        return self.versions

    def warmup_sizes(self) -> tuple[int, ...]:
        return self.warmup_batch_sizes or tuple(sorted({1, self.max_batch_size}))

    @property
    def path(self) -> Path:
        return self.directory / "model.toml"

    def onnx_path(self, version: int) -> Path:
        return self.directory / str(version) / "model.onnx"

    def output_name(self, role: str) -> str:
        return self.outputs.get(role, role)

    def error(self, key: str, why: str) -> ModelConfigError:
        """An error about field ``key`` of this model's model.toml (for checks against the graph)."""
        return ModelConfigError(f"{self.path}: field '{key}': {why}")


class _Reader:
    """Typed access to one table of a model.toml, with errors that name file and field."""

    def __init__(self, path: Path, table: dict[str, Any], prefix: str = "") -> None:
        self.path, self.table, self.prefix = path, table, prefix
        allowed = _KEYS.get(prefix)
        unknown = sorted(set(table) - set(allowed)) if allowed is not None else []
        if unknown:
            raise self.fail(unknown[0], f"unknown field (known in this table: {', '.join(allowed or ())})")

    def fail(self, key: str, why: str) -> ModelConfigError:
        return ModelConfigError(f"{self.path}: field '{self.prefix}{key}': {why}")

    def get(self, key: str, kind: type, default: Any) -> Any:
        value = self.table.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise self.fail(key, f"expected {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(key, "must be finite")
        return value

    def required(self, key: str, kind: type) -> Any:
        if key not in self.table:
            raise self.fail(key, "is required")
        return self.get(key, kind, None)

    def choice(self, key: str, options: tuple[str, ...], default: str | None) -> str:
        value = self.required(key, str) if default is None else self.get(key, str, default)
        if value not in options:
            raise self.fail(key, f"{value!r} is not one of {', '.join(options)}")
        return str(value)

    def positive(self, key: str, kind: type, default: Any, *, zero: bool = False) -> Any:
        value = self.required(key, kind) if default is None else self.get(key, kind, default)
        if value < 0 or (value == 0 and not zero):
            raise self.fail(key, f"must be {'>= 0' if zero else '> 0'}, got {value}")
        return value

    def fraction(self, key: str, default: float, *, zero: bool = True) -> float:
        value = float(self.get(key, float, default))
        if not (0.0 <= value <= 1.0) or (value == 0.0 and not zero):
            raise self.fail(key, f"must be within {'0' if zero else '(0'}..1, got {value}")
        return value

    def triple(self, key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
        value = self.table.get(key, list(default))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value] * 3
        if not (isinstance(value, list) and len(value) == 3):
            raise self.fail(key, "expected a number or a list of 3 numbers")
        numbers = [float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
            raise self.fail(key, "expected finite numbers")
        return numbers[0], numbers[1], numbers[2]

    def sub(self, key: str) -> _Reader:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        return _Reader(self.path, value, f"{self.prefix}{key}.")


def versions_of(directory: Path) -> tuple[int, ...]:
    """Version numbers (>= 1) that have a ``<version>/model.onnx``, ascending."""
    return tuple(
        sorted(
            int(p.name)
            for p in directory.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / "model.onnx").is_file()
        )
    )


def _input(inp: _Reader, task: str) -> InputConfig:
    cfg = InputConfig(
        name=inp.get("name", str, ""),
        height=inp.positive("height", int, None),
        width=inp.positive("width", int, None),
        resize=inp.choice("resize", RESIZES, "letterbox" if task == "yolo" else "stretch"),
        pad_value=inp.get("pad_value", int, 114),
        resize_short=inp.positive("resize_short", int, 0, zero=True),
        color=inp.choice("color", ("RGB", "BGR"), "RGB"),
        layout=inp.choice("layout", ("NHWC", "NCHW"), "NHWC"),
        dtype=inp.choice("dtype", ("uint8", "float32", "float16"), "uint8"),
        scale=inp.get("scale", float, 1.0),
        mean=inp.triple("mean", (0.0, 0.0, 0.0)),
        std=inp.triple("std", (1.0, 1.0, 1.0)),
    )
    if not 0 <= cfg.pad_value <= 255:
        raise inp.fail("pad_value", f"must be within 0..255, got {cfg.pad_value}")
    if cfg.resize_short and cfg.resize != "center-crop":
        raise inp.fail("resize_short", 'applies only to resize = "center-crop"')
    if cfg.resize_short and cfg.resize_short < max(cfg.height, cfg.width):
        raise inp.fail("resize_short", f"must be >= the crop ({cfg.height}x{cfg.width}), got {cfg.resize_short}")
    if any(s == 0 for s in cfg.std):
        raise inp.fail("std", "must not contain 0")
    if cfg.dtype == "uint8":
        # The pixels reach a uint8 input as they are: a normalisation there would be silently ignored.
        for key in ("scale", "mean", "std"):
            if key in inp.table:
                raise inp.fail(key, "applies only to float inputs (dtype float32 or float16)")
    elif cfg.scale == 0:
        raise inp.fail("scale", "must not be 0")
    return cfg


def _labels(top: _Reader, directory: Path) -> tuple[str, ...]:
    name = top.get("labels", str, "")
    if not name:
        return ()
    path = directory / name
    if not path.is_file():
        raise top.fail("labels", f"labels file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise top.fail("labels", f"labels file {path} is unreadable: {exc}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise top.fail("labels", f"labels file {path} is empty")
    return tuple(lines)


def _policy(top: _Reader) -> tuple[str, int, tuple[int, ...]]:
    """``[version_policy]``: exactly one of ``all = true``, ``latest = N``, ``specific = [1, 3]``."""
    pol = top.sub("version_policy")
    if not pol.table:
        return "all", 1, ()
    if len(pol.table) != 1:
        raise pol.fail(sorted(pol.table)[1], "give exactly one of all, latest, specific")
    if "all" in pol.table:
        if pol.get("all", bool, True) is not True:
            raise pol.fail("all", "must be true (or use latest / specific)")
        return "all", 1, ()
    if "latest" in pol.table:
        return "latest", pol.positive("latest", int, None), ()
    versions = pol.table["specific"]
    if not (
        isinstance(versions, list)
        and versions
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in versions)
    ):
        raise pol.fail("specific", f"expected a non-empty list of version numbers >= 1, got {versions!r}")
    return "specific", 1, tuple(sorted(set(versions)))


def _warmup(top: _Reader, max_batch: int) -> tuple[int, tuple[int, ...], str]:
    warm = top.sub("warmup")
    runs = warm.positive("runs", int, 1, zero=True)
    sizes = warm.table.get("batch_sizes", [])
    if not (isinstance(sizes, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in sizes)):
        raise warm.fail("batch_sizes", f"expected a list of batch sizes, got {sizes!r}")
    for b in sizes:
        if not 1 <= b <= max_batch:
            raise warm.fail("batch_sizes", f"{b} is not within 1..batching.max_batch_size ({max_batch})")
    return runs, tuple(sorted(set(sizes))), warm.choice("data", WARMUP_DATA, "zeros")


def load_config(directory: Path) -> ModelConfig:
    path = directory / "model.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path}: missing") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: not valid TOML: {exc}") from exc
    top = _Reader(path, raw)
    top.get("description", str, "")
    top.sub("source")  # provenance written by `ringserve models pull`; free-form, not read
    task = top.choice("task", TASKS, None)
    input_cfg = _input(top.sub("input"), task)
    out, head = top.sub("outputs"), top.sub("head")
    thr, bat = top.sub("thresholds"), top.sub("batching")
    roles = OUTPUT_ROLES[task]
    for key in out.table:
        if key not in roles:
            known = ", ".join(roles) if roles else "none: a raw model returns every output"
            raise out.fail(key, f"unknown output role for task {task!r} (known: {known})")
    outputs = {k: out.get(k, str, "") for k in out.table}
    for key, value in outputs.items():
        if not value:
            raise out.fail(key, "must name a graph output")
    labels = _labels(top, directory)
    num_classes = head.positive("num_classes", int, 0, zero=True)
    if task == "yolo" and not (num_classes or labels):
        raise head.fail("num_classes", "a YOLO model needs its class count: set it, or a labels file")
    if num_classes and labels and num_classes != len(labels):
        raise head.fail("num_classes", f"is {num_classes}, but the labels file has {len(labels)} lines")
    if task != "yolo" and "layout" in head.table:
        raise head.fail("layout", 'applies only to task = "yolo"')
    if task != "classify" and "softmax" in head.table:
        raise head.fail("softmax", 'applies only to task = "classify"')
    top_k = thr.positive("top_k", int, 5)
    max_batch = bat.positive("max_batch_size", int, 1)
    policy, latest, specific = _policy(top)
    warmup_runs, warmup_sizes, warmup_data = _warmup(top, max_batch)
    versions = versions_of(directory) if directory.is_dir() else ()
    if not versions:
        raise ModelConfigError(f"{directory}: no <version>/model.onnx found (versions are directories 1, 2, ...)")
    return ModelConfig(
        name=directory.name,
        directory=directory,
        task=task,
        input=input_cfg,
        outputs=outputs,
        labels=labels,
        # A classifier answers its top_k classes; a confidence floor is the client's choice.
        confidence=thr.fraction("confidence", 0.0 if task == "classify" else 0.5),
        iou=thr.fraction("iou", 0.45, zero=False),
        max_detections=thr.positive("max_detections", int, top_k if task == "classify" else 100),
        top_k=top_k,
        softmax=head.get("softmax", bool, True),
        yolo_layout=head.choice("layout", YOLO_LAYOUTS, "auto"),
        num_classes=num_classes or len(labels),
        max_batch_size=max_batch,
        max_queue_delay_ms=bat.positive("max_queue_delay_ms", float, 2.0, zero=True),
        queue_limit=bat.positive("queue_limit", int, 64),
        versions=versions,
        policy=policy,
        policy_latest=latest,
        policy_specific=specific,
        warmup_runs=warmup_runs,
        warmup_batch_sizes=warmup_sizes,
        warmup_data=warmup_data,
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
    if only:
        for name in sorted(set(only) - {c.name for c in configs} - set(failed)):
            failed[name] = f"{repo / name}: no such model directory (asked for by --models)"
    return configs, failed
