"""API key, CORS, and the file modes of the engine socket, its run directory and the ring segments."""

from __future__ import annotations

import asyncio
import hmac
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from frontend import middleware
from ipc.shm import pid_alive
from tests.harness import ROOT, Appliance, free_port, segments
from tests.models import write_pixel_detector
from tests.test_appliance import png

KEY = "s3cret-key-for-tests"
ORIGIN = "http://a.example"
PNG = {"content": png((200, 100, 50)), "headers": {"content-type": "image/png"}}


def _no_leaks_after(before: set[str]) -> None:
    left = sorted(s for s in segments() - before if not pid_alive(int(s.split("-")[2])))
    assert not left, f"segments left in /dev/shm: {left}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("security") / "repo"
    write_pixel_detector(path)
    return path


@pytest.fixture(scope="module")
def keyed(repo: Path) -> Iterator[Appliance]:
    """An API key and one allowed CORS origin. Its run directory starts out too open (0755), to show
    that the appliance makes it private. (The defaults, no CORS at all, are checked on every case of
    tests/test_hostile.py.)"""
    before = segments()
    env = {"RINGSERVE_API_KEY": KEY, "RINGSERVE_CORS_ORIGINS": f'["{ORIGIN}"]'}
    app = Appliance(repo, workers=1, env=env)
    os.chmod(app.run_dir, 0o755)
    with app:
        yield app
    _no_leaks_after(before)


def predict(app: Appliance, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{app.url}/api/v1/predict", content=PNG["content"], headers={**PNG["headers"], **headers}, timeout=10
    )


# ----------------------------------------------------------------------------- API key
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY[:-1]},
        {"X-API-Key": KEY + "x"},
        {"X-API-Key": ""},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": KEY},
    ],
    ids=["none", "wrong", "prefix", "longer", "empty", "basic", "empty-bearer", "bearer-longer", "no-scheme"],
)
def test_a_missing_or_wrong_key_is_401_json(keyed: Appliance, headers: dict[str, str]) -> None:
    r = predict(keyed, **headers)
    assert r.status_code == 401, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "request_id"} and body["error"] == "unauthorized"
    assert body["request_id"] == r.headers["x-request-id"]
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers.get("connection") == "close"  # refused before its body was read


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}],
    ids=["x-api-key", "bearer", "lowercase"],
)
def test_the_right_key_is_served(keyed: Appliance, headers: dict[str, str]) -> None:
    r = predict(keyed, **headers)
    assert r.status_code == 200, r.text
    assert r.json()["detections"]


def test_every_api_route_needs_the_key_but_health_does_not(keyed: Appliance) -> None:
    for path in (
        "/api/v1/models",
        "/api/v1/models/pixels",
        "/openapi.json",
        "/docs",
        "/v2/models/pixels",
        "/health/../api/v1/models",
        "/health%2F..%2Fapi/v1/models",
        "/healthy",
    ):
        r = httpx.get(f"{keyed.url}{path}", timeout=10)
        assert r.status_code == 401, (path, r.status_code)
        r = httpx.get(f"{keyed.url}{path}", headers={"X-API-Key": KEY}, timeout=10)
        assert r.status_code != 401, path
    for path in ("/health", "/health/live", "/health/ready", "/v2/health/live", "/metrics"):
        r = httpx.get(f"{keyed.url}{path}", timeout=10)
        assert r.status_code == 200, (path, r.status_code)


def test_websocket_needs_the_key(keyed: Appliance) -> None:
    url = f"ws://127.0.0.1:{keyed.port}/ws/stream"

    async def handshake(headers: dict[str, str] | None) -> tuple[int, bytes]:
        try:
            async with connect(url, additional_headers=headers, proxy=None, open_timeout=10) as ws:
                await ws.send(png((1, 2, 3)))
                assert "detections" in await asyncio.wait_for(ws.recv(), 10)
                return 101, b""
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.body or b""

    code, body = asyncio.run(handshake(None))
    assert code == 401 and b'"unauthorized"' in body, (code, body)
    code, _ = asyncio.run(handshake({"X-API-Key": "wrong"}))
    assert code == 401
    code, _ = asyncio.run(handshake({"X-API-Key": KEY}))
    assert code == 101


def test_the_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware compares with hmac.compare_digest, never ==."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)

    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = middleware.RequestContext(Starlette(routes=[Route("/x", ok)]), api_key=KEY)

    async def ask() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return [(await client.get("/x", headers={"X-API-Key": k})).status_code for k in ("nope", KEY)]

    assert asyncio.run(ask()) == [401, 200]
    assert calls == [(b"nope", KEY.encode()), (KEY.encode(), KEY.encode())]


# ----------------------------------------------------------------------------- CORS
def preflight(app: Appliance, origin: str) -> httpx.Response:
    return httpx.options(
        f"{app.url}/api/v1/predict",
        timeout=10,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, content-type",
        },
    )


def test_cors_preflight_works_for_the_configured_origin_only(keyed: Appliance) -> None:
    r = preflight(keyed, ORIGIN)  # browsers send no key with a preflight: it must not need one
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
    assert "POST" in r.headers["access-control-allow-methods"]
    other = preflight(keyed, "http://b.example")
    assert other.status_code >= 400
    assert "access-control-allow-origin" not in other.headers
    r = predict(keyed, **{"X-API-Key": KEY, "Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    # A cross-site POST is not only unreadable for the page: it is refused (tests/test_origin.py).
    r = predict(keyed, **{"X-API-Key": KEY, "Origin": "http://b.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


# ----------------------------------------------------------------------------- files
def test_socket_run_dir_and_segments_are_private(keyed: Appliance) -> None:
    uid = os.getuid()
    run = os.lstat(keyed.run_dir)
    assert stat.S_ISDIR(run.st_mode) and run.st_uid == uid
    assert stat.S_IMODE(run.st_mode) == 0o700, oct(run.st_mode)
    sock = os.lstat(keyed.run_dir / "engine.sock")
    assert stat.S_ISSOCK(sock.st_mode) and sock.st_uid == uid
    assert stat.S_IMODE(sock.st_mode) == 0o600, oct(sock.st_mode)
    ours = {str(p.pid) for p in keyed.tree()}  # one worker: uvicorn serves in its own process
    rings = [Path("/dev/shm", s) for s in segments() if s.split("-")[2] in ours]
    assert rings, "the worker has no ring"
    for path in rings:
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == uid
        assert stat.S_IMODE(st.st_mode) == 0o600, (path, oct(st.st_mode))
    for path in keyed.run_dir.rglob("*"):  # the metrics files too: nothing writable by others
        assert not os.lstat(path).st_mode & 0o022, path


def test_a_run_dir_that_is_a_symlink_is_refused(tmp_path: Path, repo: Path) -> None:
    target = tmp_path / "someone-elses"
    target.mkdir(mode=0o777)
    link = tmp_path / "run"
    link.symlink_to(target)
    cmd = [
        sys.executable,
        "-m",
        "engine",
        "serve",
        "--repo",
        str(repo),
        "--run-dir",
        str(link),
        "--workers",
        "1",
        "--port",
        str(free_port()),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert b"is not a directory owned by uid" in proc.stderr + proc.stdout
    assert not (target / "engine.sock").exists() and not any(target.iterdir())
