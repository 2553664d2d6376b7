"""frontend/fastpath.py: what it answers itself, what it hands on to the route, and that the two
answer every body alike (issue 15: the hottest route without FastAPI's routing and form machinery).

The unit tests drive the ASGI middleware with a fake service (behind ImageService's interface)
and a recording inner app; the integration test sends the same bodies to ``/api/v1/predict`` (the
fast path) and ``/api/v1/models/pixels/predict`` (the FastAPI route) of a real appliance.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from frontend.fastpath import PATH, PredictFastPath
from frontend.schemas import Timings
from frontend.service import ImageRequest, ImageResult
from frontend.settings import Settings
from ipc.errors import ModelNotFound
from tests.harness import Appliance
from tests.state_models import counter_by_pid, png

BOUNDARY = b"b0undary"


def form(*parts: tuple[bytes, bytes]) -> bytes:
    """A multipart body of (Content-Disposition options, data) parts."""
    out = b"".join(b"--%s\r\nContent-Disposition: form-data; %s\r\n\r\n%s\r\n" % (BOUNDARY, d, v) for d, v in parts)
    return out + b"--%s--\r\n" % BOUNDARY


class FakeService:
    def __init__(self, served: bool = True) -> None:
        self.served = served
        self.requests: list[ImageRequest] = []

    def model(self, name: str, version: int | None = None) -> object:
        if not self.served:
            raise ModelNotFound(f"model {name!r} is not served")
        return object()

    async def predict(self, req: ImageRequest) -> ImageResult:
        self.requests.append(req)
        return ImageResult(
            req.request_id,
            req.model,
            1,
            "ssd",
            4,
            3,
            (),
            (),
            (),
            Timings(decode_ms=0, queue_ms=0, inference_ms=0, total_ms=0),
            1,
        )


class Inner:
    """The FastAPI app behind the fast path: records what reached it and the body it could read."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes | None]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        body = message.get("body") if message["type"] == "http.request" else None
        self.calls.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def run(
    body: bytes | None,
    ctype: bytes,
    service: FakeService,
    *,
    query: bytes = b"",
    path: str = PATH,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, Inner]:
    """One request through PredictFastPath; ``body`` None: the client disconnects instead."""
    inner = Inner()
    app = SimpleNamespace(state=SimpleNamespace(settings=Settings(), service=service, count_error=None))
    headers = [(b"content-type", ctype), (b"content-length", str(len(body or b"x")).encode()), *(extra or [])]
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": query,
        "headers": headers,
        "app": app,
        "state": {"request_id": "r1"},
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if body is None:
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(PredictFastPath(inner, route=None)(scope, receive, send))
    return sent[0]["status"], inner


MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY


def test_a_raw_image_and_a_lone_image_part_are_answered_without_the_route() -> None:
    service = FakeService()
    status, inner = run(b"JPEGDATA", b"image/jpeg", service)
    assert status == 200 and not inner.calls
    status, inner = run(form((b'name="image"; filename="a.jpg"', b"\x00PART\r\nDATA")), MULTIPART, service)
    assert status == 200 and not inner.calls
    assert [r.image for r in service.requests] == [b"JPEGDATA", b"\x00PART\r\nDATA"]
    assert {(r.request_id, r.version) for r in service.requests} == {("r1", None)}


@pytest.mark.parametrize(
    "body",
    [
        form((b'name="image"; filename="a.jpg"', b"A"), (b'name="confidence_threshold"', b"0.9")),  # a field
        form((b'name="image"; filename="a.jpg"', b"A"), (b'name="image"; filename="b.jpg"', b"B")),  # two files
        form((b'name="image"', b"A")),  # a text field, not a file
        form((b'name="picture"; filename="a.jpg"', b"A")),  # another name
        b"--b0undary\r\nno headers at all",  # malformed
    ],
)
def test_other_multipart_bodies_reach_the_route_whole(body: bytes) -> None:
    service = FakeService()
    status, inner = run(body, MULTIPART, service)
    assert status == 299 and inner.calls == [(PATH, body)] and not service.requests


@pytest.mark.parametrize(
    ("ctype", "kwargs"),
    [
        (b"application/json", {}),
        (b"multipart/form-data", {}),  # no boundary
        (b"image/jpeg", {"query": b"confidence_threshold=0.9"}),
        (b"image/jpeg", {"extra": [(b"content-encoding", b"gzip")]}),
        (b"image/jpeg", {"path": "/api/v1/models/pixels/predict"}),
    ],
)
def test_other_requests_reach_the_route_untouched(ctype: bytes, kwargs: dict[str, Any]) -> None:
    service = FakeService()
    status, inner = run(b"BODY", ctype, service, **kwargs)
    assert status == 299 and inner.calls == [(kwargs.get("path", PATH), b"BODY")] and not service.requests


def test_a_model_not_served_and_a_client_gone_are_the_routes_to_answer() -> None:
    status, inner = run(b"BODY", b"image/jpeg", FakeService(served=False))
    assert status == 299 and inner.calls == [(PATH, b"BODY")]  # the route's 404, before any read
    status, inner = run(None, b"image/jpeg", FakeService())
    assert status == 299 and inner.calls == [(PATH, None)]  # the disconnect, replayed to the route


# ---------------------------------------------------------------- against a real appliance
def _answer(r: httpx.Response) -> tuple[int, object]:
    body = r.json()
    if r.status_code == 200:
        body.pop("request_id")
        body.pop("timings")
        body.pop("batch_size")
        return 200, body
    return r.status_code, (body["error"], body["detail"])


def test_the_fast_path_answers_every_body_as_the_route_does(pixel_repo: Path, no_leaks: None) -> None:
    image = png((200, 40, 40))
    cases: list[dict[str, Any]] = [
        {"content": image, "headers": {"content-type": "image/png"}},
        {"files": {"image": ("a.png", image, "image/png")}},
        {"files": {"image": ("a.png", image, "image/png")}, "data": {"confidence_threshold": "0.95"}},
        {"files": {"image": ("a.png", b"not an image", "image/png")}},
        {"files": {"picture": ("a.png", image, "image/png")}},
        {"files": [("image", ("a.png", image, "image/png")), ("image", ("b.png", image, "image/png"))]},
        {"content": b"", "headers": {"content-type": "image/png"}},
        {"content": b"GIF89a broken", "headers": {"content-type": "image/gif"}},
        {"content": image, "headers": {"content-type": "text/plain"}},
        {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        {"content": b"x" * (1024 * 1024 + 1), "headers": {"content-type": "image/png"}},
    ]
    with (
        Appliance(pixel_repo, workers=2, env={"RINGSERVE_MAX_BODY_BYTES": str(1024 * 1024)}) as app,
        httpx.Client(timeout=30) as client,
    ):
        for case in cases:
            fast = client.post(f"{app.url}/api/v1/predict", **case)
            routed = client.post(f"{app.url}/api/v1/models/pixels/predict", **case)
            assert _answer(fast) == _answer(routed), case.get("headers") or list(case.get("files", []))
            assert fast.headers["x-request-id"] == fast.json()["request_id"]
        # the fast path's requests are counted under the route's own label (raw, lone part, with a field)
        ok = {"method": "POST", "status": "200"}
        assert sum(counter_by_pid(app.run_dir / "metrics", "ringserve_http_requests", route=PATH, **ok).values()) == 3
        assert not counter_by_pid(app.run_dir / "metrics", "ringserve_http_requests", route="<unmatched>", **ok)
