"""ONNX Runtime sessions with a deliberate provider and thread choice.

CUDA (with IOBinding) when a GPU is present, else CPU. On the CPU the engine shares a small box
with the HTTP workers, so ORT gets a fixed thread count and does not spin-wait: spinning threads
burn the cores the workers need for decoding.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from engine.ortcache import OrtCache, create_session, open_optimized

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderUnavailable(RuntimeError):
    """The provider the configuration insists on cannot be used on this machine."""


class Session(Protocol):
    """What the batcher needs from a model: one call from a uint8 NHWC batch to named outputs."""

    providers: list[str]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...


def gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def choose_providers(prefer: str = "auto") -> list[str]:
    available = ort.get_available_providers()
    if prefer in ("auto", "cuda") and CUDA in available and gpu_present():
        return [CUDA, CPU]
    if prefer == "cuda":
        # Asked for explicitly: a GPU box without a usable GPU must fail (and be restarted or
        # replaced by its supervisor), not serve quietly at CPU speed.
        raise ProviderUnavailable(
            f"RINGSERVE_PROVIDERS=cuda but CUDA is not usable here (GPU present: {gpu_present()}, "
            f"providers: {available})"
        )
    return [CPU]


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def plan_instances(providers: list[str], instances: int, threads: int) -> tuple[int, int]:
    """(instances per model, intra-op threads per instance); 0 in either means: choose.

    CPU: one single-threaded instance per core, for every graph. The instances
    share the one session (ORT allows concurrent runs and releases the GIL), so a second instance
    costs its activations, not a copy of the weights. On this 2-core box the engine shares the cores
    with the HTTP workers, and an intra-op thread pool is a barrier per operator: whenever a worker
    takes one core, the pool's other thread waits. Measured through ringserve (2 workers, c=16, ORT
    1.31): EfficientNet-Lite0 80 req/s with one 2-thread instance against 107 with two 1-thread
    ones; the SSD (most of its graph runs inside its NMS Loop) 25 images/s against 17.

    Asked for more threads than that (``ORT_THREADS``), several instances share a pool whose
    helper threads run at the lowest priority (``wants_idle_helpers``): they take a core only when
    nothing else wants it, so a lone request gets every idle core. Measured bare, Lite0, ORT 1.31:
    one caller 9.7 -> 5.8 ms, two callers 209 -> 213 images/s. Through ringserve (2 workers, two runs
    each, alternated) the lone request gains (c=1 p50 15.5 / 16.2 -> 12.2 / 13.7 ms) and the loaded
    box loses (c=16 135.6 / 131.0 -> 128.0 / 120.7 req/s): every parallel section still wakes and
    waits on a helper the HTTP workers preempt. So it is the operator's choice, not the default.
    The SSD loses far more with it (two callers 41.5 -> 25.4 images/s): its NMS loop runs
    thousands of small parallel sections.
    CUDA: one instance (its IOBinding buffers are per session, and the GPU batches).
    """
    cores = default_threads()
    if providers[0] == CUDA:
        return 1, threads or cores
    if not instances:
        instances = cores
    return instances, threads or max(1, cores // instances)


def wants_idle_helpers(providers: list[str], instances: int, threads: int) -> bool:
    """Whether the session's intra-op helper threads run at the lowest priority: on the CPU, when
    several instances share a pool of more than one thread (asked for; see plan_instances)."""
    return providers[0] != CUDA and instances > 1 and threads > 1


def _native_threads() -> set[int]:
    """This process's threads that Python did not start (ONNX Runtime's pools among them)."""
    python = {t.native_id for t in threading.enumerate()}
    return {int(t) for t in os.listdir("/proc/self/task")} - python


def _lowest_priority(tids: set[int]) -> None:
    for tid in tids:
        with contextlib.suppress(OSError):  # Linux: a thread's nice value is its own
            os.setpriority(os.PRIO_PROCESS, tid, 19)


# The largest batch an instance runs on the CPU when asked for a fixed one, and what the measured
# choice starts from. ORT's CPU kernels gain little from a batch, and a big one falls out of the
# caches: images/s of one single-threaded session, ORT 1.31 on this box, batch 1 / 2 / 4 / 8:
# EfficientNet-Lite0 99 / 109 / 106 / 85, the SSD 19.8 / 20.1 / 17.3 / -; through ringserve (Lite0,
# two instances, c=16) max batch 8 / 4 / 2 gave 98 / 107 / 114 req/s. A trivial model is the
# opposite: its run is mostly ORT's and Python's fixed cost per call, which a batch shares out.
CPU_MAX_BATCH = 2
AUTO = -1  # cpu_max_batch: measure it at load (batch_from_timings)
OVERHEAD_SHARE = 0.1  # a trivial model's batch grows while its per-run cost is this share of an image's
# What the engine itself spends per batch besides ORT's run (waking an instance, the queue, the run
# call, the metrics): loadtests/control_plane.py on this box, 2-core EPYC, gave 244 us of engine CPU
# per image at batches of 2 and 128 us at batches of up to 64, about 0.2 ms per batch.
ENGINE_BATCH_COST_S = 0.0002


def plan_batch(providers: list[str], max_batch_size: int, cpu_max_batch: int = AUTO) -> int:
    """The largest batch the batcher forms for a model; ``cpu_max_batch`` AUTO: CPU_MAX_BATCH until
    measured (measure_batch), 0: the model's max_batch_size."""
    if cpu_max_batch < 0:
        cpu_max_batch = CPU_MAX_BATCH
    if providers[0] == CUDA or cpu_max_batch == 0:
        return max_batch_size
    return max(1, min(max_batch_size, cpu_max_batch))


def batch_from_timings(one: float, two: float, max_batch_size: int) -> int:
    """The CPU batch from the time of a run of one image and of two. A batch costs ``fixed`` (ORT's
    part and ENGINE_BATCH_COST_S) plus ``per_image`` per image. Where an image costs more than the
    fixed part, the batch is CPU_MAX_BATCH: a real model (measured in the engine, two threads with
    the helpers idle: Lite0 5.5 / 9.9 ms, fixed 1.3 against 4.4; the SSD 46.8 / 90.5, fixed 3.3
    against 43.7). Where the fixed part dominates (a trivial model: the tests' 64x64 pixel detector
    runs 25 / 44 us, fixed 5 + 200 against 19), the batch is the largest power of two at which the
    fixed part is still OVERHEAD_SHARE of an image's or more, since a larger one would gain less
    than that. Never more than the model allows."""
    per_image = two - one
    fixed = one - per_image + ENGINE_BATCH_COST_S
    if fixed < per_image:
        return max(1, min(max_batch_size, CPU_MAX_BATCH))
    wanted = fixed / (OVERHEAD_SHARE * per_image) if per_image > 0 else math.inf
    batch = max_batch_size if wanted >= max_batch_size else 1 << int(math.log2(wanted))
    return max(1, min(max_batch_size, batch))


def measure_batch(session: Session, input_shape: tuple[int, ...], max_batch_size: int, runs: int = 5) -> int:
    """batch_from_timings with the fastest of ``runs`` runs of each size, alternated so that a busy
    moment of the box falls on both."""
    if max_batch_size < 2:
        return 1
    batch = np.zeros((2, *input_shape), np.uint8)
    best = [float("inf"), float("inf")]
    session.run(batch)  # the first run of a shape allocates
    for _ in range(runs):
        for n in (1, 2):
            started = time.perf_counter()
            session.run(batch[:n])
            best[n - 1] = min(best[n - 1], time.perf_counter() - started)
    return batch_from_timings(best[0], best[1], max_batch_size)


# ORT's allocation planner looks for a reusable buffer for every value of every subgraph; on the
# SSD's NMS loop (about 5,500 nodes) that search is most of the session creation: measured with
# ORT 1.31 on 2 cores, 6.7 s with memory reuse and 0.8 s without, for the same 46 ms per run and
# the same PSS at batch 1 and 4. Graphs without a large subgraph keep the planner's reuse.
NO_REUSE_SUBGRAPH_NODES = 1000


def session_options(threads: int, mem_reuse: bool = True, cpu_arena: bool = True) -> ort.SessionOptions:
    """ORT's CPU arena grows to the largest batch ever run and keeps it (EfficientNet-Lite0: +73 MB
    of PSS between batch 1 and batch 8, measured with ORT 1.31), so the engine turns it on only for
    the small batches of the CPU plan (CPU_MAX_BATCH). There it is the smaller of the two: glibc's
    malloc keeps what the concurrent runs of two instances freed in its per-thread arenas (Lite0,
    two threads running batches of 2: 222 MB with malloc, 189 MB with the arena, the same 204
    images/s; making malloc hand big blocks back, M_MMAP_THRESHOLD 128 KB, measured 123 MB but
    131 images/s, a page fault for every activation)."""
    opts = ort.SessionOptions()
    opts.enable_mem_reuse = mem_reuse
    opts.enable_cpu_mem_arena = cpu_arena
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return opts


class OrtSession:
    """A real ONNX Runtime session over a uint8 NHWC input."""

    def __init__(
        self,
        model: bytes | Path,  # a Path: a graph ORT optimised before (OrtCache.recall)
        input_name: str,
        providers: list[str],
        threads: int,
        max_batch: int = 0,
        *,
        cache: OrtCache | None = None,
        mem_reuse: bool = True,
        cpu_arena: bool = False,
        idle_helpers: bool = False,
    ):
        options = session_options(threads, mem_reuse, cpu_arena=cpu_arena or CUDA in providers)
        before = _native_threads() if idle_helpers else set()
        # cache_key: the ORT cache entry that holds this session's optimized graph (None: none does)
        self.cache_key: str | None = None
        if isinstance(model, Path):
            self._session, self.cache_hit = open_optimized(model, options, providers), True
        else:
            self._session, self.cache_hit, self.cache_key = create_session(model, options, providers, cache)
        if idle_helpers:  # the pool's threads are the ones its creation started (see plan_instances)
            _lowest_priority(_native_threads() - before)
        self.providers: list[str] = self._session.get_providers()
        inputs = {i.name: i for i in self._session.get_inputs()}
        self.input_name = input_name or next(iter(inputs))
        if self.input_name not in inputs:
            raise ValueError(f"the graph has no input {self.input_name!r} (it has {list(inputs)})")
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._cuda = self.providers[0] == CUDA
        self._device_inputs: dict[tuple[int, ...], ort.OrtValue] = {}
        # On CUDA every batch runs at ONE shape: padded up to max_batch (without it, the largest batch so far).
        # ONNX Runtime's CUDA convolutions are planned again whenever the input shape changes, also back to
        # a shape seen before: measured with 1.31 on an H100, 2-3 s for SSD-MobileNet-v2 and 0.1-0.7 s for
        # ResNet-50 per change, against 15-60 ms and 1-7 ms per batch. A dynamic batcher changes the batch
        # size all the time; a padded image costs far less than that.
        dims = inputs[self.input_name].shape
        pad = self._cuda and not isinstance(dims[0], int)  # never pad a graph of a fixed batch size
        self._pad_to = max_batch if pad else 0
        self._grow = pad and max_batch <= 0
        self._padded: np.ndarray | None = None
        self._batched = {o.name for o in self._session.get_outputs() if o.shape and not isinstance(o.shape[0], int)}
        if self._pad_to and all(isinstance(d, int) for d in dims[1:]):
            self.run(np.zeros((self._pad_to, *dims[1:]), dtype=np.uint8))  # plan now, not on the first request

    def describe(self) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
        def spec(args: list[ort.NodeArg]) -> list[tuple[str, str, list[int]]]:
            return [(a.name, a.type, [d if isinstance(d, int) else -1 for d in a.shape]) for a in args]

        return spec(self._session.get_inputs()), spec(self._session.get_outputs())

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if not self._cuda:
            outputs = self._session.run(self.output_names, {self.input_name: batch})
            return dict(zip(self.output_names, outputs, strict=False))
        real = len(batch)
        size = max(self._pad_to, real)
        if self._grow:
            self._pad_to = size
        if real < size:
            if self._padded is None or self._padded.shape != (size, *batch.shape[1:]):
                self._padded = np.zeros((size, *batch.shape[1:]), dtype=batch.dtype)
            self._padded[:real] = batch
            batch = self._padded
        # IOBinding: the batch goes host -> device once into a reused device buffer per shape.
        device_input = self._device_inputs.get(batch.shape)
        if device_input is None:
            device_input = ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
            self._device_inputs[batch.shape] = device_input
        else:
            device_input.update_inplace(batch)
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self.input_name, device_input)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=False))
        if real < size:  # drop the padding rows' results
            outputs = {k: v[:real] if k in self._batched and v.shape[:1] == (size,) else v for k, v in outputs.items()}
        return outputs


def quiet_ort() -> None:
    """No CUDA/cuDNN error spam on a CPU box: ORT logs warnings and below only when asked."""
    ort.set_default_logger_severity(3)
