"""The optimized-graph cache: keys, hits that give the same answers, damaged entries, no disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

from engine.graph import prepare_model, subgraph_nodes
from engine.models import Plan, load, load_planned, source_key
from engine.ortcache import OrtCache
from engine.repository import load_config
from engine.session import CPU, NO_REUSE_SUBGRAPH_NODES, OrtSession
from tests.harness import ROOT
from tests.models import pixel_detector_onnx, write_pixel_detector

SSD = ROOT / "models" / "ssd-mobilenet-v2-coco"


def _pixels(n: int = 2) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_the_key_covers_the_bytes_and_the_providers(tmp_path: Path) -> None:
    cache = OrtCache(tmp_path)
    a = pixel_detector_onnx(64).SerializeToString()
    b = pixel_detector_onnx(32).SerializeToString()
    assert cache.key(a, [CPU]) == cache.key(a, [CPU])
    assert cache.key(a, [CPU]) != cache.key(b, [CPU])
    assert cache.key(a, [CPU]) != cache.key(a, ["CUDAExecutionProvider", CPU])
    # CUDA-optimized graphs carry Memcpy nodes that do not load again: never cached.
    assert not cache.usable(a, ["CUDAExecutionProvider", CPU]) and cache.usable(a, [CPU])


def test_a_second_session_comes_from_the_cache_and_answers_the_same(tmp_path: Path) -> None:
    model = pixel_detector_onnx(64).SerializeToString()
    cache = OrtCache(tmp_path / "cache")
    first = OrtSession(model, "", [CPU], 1, cache=cache)
    assert not first.cache_hit
    entries = list((tmp_path / "cache").glob("*.onnx"))
    assert [p.name for p in entries] == [f"{cache.key(model, [CPU])}.onnx"]
    assert not list((tmp_path / "cache").glob(".*.tmp")), "the temporary file was renamed"
    second = OrtSession(model, "", [CPU], 1, cache=cache)
    assert second.cache_hit
    plain = OrtSession(model, "", [CPU], 1)
    batch = _pixels()
    want = plain.run(batch)
    for session in (first, second):
        got = session.run(batch)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_a_damaged_entry_is_dropped_and_rebuilt(tmp_path: Path) -> None:
    model = pixel_detector_onnx(64).SerializeToString()
    cache = OrtCache(tmp_path)
    cache.path(cache.key(model, [CPU])).write_bytes(b"not an onnx graph")
    session = OrtSession(model, "", [CPU], 1, cache=cache)
    assert not session.cache_hit
    assert session.run(_pixels(1))["scores"].shape == (1, 1)
    assert OrtSession(model, "", [CPU], 1, cache=cache).cache_hit, "the rebuilt entry is good"


def test_no_usable_directory_means_no_cache_not_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    model = pixel_detector_onnx(64).SerializeToString()
    session = OrtSession(model, "", [CPU], 1, cache=OrtCache(blocker / "cache"))
    assert not session.cache_hit and session.run(_pixels(1))["count"].shape == (1,)


def test_pruning_keeps_the_most_recently_used(tmp_path: Path) -> None:
    cache = OrtCache(tmp_path)
    for i in range(5):
        path = cache.path(f"k{i}")
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    cache.prune(keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["k3.onnx", "k4.onnx"]


def test_the_engine_loads_through_the_cache(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    cfg = load_config(repo / "pixels")
    cache = OrtCache(tmp_path / "cache")
    assert not load(cfg, 1, [CPU], 1, cache=cache).session.cache_hit  # type: ignore[attr-defined]
    assert load(cfg, 1, [CPU], 1, cache=cache).session.cache_hit  # type: ignore[attr-defined]


def test_small_graphs_have_no_big_subgraph() -> None:
    assert subgraph_nodes(pixel_detector_onnx(64).graph) == 0


def test_the_ssd_nms_loop_turns_memory_reuse_off() -> None:
    prepared = prepare_model(load_config(SSD), SSD / "1" / "model.onnx")
    assert prepared.subgraph_nodes >= NO_REUSE_SUBGRAPH_NODES
    assert onnx.load_from_string(prepared.data).graph.input[0].name == "image_tensor:0"


def test_a_version_loaded_before_needs_neither_onnx_nor_the_fold(tmp_path: Path) -> None:
    """The index maps the source (file, model.toml, fold code) to the optimized graph; a fresh
    process that loads the version again never imports onnx, and answers as the first load did."""
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    script = f"""
import sys, json
import numpy as np
from pathlib import Path
from engine.models import Plan, load_planned
from engine.ortcache import OrtCache
from engine.repository import load_config
loaded, _ = load_planned(load_config(Path({str(repo / "pixels")!r})), 1, ["CPUExecutionProvider"], Plan(),
                         OrtCache(Path({str(tmp_path / "cache")!r})))
pixels = np.random.default_rng(7).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
out = loaded.session.run(pixels)
print(json.dumps({{"onnx": "onnx" in sys.modules, "hit": loaded.session.cache_hit,
                   "scores": out["scores"].tolist()}}))
"""

    def fresh() -> dict:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    first, second = fresh(), fresh()
    assert first["onnx"] and not first["hit"]
    assert not second["onnx"] and second["hit"]
    assert second["scores"] == first["scores"]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_a_recalled_graph_that_does_not_load_is_prepared_again(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_pixel_detector(repo)
    cfg = load_config(repo / "pixels")
    cache = OrtCache(tmp_path / "cache")
    load_planned(cfg, 1, [CPU], Plan(), cache)
    source = source_key(cfg, 1, [CPU], cache)
    recalled = cache.recall(source)
    assert recalled is not None
    recalled[0].write_bytes(b"damaged")
    loaded, _ = load_planned(cfg, 1, [CPU], Plan(), cache)
    assert loaded.session.run(_pixels(1))["scores"].shape == (1, 1)
    again = cache.recall(source)
    assert again is not None and again[0].read_bytes() != b"damaged", "indexed again, to a good graph"
    shutil.copytree(repo, tmp_path / "moved")
    assert source_key(load_config(tmp_path / "moved" / "pixels"), 1, [CPU], cache) == source, "wherever it lies"
    model_toml = repo / "pixels" / "model.toml"
    model_toml.write_text(model_toml.read_text().replace("confidence = 0.5", "confidence = 0.6"))
    assert source_key(load_config(repo / "pixels"), 1, [CPU], cache) != source, "model.toml is in the key"
