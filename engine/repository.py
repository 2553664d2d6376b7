"""The model repository: ``<repo>/<model>/model.toml`` + ``<repo>/<model>/<version>/model.onnx``.

Parsing only: every field is checked here with an error that names the file and the field. What
needs the ONNX graph (input shape, output names) is checked when a version loads (engine/graph.py).
The schema, with an example, is in README.md ("Model repository").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from engine.toml_reader import ModelConfigError, Reader, warmup
from engine.toml_reader import policy as version_policy

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
    wait_alone: bool = False  # wait the delay even when no company is coming (Triton's behaviour)
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


def versions_of(directory: Path) -> tuple[int, ...]:
    """Version numbers (>= 1) that have a ``<version>/model.onnx``, ascending."""
    return tuple(
        sorted(
            int(p.name)
            for p in directory.iterdir()
            if p.is_dir() and p.name.isdigit() and int(p.name) > 0 and (p / "model.onnx").is_file()
        )
    )


def _input(inp: Reader, task: str) -> InputConfig:
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


def _labels(top: Reader, directory: Path) -> tuple[str, ...]:
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


def load_config(directory: Path) -> ModelConfig:
    path = directory / "model.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path}: missing") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path}: not valid TOML: {exc}") from exc
    top = Reader(path, raw)
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
    chosen, latest, specific = version_policy(top)
    warmup_runs, warmup_sizes, warmup_data = warmup(top, max_batch)
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
        wait_alone=bat.get("wait_alone", bool, False),
        queue_limit=bat.positive("queue_limit", int, 64),
        versions=versions,
        policy=chosen,
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
