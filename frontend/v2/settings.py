"""Settings of the V2 protocol that the shared ``frontend.settings.Settings`` does not carry."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class V2Settings(BaseSettings):
    """Built once per worker in ``make_router`` (called from the app factory), from RINGSERVE_*."""

    model_config = SettingsConfigDict(env_prefix="RINGSERVE_", frozen=True, extra="ignore")

    # Clients may name POSIX shared-memory segments for tensors (Triton's --allow-client-shm).
    # Off by default: a registered key lets a network client read and write that segment.
    allow_client_shm: bool = False
