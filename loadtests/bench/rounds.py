"""Several rounds of the same targets, merged: what a drifting box does to one measure, it does
to both sides of a ratio.

This box's speed drifts by 10-20 % within minutes (the same ringserve configuration measured
122 and then 141 req/s a few minutes apart), so a ratio of two targets measured minutes apart is
as much the box's moment as the targets'. With ``--rounds R`` the run measures every target R
times, the order reversed on every other round (A B C, C B A: a steady drift falls on both sides
of every pair alike), and reports the mean of the rounds. Each target keeps its rounds, and the
ratios of each round are reported beside the mean, so the spread is visible.
"""

from __future__ import annotations

import statistics
from typing import Any

# Measures that are averaged over rounds; counts are summed; memory is the highest peak.
MEANS = ("rps", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "server_cpu", "client_cpu")
SUMS = ("requests", "errors")


def order(targets: list[str], round_index: int) -> list[str]:
    """The targets in the order of round ``round_index`` (0-based): as given, then reversed."""
    return list(targets) if round_index % 2 == 0 else list(reversed(targets))


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's result from its rounds (an HTTP target's or the ceiling's)."""
    if len(rounds) == 1:
        return rounds[0]
    failed = next((r for r in rounds if "error" in r), None)
    if failed is not None:  # a target that failed once is reported as failed, with that round's reason
        return {**failed, "rounds": rounds}
    merged = {k: v for k, v in rounds[0].items() if k not in ("points", "memory", "configs", "best", "start_s")}
    merged["rounds"] = rounds
    if rounds[0]["key"] == "ceiling":
        configs = [
            _merge_points([c for r in rounds for c in r["configs"] if c["config"] == name]) for name in _names(rounds)
        ]
        merged["configs"] = configs
        ok = [c for c in configs if "error" not in c]
        merged["best"] = best = max(ok, key=lambda c: c["rps"]) if ok else None
        merged["label"] = f"(d) ceiling, no HTTP: {best['config'] if best else '-'}"
        return merged
    concurrencies = [p["concurrency"] for p in rounds[0]["points"]]
    merged["points"] = [
        _merge_points([p for r in rounds for p in r["points"] if p["concurrency"] == c]) for c in concurrencies
    ]
    merged["memory"] = max((r["memory"] for r in rounds), key=lambda m: m["pss_mb"])
    return merged


def _names(rounds: list[dict[str, Any]]) -> list[str]:
    return [c["config"] for c in rounds[0]["configs"]]


def _merge_points(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of one point's rounds (the highest memory peak, where the point has one)."""
    failed = next((p for p in points if "error" in p), None)
    if failed is not None:
        return failed
    merged = dict(points[0])
    for key in MEANS:
        values = [p[key] for p in points if isinstance(p.get(key), int | float)]
        if values:
            merged[key] = statistics.fmean(values)
    for key in SUMS:
        if key in merged:
            merged[key] = sum(p[key] for p in points)
    if "error_kinds" in merged:
        kinds: dict[str, int] = {}
        for p in points:
            for kind, n in p.get("error_kinds", {}).items():
                kinds[kind] = kinds.get(kind, 0) + n
        merged["error_kinds"] = kinds
    if "memory" in merged:
        merged["memory"] = max((p["memory"] for p in points), key=lambda m: m["pss_mb"])
    merged["rounds_rps"] = [p["rps"] for p in points]
    return merged
