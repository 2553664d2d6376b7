"""Where the workers of one appliance share V2 state: ``<run_dir>/v2/<group>/``.

The group is the process that started the HTTP workers (uvicorn's supervisor, or ``ringserve
serve`` with one worker), named by its pid and start time: workers replaced by the supervisor keep
the group, so box-wide counters never go backwards, while the next start of the appliance gets a
fresh group, as tritonserver's statistics and registered regions start afresh with the server.
Groups whose process is gone are removed by the next worker that starts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loguru import logger


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name (field 2) may hold spaces and parentheses.
    return stat.rsplit(")", 1)[1].split()[19]


def group_dir(run_dir: Path) -> Path:
    ppid = os.getppid()
    directory = run_dir / "v2" / f"{ppid}-{_start_time(ppid) or 0}"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def remove_stale_groups(run_dir: Path, keep: Path) -> None:
    root = run_dir / "v2"
    if not root.is_dir() or _start_time(os.getpid()) is None:  # no /proc: cannot tell, keep all
        return
    for directory in root.iterdir():
        pid, _, start = directory.name.partition("-")
        if directory != keep and pid.isdigit() and _start_time(int(pid)) != start:
            logger.info("removing V2 state of a stopped appliance: {}", directory)
            shutil.rmtree(directory, ignore_errors=True)
