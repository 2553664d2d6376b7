"""loadtests/gpu_kit.py, the GPU box's kit, without a GPU and without the network: the parts add up
to the tar that was split (and a missing or altered part is refused), every device call carries
less than the tool's 64 MiB, and the summary reads what gpu_check and the benchmark write."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from loadtests import gpu_kit


def _kit(tmp_path: Path, part_bytes: int) -> tuple[Path, dict]:
    src = tmp_path / "src"
    (src / "wheels").mkdir(parents=True)
    (src / "wheels" / "a-1.0-py3-none-any.whl").write_bytes(bytes(range(256)) * 40)
    (src / "models" / "m").mkdir(parents=True)
    (src / "models" / "m" / "model.toml").write_text("[batching]\nmax_batch_size = 4\n")
    kit_dir = tmp_path / "kit"
    kit_dir.mkdir()
    tar = kit_dir / "kit.tar"
    with tarfile.open(tar, "w") as t:
        t.add(src / "wheels", "wheels")
        t.add(src / "models", "models")
    parts, digest = gpu_kit.split(tar, kit_dir, part_bytes)
    kit = {"sha256": digest, "parts": [p.name for p in parts], "wheels": [], "models": ["m"]}
    tar.unlink()
    (kit_dir / "kit.json").write_text(json.dumps(kit))
    return kit_dir, kit


def test_the_parts_unpack_to_what_was_packed_and_a_bad_part_is_refused(tmp_path: Path) -> None:
    kit_dir, kit = _kit(tmp_path, part_bytes=4096)
    assert len(kit["parts"]) > 2
    gpu_kit.unpack(kit_dir, tmp_path / "out")
    assert (tmp_path / "out" / "wheels" / "a-1.0-py3-none-any.whl").read_bytes() == bytes(range(256)) * 40
    assert "max_batch_size = 4" in (tmp_path / "out" / "models" / "m" / "model.toml").read_text()

    last = kit_dir / kit["parts"][-1]
    last.write_bytes(last.read_bytes()[:-1] + b"?")
    with pytest.raises(SystemExit, match="sha256"):
        gpu_kit.unpack(kit_dir, tmp_path / "again")
    last.unlink()
    with pytest.raises(SystemExit, match="parts missing"):
        gpu_kit.unpack(kit_dir, tmp_path / "again")


def test_every_device_call_carries_one_part_and_only_the_last_measures() -> None:
    out = gpu_kit.ROOT / ".gpukit"
    kit = {"parts": [f"part-{i:02d}" for i in range(5)]}
    calls = gpu_kit.device_calls(kit, out)
    assert [c["carry"] for c in calls[:-1]] == [[f".gpukit/part-{i:02d}"] for i in range(4)]
    assert calls[-1]["carry"] == [".gpukit/part-04", ".gpukit/kit.json"]
    assert all("measure" not in c["command"] for c in calls[:-1])
    assert "loadtests.gpu_kit measure --kit /tmp/kit --out $OUT" in calls[-1]["command"]
    assert all(c["timeout_s"] <= 600 for c in calls)
    assert gpu_kit.PART_MIB + 2.5 < 64  # a part and the repository's tracked files (2.2 MB) fit one call


def test_the_summary_reads_gpu_check_and_the_benchmark(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name, batch in zip(gpu_kit.MODELS, (8, 4), strict=True):
        (models / name).mkdir(parents=True)
        (models / name / "model.toml").write_text(f"[batching]\nmax_batch_size = {batch}\n")
    steps = tmp_path / "steps"
    steps.mkdir()
    modes = {"1": 500.0, "8": 2000.0, "32": 4000.0}
    gpu = {
        "session": {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]},
        "throughput": {
            b: {"cuda_plain_run": {"images_per_s": v}, "cpu": {"images_per_s": 10.0}} for b, v in modes.items()
        },
        "engine": {"images_per_s": 1500.0},
    }
    (steps / "gpu-lite0.json").write_text(json.dumps(gpu))
    for workers, rps in (("2", 900.0), ("4", 1700.0)):
        bench = steps / f"http-lite0-w{workers}"
        bench.mkdir()
        points = [{"concurrency": 64, "rps": rps}]
        (bench / "bench-lite0.json").write_text(json.dumps({"targets": [{"key": "ringserve", "points": points}]}))
    s = gpu_kit.summarise(steps, ["2", "4", "8"], models)
    lite0 = s["efficientnet-lite0"]
    assert lite0["http_rps"] == {"2": {"64": 900.0}, "4": {"64": 1700.0}}
    assert lite0["bare_mode"] == "cuda_plain_run" and lite0["engine_batch"] == 8
    assert lite0["ratio_to_bare_best_batch"] == round(1700 / 4000, 3) and not lite0["goal_0_8x_of_bare_best_met"]
    assert lite0["ratio_to_bare_at_engine_batch"] == round(1700 / 2000, 3)
    assert s["ssd-mobilenet-v2-coco"] == {"engine_batch": 4, "http_rps": {}}  # nothing measured: nothing claimed
