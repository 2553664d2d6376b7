"""A cache of ONNX Runtime's optimized graphs, so a restart does not optimise the same model again.

ONNX Runtime can write the graph it optimised (``SessionOptions.optimized_model_filepath``); a
later session created from that file with optimisations disabled skips the optimiser. The file is
only valid for the ORT build, execution providers and CPU that made it (ORT_ENABLE_ALL applies
hardware-specific layout changes such as NCHWc blocking), so all of those are in the key, with the
sha256 of the exact bytes the engine loads (after preprocessing was folded in).

CPU sessions only: a graph optimised for the CUDA provider carries the Memcpy nodes ORT inserted
for it, and such a file fails to load again (onnxruntime#11348, foundry-local#1075).

Entries are written to a temporary name and renamed, so concurrent engines and a crash mid-write
never leave a half file under a real key. An entry that fails to load is removed and the model is
optimised again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from loguru import logger

CPU = "CPUExecutionProvider"
KEEP = 32  # entries kept; older ones (by last use) are removed
MAX_BYTES = 1 << 30  # ORT cannot write a single-file model over 2 GB; stay well clear


def _cpu_fingerprint() -> str:
    """The CPU features ORT's kernels and layout transforms depend on."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class OrtCache:
    directory: Path

    def key(self, model: bytes, providers: list[str]) -> str:
        h = hashlib.sha256(model)
        h.update(f"|ort={ort.__version__}|providers={','.join(providers)}|cpu={_cpu_fingerprint()}".encode())
        return h.hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.onnx"

    def usable(self, model: bytes, providers: list[str]) -> bool:
        return providers == [CPU] and len(model) < MAX_BYTES

    def lookup(self, key: str) -> Path | None:
        path = self.path(key)
        if not path.is_file():
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # last use, for pruning
        return path

    def temporary(self, key: str) -> Path | None:
        """Where ORT should write the optimized graph, or None when the directory is not writable."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            logger.warning("ORT cache {} unusable: {}", self.directory, exc)
            return None
        if not os.access(self.directory, os.W_OK):
            logger.warning("ORT cache {} is not writable; models are optimised at every start", self.directory)
            return None
        return self.directory / f".{key}.{os.getpid()}.{time.monotonic_ns()}.tmp"

    def commit(self, temporary: Path, key: str) -> bool:
        try:
            os.replace(temporary, self.path(key))
        except OSError as exc:
            logger.warning("could not store the optimized graph {}: {}", key, exc)
            temporary.unlink(missing_ok=True)
            return False
        self.prune()
        return True

    def drop(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def prune(self, keep: int = KEEP) -> None:
        for pattern in ("*.onnx", "*.json"):
            try:
                entries = sorted(self.directory.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
            except OSError:
                return
            for old in entries[keep:]:
                old.unlink(missing_ok=True)

    # A source model (its file, its model.toml, the code that folds it) -> the optimized graph it
    # became, and the size of its subgraphs: a repeat load reads neither onnx nor the source graph.
    def remember(self, source: str, key: str, subgraph_nodes: int) -> None:
        index = self.directory / f"{source}.json"
        temporary = index.with_name(f".{source}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        try:
            temporary.write_text(json.dumps({"key": key, "subgraph_nodes": subgraph_nodes}))
            os.replace(temporary, index)
        except OSError as exc:
            logger.warning("could not index the optimized graph {}: {}", key, exc)
            temporary.unlink(missing_ok=True)

    def recall(self, source: str) -> tuple[Path, int] | None:
        index = self.directory / f"{source}.json"
        try:
            entry = json.loads(index.read_text())
            key, nodes = str(entry["key"]), int(entry["subgraph_nodes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.lookup(key)
        if path is None:
            return None
        with contextlib.suppress(OSError):
            os.utime(index)
        return path, nodes

    def forget(self, source: str) -> None:
        (self.directory / f"{source}.json").unlink(missing_ok=True)


def open_optimized(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """A session from a graph ORT optimised before: the optimiser does not run again."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def create_session(
    model: bytes, options: ort.SessionOptions, providers: list[str], cache: OrtCache | None
) -> tuple[ort.InferenceSession, bool, str | None]:
    """An InferenceSession for ``model``, through the cache where it applies: (session, cache hit,
    the key of the cache entry that now holds its optimized graph, or None)."""
    if cache is None or not cache.usable(model, providers):
        return ort.InferenceSession(model, sess_options=options, providers=providers), False, None
    key = cache.key(model, providers)
    cached = cache.lookup(key)
    if cached is not None:
        level = options.graph_optimization_level
        try:
            return open_optimized(cached, options, providers), True, key
        except Exception as exc:  # a damaged or foreign entry: optimise again
            logger.warning("dropping unusable ORT cache entry {}: {}", cached, exc)
            cache.drop(key)
            options.graph_optimization_level = level
    temporary = cache.temporary(key)
    if temporary is not None:
        options.optimized_model_filepath = str(temporary)
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except BaseException:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise
    stored = False
    if temporary is not None:
        if temporary.is_file():
            stored = cache.commit(temporary, key)
        else:
            logger.warning("ONNX Runtime did not write the optimized graph for {}", key)
    return session, False, key if stored else None
