"""Loguru set-up for both processes: human lines by default, JSON lines on request."""

from __future__ import annotations

import sys

from loguru import logger

_HUMAN = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[process]}</cyan> <magenta>{extra[request_id]}</magenta> {message}"
)


def configure(process: str, *, json: bool = False, level: str = "INFO") -> None:
    logger.remove()
    logger.configure(extra={"process": process, "request_id": "-"})
    if json:
        logger.add(sys.stderr, level=level, serialize=True, enqueue=False)
    else:
        logger.add(sys.stderr, level=level, format=_HUMAN, colorize=sys.stderr.isatty())
