"""What the repository asks to be served: versions chosen by each model's version policy, with a
fingerprint of their files, and (in poll mode) a thread that scans the repository.

A change is acted on only once it has been the same in two scans in a row, so a version directory
being copied in is not loaded half-written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from engine.repository import ModelConfig, scan

Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Want:
    """One version the repository asks for: its configuration and the fingerprint of its files."""

    config: ModelConfig
    fingerprint: Fingerprint


@dataclass(frozen=True)
class Snapshot:
    """Per model: {version: Want}; per model whose model.toml is unusable: why."""

    wants: dict[str, dict[int, Want]]
    errors: dict[str, str]


def _files(directory: Path) -> list[tuple[str, int, int]]:
    out = []
    try:
        for p in sorted(directory.iterdir()):
            if p.is_file():
                st = p.stat()
                out.append((str(p), st.st_size, st.st_mtime_ns))
    except OSError:
        pass
    return out


def fingerprint(cfg: ModelConfig, version: int) -> Fingerprint:
    """The model directory's own files (model.toml, labels) and every file of the version directory."""
    return tuple(_files(cfg.directory) + _files(cfg.directory / str(version)))


def snapshot(repo: Path, only: list[str] | None) -> Snapshot:
    configs, failed = scan(repo, only)
    wants: dict[str, dict[int, Want]] = {}
    errors = dict(failed)
    for cfg in configs:
        chosen = cfg.served_versions()
        wants[cfg.name] = {v: Want(cfg, fingerprint(cfg, v)) for v in chosen}
        missing = sorted(set(cfg.policy_specific) - set(cfg.versions)) if cfg.policy == "specific" else []
        for v in missing:
            errors[f"{cfg.name}/{v}"] = f"{cfg.directory / str(v) / 'model.onnx'}: missing (version_policy.specific)"
    return Snapshot(wants, errors)


def _same(a: dict[int, Want] | None, b: dict[int, Want] | None) -> bool:
    if a is None or b is None:
        return a is b
    return {v: w.fingerprint for v, w in a.items()} == {v: w.fingerprint for v, w in b.items()}


def stable(previous: Snapshot, current: Snapshot, accepted: Snapshot) -> Snapshot:
    """``accepted`` updated with every model whose scan did not change between the two snapshots."""
    wants = dict(accepted.wants)
    for name in set(previous.wants) | set(current.wants) | set(accepted.wants):
        before, now = previous.wants.get(name), current.wants.get(name)
        if not _same(before, now):
            continue
        if now is None:
            if name in current.errors:
                continue  # a broken model.toml: what was served stays served
            wants.pop(name, None)  # the model directory is gone
        else:
            wants[name] = now
    errors = {k: v for k, v in current.errors.items() if previous.errors.get(k) == v}
    return Snapshot(wants, errors)


class Watcher:
    """Scans the repository every ``interval`` seconds and hands on what has settled."""

    def __init__(
        self,
        repo: Path,
        only: list[str] | None,
        interval: float,
        first: Snapshot,
        publish: Callable[[Snapshot], None],
    ) -> None:
        self.repo, self.only, self.interval = repo, only, interval
        self._previous = self._accepted = first
        self._publish = publish
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="repository-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                current = snapshot(self.repo, self.only)
            except Exception:  # a scan must never end the watch
                logger.exception("repository scan of {} failed", self.repo)
                continue
            accepted = stable(self._previous, current, self._accepted)
            self._previous = current
            if accepted != self._accepted:
                self._accepted = accepted
                self._publish(accepted)
