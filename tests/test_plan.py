"""The engine's plan on the CPU (issue 15): instances, intra-op threads and the batch it runs."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from engine.models import Plan, load_planned
from engine.repository import load_config
from engine.session import (
    CPU,
    CPU_MAX_BATCH,
    CUDA,
    OrtSession,
    batch_from_timings,
    default_threads,
    plan_batch,
    plan_instances,
    wants_idle_helpers,
)
from engine.warmup import warm_up
from tests.models import pixel_detector_onnx, write_pixel_detector


def test_the_cpu_gets_one_single_threaded_instance_per_core_and_idle_helpers_when_asked() -> None:
    cores = default_threads()
    assert plan_instances([CPU], 0, 0) == (cores, 1)  # every graph, loop-bound or not
    assert not wants_idle_helpers([CPU], cores, 1)
    assert plan_instances([CPU], 0, cores) == (cores, cores)  # ORT_THREADS: one pool, shared
    assert wants_idle_helpers([CPU], cores, cores) == (cores > 1)
    assert plan_instances([CPU], 1, 0) == (1, cores)  # asked for: one instance, all cores
    assert not wants_idle_helpers([CPU], 1, cores)  # a lone instance's pool is the whole plan
    assert plan_instances([CPU], 2, 3) == (2, 3)
    assert plan_instances([CUDA, CPU], 0, 0) == (1, cores)
    assert not wants_idle_helpers([CUDA, CPU], 2, 2)


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_idle_helpers_lower_only_the_pools_threads_and_the_session_still_answers() -> None:
    model = pixel_detector_onnx().SerializeToString()

    def tasks() -> set[int]:
        return {int(t) for t in os.listdir("/proc/self/task")}

    first = tasks()
    plain = OrtSession(model, "", [CPU], 3)
    second = tasks()
    session = OrtSession(model, "", [CPU], 3, idle_helpers=True)
    helpers = tasks() - second
    assert len(helpers) == 2 and all(_nice(t) == 19 for t in helpers)  # a pool of 3: the caller and two
    assert len(second - first) == 2 and all(_nice(t) == 0 for t in second - first)  # the plain pool's
    assert _nice(threading.get_native_id()) == 0
    pixels = np.full((2, 64, 64, 3), (10, 200, 30), dtype=np.uint8)
    a, b = plain.run(pixels), session.run(pixels)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_the_cpu_runs_small_batches_the_gpu_the_models() -> None:
    assert plan_batch([CPU], 8) == CPU_MAX_BATCH == 2
    assert plan_batch([CPU], 1) == 1
    assert plan_batch([CPU], 8, 4) == 4
    assert plan_batch([CPU], 8, 0) == 8  # 0: the model's max_batch_size
    assert plan_batch([CUDA, CPU], 8) == 8


def test_the_cpu_batch_is_small_for_a_real_model_and_large_where_the_run_is_mostly_overhead() -> None:
    assert batch_from_timings(0.0055, 0.0099, 8) == CPU_MAX_BATCH  # Lite0 as the engine measured it
    assert batch_from_timings(0.0468, 0.0905, 8) == CPU_MAX_BATCH  # the SSD
    assert batch_from_timings(0.0468, 0.0905, 1) == 1  # never more than the model allows
    assert batch_from_timings(25e-6, 44e-6, 64) == 64  # the pixel detector: (5 + 200) / 1.9 us
    assert batch_from_timings(25e-6, 44e-6, 128) == 64  # the largest power of two within that
    assert batch_from_timings(0.001, 0.0012, 64) == 32  # fixed 1.0 ms, 0.2 per image: 50
    assert batch_from_timings(0.001, 0.0009, 16) == 16  # two images no dearer than one


def test_a_loaded_model_batches_and_warms_up_within_its_plan(tmp_path: Path) -> None:
    directory = write_pixel_detector(tmp_path, "pixels", max_batch_size=8)
    cfg = load_config(directory)
    fixed, _ = load_planned(cfg, 1, [CPU], Plan(cpu_max_batch=2), None)
    assert fixed.batch_limit == 2
    loaded, instances = load_planned(cfg, 1, [CPU], Plan(), None)  # measured: at most the model's
    assert instances == default_threads() and 1 <= loaded.batch_limit <= 8
    assert loaded.info.max_batch_size == 8  # what clients may send is the model's; the engine splits it
    assert warm_up(loaded) >= 0
    unlimited, _ = load_planned(cfg, 1, [CPU], Plan(cpu_max_batch=0), None)
    assert unlimited.batch_limit == 8
