"""The benchmark's rounds (loadtests/bench/rounds.py): the order alternates, the merge averages
each point over its rounds, and the ratios of each round are kept beside those of the means."""

from __future__ import annotations

from typing import Any

import pytest

from loadtests.bench import report, rounds


def http(key: str, rps: dict[int, float], pss: float = 100.0) -> dict[str, Any]:
    points = [
        {
            "concurrency": c,
            "requests": int(r * 10),
            "rps": r,
            "errors": 0,
            "error_kinds": {},
            "p50_ms": 1000 / r,
            "p95_ms": 1500 / r,
            "p99_ms": 2000 / r,
            "mean_ms": 1100 / r,
            "client_cpu": 0.02,
            "server_cpu": 1.9,
        }
        for c, r in rps.items()
    ]
    return {"key": key, "label": key, "points": points, "memory": {"pss_mb": pss, "rss_mb": pss, "processes": 1}}


def ceiling(rps: float) -> dict[str, Any]:
    cfg = {"config": "procs", "processes": 2, "loop_threads": 1, "intra_threads": 1, "rps": rps, "requests": 10}
    cfg.update({"p50_ms": 10.0, "p95_ms": 12.0, "p99_ms": 14.0, "mean_ms": 10.0, "server_cpu": 2.0})
    cfg["memory"] = {"pss_mb": 200.0, "rss_mb": 250.0, "processes": 2, "per_process": []}
    return {"key": "ceiling", "label": "(d) ceiling, no HTTP: procs", "configs": [cfg], "best": cfg}


def test_every_other_round_is_reversed() -> None:
    keys = ["b-1thread", "ringserve", "ceiling"]
    assert rounds.order(keys, 0) == keys
    assert rounds.order(keys, 1) == ["ceiling", "ringserve", "b-1thread"]
    assert rounds.order(keys, 2) == keys


def test_one_round_is_left_as_it_is() -> None:
    one = http("ringserve", {16: 100.0})
    assert rounds.merge([one]) is one


def test_points_are_the_mean_of_their_rounds_and_memory_the_highest_peak() -> None:
    merged = rounds.merge(
        [http("ringserve", {1: 50.0, 16: 100.0}, 300.0), http("ringserve", {1: 60.0, 16: 140.0}, 320.0)]
    )
    by_c = {p["concurrency"]: p for p in merged["points"]}
    assert by_c[16]["rps"] == pytest.approx(120.0)
    assert by_c[16]["rounds_rps"] == [100.0, 140.0]
    assert by_c[1]["p50_ms"] == pytest.approx((1000 / 50 + 1000 / 60) / 2)
    assert by_c[16]["requests"] == 1000 + 1400
    assert merged["memory"]["pss_mb"] == 320.0
    assert len(merged["rounds"]) == 2


def test_a_target_that_failed_in_one_round_is_reported_failed() -> None:
    failed = {"key": "c", "label": "c", "points": [], "error": "the client failed"}
    merged = rounds.merge([http("c", {16: 90.0}), failed])
    assert merged["error"] == "the client failed"


def test_the_ceiling_keeps_its_best_configuration() -> None:
    merged = rounds.merge([ceiling(120.0), ceiling(130.0)])
    assert merged["best"]["rps"] == pytest.approx(125.0)
    assert merged["label"].endswith("procs")


def test_each_round_has_its_own_ratios() -> None:
    runs = {
        "b-1thread": [http("b-1thread", {16: 100.0}), http("b-1thread", {16: 80.0})],
        "ringserve": [http("ringserve", {16: 130.0}), http("ringserve", {16: 110.0})],
        "ceiling": [ceiling(125.0), ceiling(120.0)],
    }
    results: dict[str, Any] = {
        "workload": "lite0",
        "settings": {"concurrency": [16], "workers": 2},
        "targets": [rounds.merge(r) for r in runs.values()],
    }
    report.analyse(results)
    per_round = results["round_ratios"]
    assert per_round[0]["16"]["fastapi"] == pytest.approx(1.30)
    assert per_round[1]["16"]["fastapi"] == pytest.approx(110 / 80)
    assert per_round[1]["16"]["ceiling"] == pytest.approx(110 / 120)
    # the goal is judged on the means: 120 / 90
    fastapi_goal = next(g for g in results["goals"] if "FastAPI" in g["goal"])
    assert fastapi_goal["value"] == pytest.approx(120 / 90)
