"""The one builder of the HTTP workers' command line (uvicorn), for ``ringserve serve`` and for
``ringserve frontend`` (which supervisord.conf runs), so the two cannot drift apart.

The workers are started by module path (``frontend.app:create_app``), never imported here: the
engine side does not depend on the frontend.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ipc.metrics_dir import ENV as METRICS_ENV
from ipc.metrics_dir import metrics_dir

DEFAULT_MAX_BODY = 20 * 1024 * 1024  # frontend/settings.py: max_body_bytes


@dataclass(frozen=True)
class FrontendArgs:
    host: str
    port: int
    workers: int  # 0: one per core
    drain_timeout: float
    run_dir: Path


def worker_count(workers: int) -> int:
    return workers or len(os.sched_getaffinity(0))


def uvicorn_argv(a: FrontendArgs) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "frontend.app:create_app",
        "--factory",
        "--host",
        a.host,
        "--port",
        str(a.port),
        "--workers",
        str(worker_count(a.workers)),
        "--timeout-graceful-shutdown",
        str(int(a.drain_timeout)),
        "--no-access-log",
        "--log-level",
        "warning",
        # WebSocket frames may be as large as a request body (RINGSERVE_MAX_BODY_BYTES).
        "--ws-max-size",
        str(int(os.environ.get("RINGSERVE_MAX_BODY_BYTES", DEFAULT_MAX_BODY)) + 4096),
    ]


def frontend_env(run_dir: Path) -> dict[str, str]:
    """What the workers must agree on with the engine: the run directory and the metrics directory."""
    return {"RINGSERVE_RUN_DIR": str(run_dir), METRICS_ENV: str(metrics_dir(run_dir))}


def exec_frontend(a: FrontendArgs) -> None:
    """``ringserve frontend``: become uvicorn (the process a supervisor signals and watches)."""
    from ipc.sockets import prepare_run_dir

    prepare_run_dir(a.run_dir)
    os.environ.update(frontend_env(a.run_dir))
    os.environ["RINGSERVE_HOST"] = a.host  # the workers' gRPC server binds the HTTP host (as serve's)
    argv = uvicorn_argv(a)
    os.execv(argv[0], argv)
