"""Loading the repository into sessions: one LoadedModel per (model, version)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from engine.ortcache import OrtCache
from engine.repository import ModelConfig
from engine.session import (
    AUTO,
    CPU,
    CPU_MAX_BATCH,
    CUDA,
    NO_REUSE_SUBGRAPH_NODES,
    OrtSession,
    Session,
    measure_batch,
    plan_batch,
    plan_instances,
    wants_idle_helpers,
)
from ipc.messages import InputSpec, ModelInfo

if TYPE_CHECKING:
    from engine.graph import Prepared  # engine.graph imports onnx: only where a model is prepared


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    version: int
    session: Session
    info: ModelInfo
    load_seconds: float
    max_batch: int = 0  # the largest batch the batcher forms (plan_batch); 0: max_batch_size

    @property
    def batch_limit(self) -> int:
        return self.max_batch or self.config.max_batch_size

    @property
    def key(self) -> tuple[str, int]:
        return self.config.name, self.version

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.config.input.height, self.config.input.width, 3


def model_info(cfg: ModelConfig, version: int, session: Session) -> ModelInfo:
    inputs, outputs = session.describe() if isinstance(session, OrtSession) else ([], [])
    return ModelInfo(
        name=cfg.name,
        version=version,
        task=cfg.task,
        input=InputSpec(
            height=cfg.input.height,
            width=cfg.input.width,
            resize=cfg.input.resize,
            pad_value=cfg.input.pad_value,
            resize_short=cfg.input.resize_short,
        ),
        labels_count=len(cfg.labels),
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_ms=cfg.max_queue_delay_ms,
        queue_limit=cfg.queue_limit,
        confidence=cfg.confidence,
        max_detections=cfg.max_detections,
        inputs=inputs,
        outputs=outputs,
        labels=list(cfg.labels),
    )


def load(
    cfg: ModelConfig,
    version: int,
    providers: list[str],
    threads: int,
    *,
    cache: OrtCache | None = None,
    prepared: Prepared | Recalled | None = None,
    source: str = "",
    cpu_arena: bool = False,
    idle_helpers: bool = False,
) -> LoadedModel:
    """``source``: the version's source_key; the cache then remembers the optimized graph it became."""
    started = time.perf_counter()
    if prepared is None:
        from engine.graph import prepare_model

        prepared = prepare_model(cfg, cfg.onnx_path(version))
    session = OrtSession(
        prepared.path if isinstance(prepared, Recalled) else prepared.data,
        "",
        providers,
        threads,
        max_batch=cfg.max_batch_size,
        cache=cache,
        mem_reuse=prepared.subgraph_nodes < NO_REUSE_SUBGRAPH_NODES,
        cpu_arena=cpu_arena,
        idle_helpers=idle_helpers,
    )
    if cache is not None and source and session.cache_key is not None:
        cache.remember(source, session.cache_key, prepared.subgraph_nodes)
    elapsed = time.perf_counter() - started
    logger.info(
        "loaded {}/{} ({}) in {:.2f}s on {}{}",
        cfg.name,
        version,
        cfg.task,
        elapsed,
        session.providers,
        " (optimized graph from the cache)" if session.cache_hit else "",
    )
    return LoadedModel(cfg, version, session, model_info(cfg, version, session), elapsed)


@dataclass(frozen=True)
class Recalled:
    """A version loaded before: the graph ORT optimised then (OrtCache.recall), and its subgraphs'
    size. Loading it needs neither onnx (9 MB of the engine's PSS) nor the fold."""

    path: Path
    subgraph_nodes: int


def source_key(cfg: ModelConfig, version: int, providers: list[str], cache: OrtCache) -> str:
    """What a version's optimized graph depends on: its file, its model.toml (and labels) wherever
    the repository lies, the code that checks and folds it, and what OrtCache.key adds (ORT,
    providers, CPU)."""
    with cfg.onnx_path(version).open("rb") as f:
        source = hashlib.file_digest(f, "sha256").digest()
    code = hashlib.sha256(Path(__file__).with_name("graph.py").read_bytes()).digest()
    settings = repr(replace(cfg, directory=Path(cfg.name))).encode()
    return cache.key(source + code + settings, providers)


def _prepare(
    cfg: ModelConfig, version: int, providers: list[str], cache: OrtCache | None, recall: bool = True
) -> tuple[Prepared | Recalled, str]:
    """The graph to load, and its source key ("" without a cache): on the CPU, a version loaded
    before comes from the cache."""
    source = source_key(cfg, version, providers, cache) if cache is not None and providers == [CPU] else ""
    recalled = cache.recall(source) if cache is not None and source and recall else None
    if recalled is not None:
        return Recalled(*recalled), source
    from engine.graph import prepare_model

    return prepare_model(cfg, cfg.onnx_path(version)), source


@dataclass(frozen=True)
class Plan:
    instances: int = 0  # concurrent runners per model version; 0: auto (see plan_instances)
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0: auto
    cpu_max_batch: int = AUTO  # the largest batch on the CPU (plan_batch); AUTO: measured, 0: the model's


def load_planned(
    cfg: ModelConfig, version: int, providers: list[str], plan: Plan, cache: OrtCache | None
) -> tuple[LoadedModel, int]:
    """Load with the instance and thread plan that suits the model's graph (see plan_instances)."""
    prepared, source = _prepare(cfg, version, providers, cache)
    sequential = prepared.subgraph_nodes >= NO_REUSE_SUBGRAPH_NODES
    instances, threads = plan_instances(providers, plan.instances, plan.threads)
    batch = plan_batch(providers, cfg.max_batch_size, plan.cpu_max_batch)
    measured = providers[0] != CUDA and plan.cpu_max_batch == AUTO
    helpers = wants_idle_helpers(providers, instances, threads)
    logger.info(
        "{}/{}: {} graph: {} instance(s) x {} intra-op thread(s){}",
        cfg.name,
        version,
        "loop-bound" if sequential else "parallel",
        instances,
        threads,
        " (helpers at idle priority)" if helpers else "",
    )
    # ORT's arena only where it cannot grow to a big batch: a measured batch is big only for a model
    # whose images cost next to nothing.
    small = measured or batch <= CPU_MAX_BATCH

    def built(graph: Prepared | Recalled, source: str) -> LoadedModel:
        return load(
            cfg,
            version,
            providers,
            threads,
            cache=cache,
            prepared=graph,
            source=source,
            cpu_arena=small,
            idle_helpers=helpers,
        )

    try:
        loaded = built(prepared, source)
    except Exception as exc:
        if cache is None or not isinstance(prepared, Recalled):
            raise
        logger.warning("{}/{}: the cached graph would not load ({}); preparing it again", cfg.name, version, exc)
        cache.forget(source)
        prepared, source = _prepare(cfg, version, providers, cache, recall=False)
        loaded = built(prepared, source)
    if measured:
        batch = measure_batch(loaded.session, loaded.input_shape, cfg.max_batch_size)
    logger.info("{}/{}: batches of up to {}{}", cfg.name, version, batch, " (measured)" if measured else "")
    return replace(loaded, max_batch=batch), instances
