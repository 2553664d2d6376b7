"""The engine's plan on the CPU (issue 15): instances, intra-op threads and the batch it runs."""

from __future__ import annotations

from pathlib import Path

from engine.models import Plan, load_planned
from engine.repository import load_config
from engine.session import CPU, CPU_MAX_BATCH, CUDA, default_threads, plan_batch, plan_instances
from engine.warmup import warm_up
from tests.models import write_pixel_detector


def test_the_cpu_gets_one_single_threaded_instance_per_core() -> None:
    cores = default_threads()
    for sequential in (False, True):
        assert plan_instances([CPU], 0, 0, sequential) == (cores, 1)
    assert plan_instances([CPU], 1, 0, False) == (1, cores)  # asked for: one instance, all cores
    assert plan_instances([CPU], 2, 3, False) == (2, 3)
    assert plan_instances([CUDA, CPU], 0, 0, False) == (1, cores)


def test_the_cpu_runs_small_batches_the_gpu_the_models() -> None:
    assert plan_batch([CPU], 8) == CPU_MAX_BATCH == 2
    assert plan_batch([CPU], 1) == 1
    assert plan_batch([CPU], 8, 4) == 4
    assert plan_batch([CPU], 8, 0) == 8  # 0: the model's max_batch_size
    assert plan_batch([CUDA, CPU], 8) == 8


def test_a_loaded_model_batches_and_warms_up_within_its_plan(tmp_path: Path) -> None:
    directory = write_pixel_detector(tmp_path, "pixels", max_batch_size=8)
    cfg = load_config(directory)
    loaded, instances = load_planned(cfg, 1, [CPU], Plan(), None)
    assert instances == default_threads() and loaded.batch_limit == 2
    assert loaded.info.max_batch_size == 8  # what clients may send is the model's; the engine splits it
    assert warm_up(loaded) >= 0
    unlimited, _ = load_planned(cfg, 1, [CPU], Plan(cpu_max_batch=0), None)
    assert unlimited.batch_limit == 8
