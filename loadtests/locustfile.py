"""Locust users for every way a client can send ringserve an image.

    locust -f loadtests/locustfile.py --headless -u 16 -r 4 -t 1m --host http://127.0.0.1:8000
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    locust -f loadtests/locustfile.py --tags multipart raw ...                 # only those formats

One user class, ``ImageUser``, with one task per format, each tagged with it: ``multipart``,
``json`` (base64), ``raw`` (body), ``batch`` (``POST /api/v1/predict/batch``, multipart and JSON),
``v2`` (Open Inference Protocol, a BYTES tensor of the encoded image in the binary extension) and
``ws`` (``/ws/stream``, binary frames in, JSON answers with the frame id). Users wait for nothing
between requests (a closed loop). A format the server does not offer (no batch route, no V2, no
WebSocket) is probed once per Locust process and its tasks are dropped with a warning.

Payloads are the real test photos (tests/photos.py) re-encoded at 640x480, 1280x720 and 1920x1080
when Locust starts; request names carry the format and size, so the statistics split by both. An
answer counts as a failure unless it is a 200 holding the list of detections (or classes); when
the model is the default detector, the photo's known label (cat, person, bus, cup) must be in it.

``--model`` (env LOCUST_MODEL) names the model for V2 (default: the default detector).
"""

from __future__ import annotations

import base64
import json
import logging
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from gevent.lock import BoundedSemaphore
from locust import FastHttpUser, constant, events, tag, task
from locust.exception import StopUser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests.payloads import Payload, build  # the repository is on sys.path now

logger = logging.getLogger("ringserve.locust")  # Locust logs through the standard library

DEFAULT_MODEL = "ssd-mobilenet-v2-coco"
BOUNDARY = "ringserve-locust-5be1"
BATCH_SIZE = 4


@dataclass(frozen=True)
class Image:
    payload: Payload
    size: str  # "1280x720"
    b64: str
    multipart: bytes  # a whole multipart body with the field ``image``


def _part(field: str, p: Payload) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{p.name}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + p.jpeg
        + b"\r\n"
    )


def _images() -> list[Image]:
    return [
        Image(
            p,
            f"{p.width}x{p.height}",
            base64.b64encode(p.jpeg).decode(),
            _part("image", p) + f"--{BOUNDARY}--\r\n".encode(),
        )
        for p in build()
    ]


IMAGES = _images()  # once per Locust process, before any user starts
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        env_var="LOCUST_MODEL",
        include_in_web_ui=True,
        help="model of the V2 task (default: the default detector)",
    )


def check_items(body: dict[str, Any], items: Any, expect: str | None) -> str:
    """'' when ``items`` (one image's answer) is right, else why not."""
    if not isinstance(items, list):
        return "no list of detections or classes in the answer"
    model = body.get("model") if isinstance(body.get("model"), dict) else {"name": body.get("model_name")}
    if expect and model.get("name") == DEFAULT_MODEL and not any(d.get("label") == expect for d in items):
        return f"no {expect!r} among {sorted({d.get('label') for d in items})}"
    return ""


def check_single(content: bytes | None, expect: str | None) -> str:
    try:
        body = orjson.loads(content or b"")
    except orjson.JSONDecodeError:
        return "the answer is not JSON"
    return check_items(body, body.get("detections", body.get("classes")), expect)


# ------------------------------------------------------------------ probes (once per process)
_features: dict[tuple[str, str], Any] = {}
_probing = BoundedSemaphore()


def feature(user: Any, name: str) -> Any:
    """What the server offers, probed once per Locust process: batch, v2 (input name) and ws."""
    key = (user.host, name)
    with _probing:  # users start together: one probe, the others wait for its answer
        if key not in _features:
            _features[key] = _probe(user, name)
    return _features[key]


def _probe(user: Any, name: str) -> Any:
    import requests

    host = user.host.rstrip("/")
    value: Any = False
    try:
        if name == "batch":
            r = requests.get(f"{host}/openapi.json", timeout=10)
            value = r.status_code != 200 or "/api/v1/predict/batch" in r.json().get("paths", {})
        elif name == "v2":
            model = user.environment.parsed_options.model
            r = requests.get(f"{host}/v2/models/{model}", timeout=10)
            value = r.json()["inputs"][0]["name"] if r.status_code == 200 else False
        elif name == "ws":
            import websocket

            ws = websocket.create_connection(_ws_url(host), timeout=10)
            ws.close()
            value = True
    except Exception as exc:  # any failure means: not offered
        logger.debug("probe %s failed: %s", name, exc)
    if not value:
        logger.warning("the server at %s offers no %s: its tasks are skipped", host, name)
    return value


def _ws_url(host: str) -> str:
    return host.replace("https://", "wss://").replace("http://", "ws://") + "/ws/stream"


def needs(what: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Mark a task as needing a route the server may not have (probed by ``feature``)."""

    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn.needs = what  # type: ignore[attr-defined]
        return fn

    return mark


def _judge(response: Any, why: str) -> None:
    """Locust's verdict: a non-200 is a failure with the server's error, a wrong answer with ``why``."""
    if response.status_code != 200:
        response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
    elif why:
        response.failure(why)
    else:
        response.success()


def _stop(user: Any) -> None:
    raise StopUser()


class ImageUser(FastHttpUser):
    wait_time = constant(0)
    _next_start = 0

    def on_start(self) -> None:
        ImageUser._next_start += 7
        self._k = ImageUser._next_start  # users walk through the photos from different places
        self.ws: Any = None
        self.frame = 0
        self.model = self.environment.parsed_options.model
        offered = [t for t in self.tasks if not hasattr(t, "needs") or feature(self, t.needs)]
        if not offered:
            logger.warning("none of the selected formats is offered by %s: the user stops", self.host)
            offered = [_stop]  # StopUser from a task ends the user quietly (from on_start it logs an error)
        self.tasks = offered  # this user's own list; the class keeps every task

    def on_stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
            self.ws = None

    def _next(self) -> Image:
        self._k += 1
        return IMAGES[self._k % len(IMAGES)]

    # ----------------------------------------------------------------------- REST, one image
    def _single(self, name: str, img: Image, body: bytes, ctype: str) -> None:
        with self.client.post(
            "/api/v1/predict",
            data=body,
            headers={"Content-Type": ctype},
            name=f"{name} {img.size}",
            catch_response=True,
        ) as r:
            _judge(r, check_single(r.content, img.payload.expect) if r.status_code == 200 else "")

    @tag("multipart")
    @task(3)
    def multipart(self) -> None:
        img = self._next()
        self._single("multipart", img, img.multipart, MULTIPART)

    @tag("json")
    @task
    def json_b64(self) -> None:
        img = self._next()
        self._single("json", img, orjson.dumps({"image_b64": img.b64}), "application/json")

    @tag("raw")
    @task
    def raw(self) -> None:
        img = self._next()
        self._single("raw", img, img.payload.jpeg, "image/jpeg")

    # ------------------------------------------------------------------------------- batch
    def _batch(self, name: str, images: list[Image], body: bytes, ctype: str) -> None:
        with self.client.post(
            "/api/v1/predict/batch",
            data=body,
            headers={"Content-Type": ctype},
            name=f"{name} x{len(images)}",
            catch_response=True,
        ) as r:
            why = ""
            if r.status_code == 200:
                try:
                    answer = orjson.loads(r.content or b"")
                    results = answer.get("results", [])
                    if len(results) != len(images):
                        why = f"{len(results)} results for {len(images)} images"
                    for img, res in zip(images, results, strict=False):
                        why = (
                            why
                            or res.get("error", "")
                            or check_items(answer, res.get("detections", res.get("classes")), img.payload.expect)
                        )
                except (orjson.JSONDecodeError, AttributeError) as exc:
                    why = f"malformed batch answer: {exc}"
            _judge(r, why)

    @tag("batch")
    @needs("batch")
    @task
    def batch_multipart(self) -> None:
        images = [self._next() for _ in range(BATCH_SIZE)]
        body = b"".join(_part("images", i.payload) for i in images) + f"--{BOUNDARY}--\r\n".encode()
        self._batch("batch multipart", images, body, MULTIPART)

    @tag("batch")
    @needs("batch")
    @task
    def batch_json(self) -> None:
        images = [self._next() for _ in range(BATCH_SIZE)]
        body = orjson.dumps({"images": [{"image_b64": i.b64} for i in images]})
        self._batch("batch json", images, body, "application/json")

    # ---------------------------------------------------------------------------------- V2
    @tag("v2")
    @needs("v2")
    @task
    def v2_binary(self) -> None:
        """Open Inference Protocol: a BYTES [1] input of the encoded image, in the binary extension."""
        img = self._next()
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": feature(self, "v2"),
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": 4 + len(img.payload.jpeg)},
                    }
                ],
            }
        )
        body = header + struct.pack("<I", len(img.payload.jpeg)) + img.payload.jpeg
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
        with self.client.post(
            f"/v2/models/{self.model}/infer",
            data=body,
            headers=headers,
            name=f"v2 binary {img.size}",
            catch_response=True,
        ) as r:
            _judge(r, _check_v2(r, img.payload.expect) if r.status_code == 200 else "")

    # ---------------------------------------------------------------------------- WebSocket
    @tag("ws")
    @needs("ws")
    @task
    def ws_frame(self) -> None:
        """``/ws/stream``: one binary JPEG frame, then its JSON answer (frame ids count from 0)."""
        import websocket

        img = self._next()
        started = time.perf_counter()
        length, error = 0, None
        try:
            if self.ws is None:
                self.ws = websocket.create_connection(_ws_url(self.host.rstrip("/")), timeout=30)
                self.frame = 0
            self.ws.send_binary(img.payload.jpeg)
            text = self.ws.recv()
            length = len(text)
            answer = orjson.loads(text)
            if answer.get("frame_id") != self.frame:
                error = AssertionError(f"frame_id {answer.get('frame_id')!r}, expected {self.frame}")
            elif "error" in answer:
                error = AssertionError(f"{answer['error']}: {answer.get('detail')}")
            else:
                why = check_items(answer, answer.get("detections", answer.get("classes")), img.payload.expect)
                error = AssertionError(why) if why else None
            self.frame += 1
        except Exception as exc:  # a broken stream: a failed request, and a new stream next time
            error = exc
            self.on_stop()
        self.environment.events.request.fire(
            request_type="WS",
            name=f"ws frame {img.size}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )


def _check_v2(r: Any, expect: str | None) -> str:
    content = r.content or b""
    size = r.headers.get("Inference-Header-Content-Length")
    try:
        body = orjson.loads(content[: int(size)] if size else content)
        outputs = {o["name"]: o for o in body["outputs"]}
        out = outputs.get("detections") or outputs.get("classes")
        if out is None:
            return f"no detections or classes output among {sorted(outputs)}"
        if "data" not in out:
            return "the detections came back binary; expected JSON"
        return check_items(body, json.loads(out["data"][0]), expect)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        return f"malformed V2 answer: {exc!r}"
