"""The packages' boundaries, as imports: each checked in a fresh interpreter.

frontend never imports onnxruntime, engine never imports fastapi, ipc imports neither; the launcher
(``ringserve serve``, a supervisor that lives as long as the appliance) needs no numpy and no ONNX
Runtime, and a worker with the gRPC endpoint off loads no gRPC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.harness import ROOT

CASES = {
    "frontend": (["frontend.app", "frontend.service"], ["onnxruntime", "onnx"]),
    "engine": (["engine.server", "engine.lifecycle", "engine.batcher"], ["fastapi", "starlette", "uvicorn"]),
    "ipc": (["ipc.ring", "ipc.shm", "ipc.messages", "ipc.sockets", "ipc.metrics_dir"], ["onnxruntime", "fastapi"]),
    "launcher": (["engine.cli", "engine.launcher", "engine.frontend_cmd"], ["onnxruntime", "numpy", "fastapi"]),
    "worker without gRPC": (["frontend.app"], ["grpc", "tritonclient", "google.protobuf"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_package_does_not_import_what_it_must_not(case: str) -> None:
    modules, banned = CASES[case]
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {banned!r} if m in sys.modules)))\n"
    )
    env = {**os.environ, "RINGSERVE_GRPC_PORT": "0"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [], f"{case} imports {done.stdout.strip()}"
