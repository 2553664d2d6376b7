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
    # Triton's gRPC API (frontend/grpc/): every worker serves it on this port (SO_REUSEPORT); 0 = off.
    grpc_port: int = Field(8001, ge=0, le=65535)
    host: str = "127.0.0.1"  # the HTTP bind host (`ringserve serve --host` exports it); gRPC binds it too
    cors_origins: list[str] = []
    allowed_hosts: list[str] = []  # Host headers accepted (DNS rebinding); empty: any. JSON list in the env
    log_json: bool = False
    log_level: str = "INFO"
    # /health/ready waits for these models (comma-separated); "": the default model; "-": none
    required_models: str = ""
    # DeepStack API (frontend/routes/deepstack.py): the classifier behind /v1/vision/scene; "" = the first served
    deepstack_scene_model: str = ""
    # Shared state of the workers (frontend/state/: SQLite files under data_dir, issue 17).
    model_repo: Path = Path("models")  # as `ringserve serve --repo` (the launcher exports it)
    data_dir: Path | None = None  # None: a data/ folder beside the model repository
    cache_entries: int = Field(0, ge=0)  # result cache; 0 = off
    cache_bytes: int = Field(256 * 1024 * 1024, ge=0)  # ... and its bound on stored answers
    rate_limit: str = ""  # e.g. "20/second;600/minute" per API key or client IP; "" = off
    rate_limit_strategy: str = "moving-window"  # or sliding-window-counter, fixed-window
    prediction_log: bool = False
    prediction_log_days: float = Field(30.0, gt=0)
    prediction_log_rows: int = Field(1_000_000, ge=1)
    prediction_log_queue: int = Field(10_000, ge=1)
    job_retention_s: float = Field(24 * 3600.0, gt=0)  # finished jobs are kept this long
    job_max: int = Field(10_000, ge=1)  # stored jobs (any status); past it a new job is a 503
    job_max_bytes: int = Field(2 * 1024**3, ge=1)  # their inputs and results together
    job_lease_s: float = Field(10.0, gt=0)  # a job whose worker stops renewing is taken over
    job_attempts: int = Field(8, ge=1)
    job_concurrency: int = Field(1, ge=1)  # jobs one worker runs at a time

    @property
    def state_dir(self) -> Path:
        return self.data_dir or self.model_repo.resolve().parent / "data"
