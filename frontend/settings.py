"""One frozen settings object, built at the worker's entry point from RINGSERVE_* variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ipc.sockets import default_run_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RINGSERVE_", frozen=True, extra="ignore")

    run_dir: Path = Field(default_factory=default_run_dir)
    default_model: str = "ssd-mobilenet-v2-coco"
    ring_slots: int = Field(32, ge=1, le=4096)
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(50_000_000, ge=1)  # about 8k x 6k
    request_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)  # the whole request body must arrive within this (408)
    decode_queue_images: int = Field(64, ge=1)  # images waiting for a worker's decode thread (503 past it)
    decode_queue_bytes: int = Field(64 * 1024 * 1024, ge=1024)  # and their encoded bytes
    heartbeat_timeout_s: float = Field(0.6, gt=0)
    api_key: str = ""
    cors_origins: list[str] = []
    log_json: bool = False
    log_level: str = "INFO"
