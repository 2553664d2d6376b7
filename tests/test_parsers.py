"""Property tests: every parser of user input answers a typed 4xx error for any value, never a 500.

The parsers are called directly with hypothesis-generated values (path parameters, headers, query
strings, form fields, WebSocket queries, JSON bodies, image bytes); tests/test_schema.py runs
schemathesis against the live appliance, and ``test_live_parsers`` below sends generated values
to the real appliance.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.requests import Request
from starlette.websockets import WebSocket

from frontend import body, imaging, params
from frontend.routes.stream import _options
from frontend.schemas import PredictJSON
from frontend.schemas_batch import BatchEnvelope, BatchJSONItem, StreamFrameJSON
from frontend.v2 import codec, infer, models, schemas
from frontend.v2.errors import STATUS as V2_STATUS
from frontend.v2.errors import V2Error
from frontend.v2.errors import to_response as v2_response
from ipc.errors import RingserveError
from ipc.messages import InputSpec
from tests.harness import Appliance
from tests.models import write_pixel_detector

# Digits of every script, superscripts, signs, spaces, huge numbers: what str.isdigit lets through.
NUMBERISH = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=6),
    st.from_regex(r"\A[ +-]?[0-9]{0,6000}[ .e]?\Z", fullmatch=True),
    st.sampled_from(
        ["\u00b2", "\u0661", "\u0663\u0664", "0", "00", "-1", " 1", "1 ", "1e3", "9" * 5000, "", "NaN", "inf"]
    ),
)
FIELD = st.sampled_from(sorted(params.PARAM_NAMES))
TEXT_PARAMS = st.dictionaries(st.one_of(FIELD, st.text(max_size=8)), NUMBERISH, max_size=4)
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def is_client_error(exc: Exception) -> bool:
    """A typed error every protocol maps to a 4xx (V2: Triton's codes)."""
    if isinstance(exc, V2Error):
        return 400 <= exc.status < 500
    return isinstance(exc, RingserveError) and 400 <= V2_STATUS.get(type(exc), 500) < 500


@FAST
@given(NUMBERISH)
def test_ascii_int_accepts_ascii_digits_only(text: str) -> None:
    n = params.ascii_int(text)
    if text and text.isascii() and text.isdigit():
        assert n is not None and n >= 0
        if len(text.lstrip("0")) <= 18:
            assert n == int(text)
    else:
        assert n is None
    v = params.positive_version(text)
    assert v is None or v >= 1


@FAST
@given(TEXT_PARAMS)
def test_parse_params_answers_params_or_invalid_parameter(raw: dict[str, str]) -> None:
    try:
        p = params.parse_params(raw)
    except RingserveError as exc:
        assert exc.reason == "invalid_parameter" and isinstance(exc.detail, list)
        return
    assert p.confidence_threshold is None or 0 <= p.confidence_threshold <= 1
    assert p.max_detections is None or 1 <= p.max_detections <= 1000
    assert p.timeout_s is None or 0 < p.timeout_s < float("inf")


@FAST
@given(st.one_of(st.text(), st.binary().map(lambda b: b.decode("latin-1"))))
def test_b64decode_answers_bytes_or_bad_input(text: str) -> None:
    try:
        assert isinstance(params.b64decode(text), bytes)
    except RingserveError as exc:
        assert exc.reason == "bad_input"


@FAST
@given(st.binary(max_size=64), st.one_of(st.none(), NUMBERISH))
def test_v2_header_length(body_bytes: bytes, header: str | None) -> None:
    try:
        head, rest = codec.split(body_bytes, header)
    except V2Error as exc:
        assert exc.status == 400
        return
    assert len(head) + len(rest) == len(body_bytes)


_INFO = object()  # resolve hands back what the client holds


@FAST
@given(st.text(max_size=12), NUMBERISH)
def test_v2_model_and_version_paths(name: str, version: str) -> None:
    client = SimpleNamespace(models={("pixels", 1): _INFO, ("pixels", 3): _INFO}, latest={"pixels": 3})
    try:
        info = models.resolve(client, name, version)  # type: ignore[arg-type]
    except V2Error as exc:
        assert exc.status in (400, 404)
        return
    assert info is _INFO


@FAST
@given(st.one_of(st.binary(max_size=300), JSONISH.map(lambda v: json.dumps(v).encode())))
def test_json_bodies(raw: bytes) -> None:
    for model in (PredictJSON, BatchEnvelope, BatchJSONItem, StreamFrameJSON, schemas.InferRequest):
        try:
            model.model_validate_json(raw)
        except ValueError:  # pydantic's ValidationError, which every route hands to params.invalid
            pass
    try:
        schemas.parse(schemas.InferRequest, raw, "inference request")
    except RingserveError as exc:
        assert exc.reason == "invalid_parameter"


@FAST
@given(st.dictionaries(st.text(max_size=30), JSONISH, max_size=5))
def test_v2_request_parameters(raw: dict[str, Any]) -> None:
    try:
        opts = infer.options(raw, SimpleNamespace(request_timeout_s=10.0))  # type: ignore[arg-type]
    except Exception as exc:
        assert is_client_error(exc), repr(exc)
        return
    assert 0 < opts.timeout <= 10.0
    opts.params()  # always valid shared parameters


@FAST
@given(st.dictionaries(st.text(max_size=14), NUMBERISH, max_size=5))
def test_websocket_query(query: dict[str, str]) -> None:
    scope = {"type": "websocket", "query_string": urlencode(query).encode(), "headers": [], "path": "/ws/stream"}
    ws = WebSocket(scope, receive=None, send=None)  # type: ignore[arg-type]
    try:
        options = _options(ws)
    except RingserveError as exc:
        assert exc.reason == "invalid_parameter"
        return
    assert options.version is None or options.version >= 1


@FAST
@given(NUMBERISH)
def test_content_length_header(declared: str) -> None:
    async def go() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"x" * 10, "more_body": False}

        header = declared.encode("utf-8", "surrogateescape")
        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", header)], "path": "/"}
        request = Request(scope, receive)
        try:
            assert await body.read_limited(request, 1000, timeout=5) == b"x" * 10
        except RingserveError as exc:
            assert exc.reason == "too_large"

    asyncio.run(go())


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decode_any_bytes(data: st.DataObject) -> None:
    """Mutated and truncated images: pixels, or bad_input / too_large."""
    seed = data.draw(st.sampled_from([_png(), b"\xff\xd8\xff" + bytes(40), b"GIF89a", b"BM" + bytes(30)]))
    cut = data.draw(st.integers(0, len(seed)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, cut - 1)), st.integers(0, 255)), max_size=4))
    blob = bytearray(seed[:cut])
    for at, value in flips:
        if at < len(blob):
            blob[at] = value
    try:
        img, w, h = imaging.decode(bytes(blob), InputSpec(64, 64, "stretch"), 1_000_000)
    except RingserveError as exc:
        assert exc.reason in ("bad_input", "too_large"), exc
        assert "object at 0x" not in str(exc.detail)
        return
    assert img.ndim == 3 and w > 0 and h > 0


def test_v2_errors_are_4xx_with_triton_shape() -> None:
    response = v2_response(SimpleNamespace(method="GET", url=SimpleNamespace(path="/v2")), V2Error(400, "x"))  # type: ignore[arg-type]
    assert response.status_code == 400 and json.loads(bytes(response.body)) == {"error": "x"}


# --------------------------------------------------------------------------- the live appliance
def _header(value: str) -> bytes:
    """``value`` as header bytes HTTP/1.1 can carry (no controls, no outer spaces): UTF-8 stays."""
    return bytes(b for b in value.encode() if b >= 0x20 and b != 0x7F).strip()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    repo: Path = tmp_path_factory.mktemp("repo")
    write_pixel_detector(repo)
    with Appliance(repo, workers=1) as app:
        yield app


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    value=NUMBERISH.filter(lambda s: len(s) < 200),
    where=st.sampled_from(["path", "v2-path", "query", "header", "form"]),
)
@example(value="\u00b2", where="v2-path").via("the 500 of issue 13")
@example(value="\u00b2", where="header")
@example(value="\u0663", where="query")
@example(value="9" * 199, where="v2-path")
def test_live_parsers(live: Appliance, value: str, where: str) -> None:
    """Generated values in every place a user can put them: the real appliance answers 4xx or 2xx."""
    png = _png()
    with httpx.Client(base_url=live.url, timeout=30) as client:
        if where == "path":
            r = client.post(
                f"/api/v1/models/pixels/versions/{quote(value, safe='')}/predict",
                content=png,
                headers={"content-type": "image/png"},
            )
        elif where == "v2-path":
            r = client.get(f"/v2/models/pixels/versions/{quote(value, safe='')}")
        elif where == "query":
            r = client.post(
                "/api/v1/predict",
                params={"max_detections": value, "timeout_s": value},
                content=png,
                headers={"content-type": "image/png"},
            )
        elif where == "header":
            r = client.post(
                "/v2/models/pixels/infer",
                content=b'{"inputs": []}',
                headers={"Inference-Header-Content-Length": _header(value)},
            )
        else:
            r = client.post(
                "/api/v1/predict", files={"image": ("x.png", png, "image/png")}, data={"confidence_threshold": value}
            )
    assert r.status_code < 500, (where, value, r.status_code, r.text)
