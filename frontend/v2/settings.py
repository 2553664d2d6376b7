"""Settings of the V2 protocol that the shared ``frontend.settings.Settings`` does not carry."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class V2Settings(BaseSettings):
    """Built once per worker in ``make_router`` (called from the app factory), from RINGSERVE_*."""

    model_config = SettingsConfigDict(env_prefix="RINGSERVE_", frozen=True, extra="ignore")

    # Clients may name POSIX shared-memory segments for tensors (Triton's --allow-client-shm).
    # Off by default: a registered key lets a network client read and write that segment.
    allow_client_shm: bool = False
    client_shm_max_regions: int = Field(64, ge=1)  # registered regions, box-wide
    client_shm_max_bytes: int = Field(1 << 30, ge=1)  # their registered bytes together
