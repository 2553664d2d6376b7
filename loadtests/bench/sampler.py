"""Memory and CPU of a target's whole process tree, sampled in a thread while it is under load.

Memory is the sum over the tree's processes of PSS (each shared page divided among the processes
that map it: what the tree really costs the box) and of RSS (shared pages counted in every process)
from ``memory_full_info``; the peak of each sum over the samples is reported. CPU is the tree's
user + system time; ``cores(t0, t1)`` is its average over a wall-clock window, in cores.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

import psutil

MB = 2**20


class TreeSampler:
    def __init__(self, roots: Callable[[], list[int]], every: float = 0.5) -> None:
        self.roots = roots
        self.every = every
        self.peak_pss = self.peak_rss = 0
        self.processes = 0
        self.peak_detail: list[dict[str, object]] = []
        self._first_cpu: dict[int, float] = {}
        self._last_cpu: dict[int, float] = {}
        self._times: list[float] = []
        self._cpu: list[float] = []  # cumulative CPU seconds of the tree since sampling began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def _tree(self) -> list[psutil.Process]:
        procs: dict[int, psutil.Process] = {}
        for pid in self.roots():
            try:
                root = psutil.Process(pid)
                procs[pid] = root
                procs.update((c.pid, c) for c in root.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return list(procs.values())

    def sample(self) -> None:
        pss = rss = count = 0
        detail = []
        for proc in self._tree():
            try:
                with proc.oneshot():
                    mem = proc.memory_full_info()
                    cpu = proc.cpu_times()
                    cmd = proc.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            pss += mem.pss
            rss += mem.rss
            count += 1
            detail.append(
                {
                    "pid": proc.pid,
                    "cmd": _short(cmd),
                    "pss_mb": round(mem.pss / MB, 1),
                    "rss_mb": round(mem.rss / MB, 1),
                }
            )
            total = cpu.user + cpu.system
            self._first_cpu.setdefault(proc.pid, total)
            self._last_cpu[proc.pid] = total
        if pss > self.peak_pss:
            self.peak_detail = detail
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_rss = max(self.peak_rss, rss)
        self.processes = max(self.processes, count)
        self._times.append(time.time())
        self._cpu.append(sum(self._last_cpu[p] - self._first_cpu[p] for p in self._last_cpu))

    def cores(self, t0: float, t1: float) -> float:
        """Average CPU use of the tree between two wall-clock times, in cores (NaN if unsampled)."""
        i = bisect.bisect_left(self._times, t0)
        j = bisect.bisect_right(self._times, t1) - 1
        if j <= i:
            return float("nan")
        return (self._cpu[j] - self._cpu[i]) / (self._times[j] - self._times[i])

    def memory(self) -> dict[str, object]:
        """Peak PSS and RSS sums, and each process's share at the PSS peak."""
        return {
            "pss_mb": self.peak_pss / MB,
            "rss_mb": self.peak_rss / MB,
            "processes": self.processes,
            "per_process": self.peak_detail,
        }


def _short(cmdline: list[str]) -> str:
    """``python -m engine serve ...`` -> ``engine serve``; a multiprocessing child by its role."""
    text = " ".join(cmdline)
    if "resource_tracker" in text:
        return "multiprocessing resource tracker"
    if "spawn_main" in text:
        return "multiprocessing worker"
    args = cmdline[1:]
    if args[:1] == ["-m"]:
        args = args[1:]
    return " ".join(args[:2])[:60]
