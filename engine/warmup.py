"""Warm-up: a version runs its warm-up batches, outputs decoded by its head, before it is served.

The first runs of a session allocate its arenas (and on CUDA plan its kernels for the shape), so a
version that has not run yet would make its first clients wait; and a graph whose outputs its head
cannot read is refused here, at load time, instead of failing every request. On CUDA the session
pads each batch to ``max_batch_size`` (engine/session.py), so any warm-up batch runs the one
padded shape it will serve with.
"""

from __future__ import annotations

import time

import numpy as np
from loguru import logger

from engine import heads
from engine.models import LoadedModel


class WarmupFailed(RuntimeError):
    pass


def _decode(loaded: LoadedModel, outputs: dict[str, np.ndarray], n: int) -> None:
    cfg = loaded.config
    params = [heads.Params(cfg.confidence, cfg.max_detections)] * n
    if cfg.task == "ssd":
        heads.ssd(outputs, cfg, params)
    elif cfg.task == "yolo":
        heads.yolo(outputs, cfg, params)
    elif cfg.task == "classify":
        heads.classify(outputs, cfg, params)
    else:
        heads.raw(outputs, n)


def warm_up(loaded: LoadedModel) -> float:
    """Seconds spent; raises WarmupFailed naming the batch size that failed."""
    cfg = loaded.config
    if cfg.warmup_runs == 0:
        return 0.0
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    sizes = sorted({min(size, loaded.batch_limit) for size in cfg.warmup_sizes()})  # the batches it will run
    for size in sizes:
        shape = (size, *loaded.input_shape)
        batch = np.zeros(shape, np.uint8) if cfg.warmup_data == "zeros" else rng.integers(0, 256, shape, np.uint8)
        try:
            for _ in range(cfg.warmup_runs):
                outputs = loaded.session.run(batch)
            _decode(loaded, outputs, size)
        except Exception as exc:
            raise WarmupFailed(f"warm-up with a batch of {size} failed: {type(exc).__name__}: {exc}") from exc
    elapsed = time.perf_counter() - started
    logger.info(
        "{}/{} warmed up ({} run(s) at batch sizes {}) in {:.2f}s",
        cfg.name,
        loaded.version,
        cfg.warmup_runs,
        sizes,
        elapsed,
    )
    return elapsed
