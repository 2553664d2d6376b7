"""How the engine manages its models: the control mode, polling, unload grace, the ORT cache.

Built once from the command line (defaults from RINGSERVE_* variables) at the entry point, passed
to the engine, and forwarded by ``ringserve serve`` to the engine process it starts.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # engine.ortcache imports onnxruntime, which the launcher never needs
    from engine.ortcache import OrtCache

MODES = ("none", "poll", "explicit")


@dataclass(frozen=True)
class LifecycleSettings:
    # poll: the repository is watched and changes are applied while serving (Triton's POLL);
    # explicit: only the repository API loads and unloads; none: what loaded at start stays.
    control: str = "poll"
    poll_interval_s: float = 2.0
    # A version that stopped being announced is still served this long after the last request
    # that reached it: requests that a worker resolved just before it learned the new model set.
    unload_grace_s: float = 2.0
    ort_cache: str = ""  # "" : <repo>/.ortcache (or ~/.cache/ringserve/ort); "off": no cache

    def cache(self, repo: Path) -> OrtCache | None:
        from engine.ortcache import OrtCache

        if self.ort_cache == "off":
            return None
        if self.ort_cache:
            return OrtCache(Path(self.ort_cache))
        if os.access(repo, os.W_OK):
            return OrtCache(repo / ".ortcache")  # repository scans skip dot directories
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return OrtCache(base / "ringserve" / "ort")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"RINGSERVE_{name}", default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = LifecycleSettings()
    p.add_argument(
        "--model-control",
        choices=MODES,
        default=_env("MODEL_CONTROL", d.control),
        help="none | poll (watch the repository) | explicit (repository API); env RINGSERVE_MODEL_CONTROL",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=float(_env("POLL_INTERVAL_S", str(d.poll_interval_s))),
        help="seconds between repository scans in poll mode (env RINGSERVE_POLL_INTERVAL_S)",
    )
    p.add_argument(
        "--unload-grace",
        type=float,
        default=float(_env("UNLOAD_GRACE_S", str(d.unload_grace_s))),
        help="seconds a replaced version keeps serving after its last request (env RINGSERVE_UNLOAD_GRACE_S)",
    )
    p.add_argument(
        "--ort-cache",
        default=_env("ORT_CACHE", d.ort_cache),
        help="directory of optimized graphs, or 'off' (env RINGSERVE_ORT_CACHE; default <repo>/.ortcache)",
    )


def from_args(args: argparse.Namespace) -> LifecycleSettings:
    if args.poll_interval <= 0 or args.unload_grace < 0:
        raise SystemExit("--poll-interval must be > 0 and --unload-grace >= 0")
    return LifecycleSettings(args.model_control, args.poll_interval, args.unload_grace, args.ort_cache)


def argv(args: argparse.Namespace) -> list[str]:
    """The same settings as engine command-line arguments (for the process ``serve`` starts)."""
    return [
        "--model-control",
        args.model_control,
        "--poll-interval",
        str(args.poll_interval),
        "--unload-grace",
        str(args.unload_grace),
        "--ort-cache",
        args.ort_cache,
    ]
