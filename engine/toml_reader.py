"""Typed, checked access to the tables of a model.toml, and its version policy and warm-up tables.

Every error names the file and the field. The schema, with an example, is in README.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
    "batching.": ("max_batch_size", "max_queue_delay_ms", "wait_alone", "queue_limit"),
    "version_policy.": ("all", "latest", "specific"),
    "warmup.": ("runs", "batch_sizes", "data"),
}
WARMUP_DATA = ("zeros", "random")


class ModelConfigError(ValueError):
    """A model.toml that cannot be served; the message names the file and the field."""


class Reader:
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

    def sub(self, key: str) -> Reader:
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        return Reader(self.path, value, f"{self.prefix}{key}.")


def policy(top: Reader) -> tuple[str, int, tuple[int, ...]]:
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


def warmup(top: Reader, max_batch: int) -> tuple[int, tuple[int, ...], str]:
    warm = top.sub("warmup")
    runs = warm.positive("runs", int, 1, zero=True)
    sizes = warm.table.get("batch_sizes", [])
    if not (isinstance(sizes, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in sizes)):
        raise warm.fail("batch_sizes", f"expected a list of batch sizes, got {sizes!r}")
    for b in sizes:
        if not 1 <= b <= max_batch:
            raise warm.fail("batch_sizes", f"{b} is not within 1..batching.max_batch_size ({max_batch})")
    return runs, tuple(sorted(set(sizes))), warm.choice("data", WARMUP_DATA, "zeros")
