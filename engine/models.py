"""Loading the repository into sessions: one LoadedModel per (model, version)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from loguru import logger

from engine.repository import ModelConfig
from engine.session import OrtSession, Session
from ipc.messages import InputSpec, ModelInfo


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    version: int
    session: Session
    info: ModelInfo
    load_seconds: float

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
    )


def load(cfg: ModelConfig, version: int, providers: list[str], threads: int) -> LoadedModel:
    from engine.graph import prepare

    started = time.perf_counter()
    model_bytes = prepare(cfg, cfg.onnx_path(version))
    session = OrtSession(model_bytes, "", providers, threads, max_batch=cfg.max_batch_size)
    elapsed = time.perf_counter() - started
    logger.info("loaded {}/{} ({}) in {:.2f}s on {}", cfg.name, version, cfg.task, elapsed, session.providers)
    return LoadedModel(cfg, version, session, model_info(cfg, version, session), elapsed)
