"""Issue 14, point 6: one appliance per run directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import ROOT, Appliance, free_port


def test_a_second_appliance_on_the_same_run_dir_refuses_and_leaves_the_first_alone(
    pixel_repo: Path, no_leaks: None
) -> None:
    with Appliance(pixel_repo, workers=2) as first:
        assert first.proc is not None
        metrics_before = sorted(p.name for p in (first.run_dir / "metrics").iterdir())
        sock = first.run_dir / "engine.sock"
        inode = sock.stat().st_ino
        cmd = [sys.executable, "-m", "engine", "serve", "--repo", str(pixel_repo), "--run-dir", str(first.run_dir)]
        second = subprocess.run(
            [*cmd, "--workers", "1", "--port", str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        out = second.stdout + second.stderr
        assert second.returncode == 1, out
        assert f"is in use by pid {first.proc.pid} (appliance.lock)" in out, out
        assert "engine ready" not in out, "the second appliance must not start an engine"
        # The first is untouched: its metric files, its socket, its service.
        assert sorted(p.name for p in (first.run_dir / "metrics").iterdir()) == metrics_before
        assert sock.stat().st_ino == inode
        r = httpx.get(f"{first.url}/health", timeout=5)
        assert r.json()["status"] == "healthy", r.text

        # A second engine alone (as under a second supervisord) is refused too, naming the engine.
        engine = subprocess.run(
            [sys.executable, "-m", "engine", "engine", "--repo", str(pixel_repo), "--run-dir", str(first.run_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert engine.returncode == 2, engine.stderr
        assert f"is in use by pid {first.engine_pid()} (engine.lock)" in engine.stderr + engine.stdout
        assert sock.stat().st_ino == inode
        assert httpx.get(f"{first.url}/health/ready", timeout=5).status_code == 200
