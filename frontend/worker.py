"""One HTTP worker process: uvicorn serving ``frontend.app`` on a listening socket it inherited.

``ringserve serve`` and ``ringserve frontend`` bind the port once and start W of these
(engine/frontend_cmd.py ``HttpWorkers``), each given the socket's descriptor with ``--fd``. So no
uvicorn supervisor process and no multiprocessing resource tracker run beside the workers. The
worker stops as uvicorn does on SIGTERM or SIGINT: it stops accepting, drains its requests for up
to ``--drain-timeout`` seconds, then closes. With ``--alive-fd``, its event loop writes a byte to
that pipe every second (from uvicorn's own tick, ``callback_notify``): the pool replaces a worker
whose loop has stopped running. It gets a SIGTERM when the pool's process exits, even by SIGKILL
(ipc/lifeline.py), so no worker outlives its pool.

    python -m frontend.worker --fd 3 --drain-timeout 15 [--alive-fd 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Awaitable, Callable

import uvicorn

from frontend.settings import Settings
from ipc.lifeline import exit_with_parent

APP = "frontend.app:create_app"
# uvicorn's exit code for a worker whose app could not start: the pool stops instead of starting
# another that would fail the same way (engine/frontend_cmd.py keeps the same number).
STARTUP_FAILURE = 3
WS_HEADROOM = 4096  # a WebSocket frame may carry a whole request body plus its framing


def config(drain_timeout: float, settings: Settings, alive_fd: int | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        APP,
        factory=True,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(drain_timeout),
        ws_max_size=settings.max_body_bytes + WS_HEADROOM,
        # uvicorn calls it from its once-a-second tick on the event loop, when more than
        # timeout_notify seconds have passed since the last call: so once a second.
        callback_notify=None if alive_fd is None else _alive(alive_fd),
        timeout_notify=0,
    )


def _alive(fd: int) -> Callable[[], Awaitable[None]]:
    os.set_blocking(fd, False)

    async def notify() -> None:
        # a full pipe (the pool is busy) or a gone pool: nothing to do, the next tick tries again
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(fd, b".")

    return notify


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m frontend.worker", description=__doc__.splitlines()[0])
    p.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    p.add_argument("--drain-timeout", type=float, default=15.0, help="seconds to finish requests on SIGTERM")
    p.add_argument("--alive-fd", type=int, help="a pipe to write a byte to every second while the event loop runs")
    args = p.parse_args(argv)
    exit_with_parent()  # drain and go if the pool that started this worker is killed
    listener = socket.socket(fileno=args.fd)  # family and type from the descriptor itself
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError: a RINGSERVE_* value the workers refuse
        print(f"the HTTP worker cannot start: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)
    server = uvicorn.Server(config(args.drain_timeout, settings, args.alive_fd))
    try:
        server.run(sockets=[listener])
    except SystemExit:
        if server.started:
            raise
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    main()
