"""What the V2 routes of one worker share: settings, the statistics file, the shm registry."""

from __future__ import annotations

from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from frontend.settings import Settings
from frontend.v2.rundir import group_dir, remove_stale_groups
from frontend.v2.settings import V2Settings
from frontend.v2.shm import ShmRegistry
from frontend.v2.stats import StatsWriter


class V2State:
    def __init__(self, settings: Settings, v2: V2Settings) -> None:
        self.settings = settings
        self.v2 = v2
        try:
            self.version = version("ringserve")
        except PackageNotFoundError:
            self.version = "0.0.0"

    @cached_property
    def group(self) -> Path:
        """Created on first use, so building the app touches no file."""
        directory = group_dir(self.settings.run_dir)
        remove_stale_groups(self.settings.run_dir, keep=directory)
        return directory

    @cached_property
    def stats(self) -> StatsWriter:
        return StatsWriter(self.group / "stats")

    @cached_property
    def shm(self) -> ShmRegistry:
        v2 = self.v2
        return ShmRegistry(self.group, v2.allow_client_shm, v2.client_shm_max_regions, v2.client_shm_max_bytes)

    def extensions(self) -> list[str]:
        names = ["binary_tensor_data", "classification", "statistics", "model_configuration", "parameters"]
        if self.v2.allow_client_shm:
            names.append("system_shared_memory")
        return names
