"""Issue 14, point 8: cross-site use from a browser on the LAN, without an API key (the default).

A cross-site page can open a WebSocket to the appliance and POST to it; a DNS-rebinding name can
make the browser treat the appliance as same-site. Origin is checked on WebSocket handshakes and
unsafe methods; RINGSERVE_ALLOWED_HOSTS refuses unknown Host headers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.harness import Appliance
from tests.test_appliance import png

ALLOWED = "http://console.example"
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    from tests.models import write_pixel_detector

    repo = tmp_path_factory.mktemp("origin") / "repo"
    write_pixel_detector(repo)
    env = {"RINGSERVE_CORS_ORIGINS": f'["{ALLOWED}"]', "RINGSERVE_ALLOWED_HOSTS": '["127.0.0.1", "appliance.lan"]'}
    with Appliance(repo, workers=1, env=env) as running:
        yield running


def post(app: Appliance, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{app.url}/api/v1/predict",
        content=png((200, 100, 50)),
        headers={"content-type": "image/png", **headers},
        timeout=10,
    )


def handshake(app: Appliance, headers: dict[str, str]) -> tuple[int, bytes]:
    async def go() -> tuple[int, bytes]:
        url = f"ws://127.0.0.1:{app.port}/ws/stream"
        try:
            async with connect(url, additional_headers=headers, proxy=None, open_timeout=10) as ws:
                await ws.send(png((1, 2, 3)))
                assert "detections" in await asyncio.wait_for(ws.recv(), 10)
                return 101, b""
        except InvalidStatus as exc:
            return exc.response.status_code, exc.response.body or b""

    return asyncio.run(go())


def test_cross_site_post_is_refused(app: Appliance) -> None:
    r = post(app, Origin=EVIL)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "forbidden_origin" and set(r.json()) == {"error", "detail", "request_id"}
    assert "null" in post(app, Origin="null").json()["detail"]  # sandboxed frames, file:// pages
    assert post(app, Origin=ALLOWED).status_code == 200  # the CORS origin
    assert post(app, Origin=f"http://127.0.0.1:{app.port}").status_code == 200  # the console itself
    assert post(app).status_code == 200  # no browser, no Origin: curl, SDKs
    assert httpx.get(f"{app.url}/api/v1/models", headers={"Origin": EVIL}, timeout=5).status_code == 200


def test_cross_site_websocket_is_refused(app: Appliance) -> None:
    code, body = handshake(app, {"Origin": EVIL})
    assert code == 403 and b'"forbidden_origin"' in body, (code, body)
    assert handshake(app, {"Origin": ALLOWED})[0] == 101
    assert handshake(app, {"Origin": f"http://127.0.0.1:{app.port}"})[0] == 101


def test_unknown_host_is_refused(app: Appliance) -> None:
    r = httpx.get(f"{app.url}/api/v1/models", headers={"Host": "rebound.evil.example"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "invalid_host", r.text
    ok = httpx.get(f"{app.url}/api/v1/models", headers={"Host": f"appliance.lan:{app.port}"}, timeout=5)
    assert ok.status_code == 200
    code, _ = handshake(app, {"Host": "rebound.evil.example"})
    assert code == 400
