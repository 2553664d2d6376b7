"""The ``ringserve`` command. It lives with the engine; HTTP workers are started by module path."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engine import control
from ipc import logs
from ipc.sockets import default_run_dir


def _env(name: str, default: str) -> str:
    return os.environ.get(f"RINGSERVE_{name}", default)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo",
        type=Path,
        default=Path(_env("MODEL_REPO", "models")),
        help="model repository (env RINGSERVE_MODEL_REPO, default ./models)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=Path(_env("RUN_DIR", str(default_run_dir()))),
        help="private directory for the engine socket (env RINGSERVE_RUN_DIR)",
    )
    p.add_argument(
        "--models",
        default=_env("MODELS", ""),
        help="comma-separated model names to load (default: all in the repository)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_env("ORT_THREADS", "0"),  # argparse applies type= to a string default, at parse time
        help="ONNX Runtime intra-op threads per instance on the CPU (0: see plan_instances)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=_env("INSTANCES", "0"),
        help="concurrent runs per model on the CPU (0: one per core)",
    )
    p.add_argument(
        "--cpu-max-batch",
        type=int,
        default=_env("CPU_MAX_BATCH", "-1"),
        help="largest batch an instance runs on the CPU (-1: measured at load; 0: the model's max_batch_size)",
    )
    p.add_argument("--providers", choices=("auto", "cpu", "cuda"), default=_env("PROVIDERS", "auto"))
    control.add_arguments(p)  # model control mode, polling, unload grace, ORT cache


def _http(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=_env("PORT", "8000"))
    p.add_argument("--workers", type=int, default=_env("WORKERS", "0"), help="HTTP worker processes (0: one per core)")
    p.add_argument("--drain-timeout", type=float, default=_env("DRAIN_TIMEOUT_S", "15"))
    p.add_argument(
        "--worker-hang-timeout",
        type=float,
        default=_env("WORKER_HANG_S", "30"),
        help="replace an HTTP worker whose event loop has not run for this long (0: never)",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ringserve", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the appliance (engine + HTTP workers) in the foreground")
    _common(serve)
    _http(serve)
    serve.add_argument(
        "--max-restarts",
        type=int,
        default=_env("MAX_RESTARTS", "5"),
        help="give up (exit 3) when the engine exits more often than this within --restart-window",
    )
    serve.add_argument("--restart-window", type=float, default=_env("RESTART_WINDOW_S", "60"))
    serve.add_argument(
        "--restart-backoff-max",
        type=float,
        default=_env("RESTART_BACKOFF_MAX_S", "30"),
        help="the engine restart delay doubles from 0.5 s up to this",
    )

    front = sub.add_parser("frontend", help="run only the HTTP workers (what supervisord runs)")
    front.add_argument(
        "--run-dir",
        type=Path,
        default=Path(_env("RUN_DIR", str(default_run_dir()))),
        help="the engine's run directory (env RINGSERVE_RUN_DIR)",
    )
    _http(front)

    engine = sub.add_parser("engine", help="run only the engine process")
    _common(engine)
    engine.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop (as on SIGTERM) when the process that started the engine exits (ringserve serve)",
    )

    models = sub.add_parser("models", help="manage the model repository")
    msub = models.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="build a model into the repository (default: the SSD detector)")
    pull.add_argument("name", nargs="?", default="ssd-mobilenet-v2-coco")
    pull.add_argument("--repo", type=Path, default=Path(_env("MODEL_REPO", "models")))
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    lst = msub.add_parser("list", help="list the models of the repository")
    lst.add_argument("--repo", type=Path, default=Path(_env("MODEL_REPO", "models")))
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logs.configure(args.command, json=_env("LOG_JSON", "0") == "1", level=_env("LOG_LEVEL", "INFO"))
    if args.command == "engine":
        from ipc.lifeline import exit_with_parent
        from ipc.metrics_dir import ensure_env

        if args.exit_with_parent:
            exit_with_parent()

        ensure_env(args.run_dir)  # before prometheus_client is imported
        from engine.server import EngineSettings, run

        run(
            EngineSettings(
                repo=args.repo.resolve(),
                run_dir=args.run_dir,
                models=[m for m in args.models.split(",") if m],
                threads=args.threads,
                instances=args.instances,
                cpu_max_batch=args.cpu_max_batch,
                providers=args.providers,
                lifecycle=control.from_args(args),
            )
        )
    elif args.command == "serve":
        from engine.launcher import Launcher

        sys.exit(Launcher(args).run())
    elif args.command == "frontend":
        from engine.frontend_cmd import FrontendArgs, run_frontend

        a = FrontendArgs(args.host, args.port, args.workers, args.drain_timeout, args.run_dir, args.worker_hang_timeout)
        sys.exit(run_frontend(a))
    elif args.command == "models":
        from engine import pull

        sys.exit(pull.command(args))
