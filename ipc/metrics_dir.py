"""The per-run Prometheus multiprocess directory, shared by the workers and the engine.

Every process writes its own ``<kind>_<pid>.db`` files (prometheus_client multiprocess mode); one
scrape of any worker merges them all. To keep the directory from growing with every restarted
process, the files of dead pids are folded into ``<kind>_archive.db`` (counters and histograms
are sums, so folding keeps the totals: no double counting, nothing going backwards) under a lock.
Live gauges of dead pids are dropped; 'max' gauges are kept as they are.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from pathlib import Path

from ipc.shm import pid_alive

ENV = "PROMETHEUS_MULTIPROC_DIR"
_FILE_RE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_(\d+)\.db$")
_SUMMED = ("counter", "histogram", "summary")


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / "metrics"


def wipe(path: Path) -> None:
    """A fresh directory for a new run of the whole appliance."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def ensure_env(run_dir: Path) -> Path:
    """Point prometheus_client at the run's directory; call before importing prometheus_client."""
    path = Path(os.environ.get(ENV) or metrics_dir(run_dir))
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ[ENV] = str(path)
    return path


def compact(path: Path) -> int:
    """Fold the files of dead processes into archives. Returns how many files were folded."""
    from prometheus_client.mmap_dict import MmapedDict

    folded = 0
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for f in sorted(path.glob("*.db")):
            match = _FILE_RE.match(f.name)
            if match is None or pid_alive(int(match.group(2))):
                continue
            kind = match.group(1)
            if kind.startswith("gauge_live"):
                f.unlink(missing_ok=True)  # a dead process contributes nothing to live gauges
                continue
            if kind not in _SUMMED:
                continue  # max/min/all gauges: keep the file (bounded by the number of such gauges)
            archive = MmapedDict(str(path / f"{kind}_archive.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(str(f)):
                    old_value, old_ts = archive.read_value(key)
                    archive.write_value(key, old_value + value, max(old_ts, timestamp))
            finally:
                archive.close()
            f.unlink(missing_ok=True)
            folded += 1
    return folded
