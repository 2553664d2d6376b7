"""The parameters every protocol shares, and the strict parsers of user input.

``Params`` is the one declaration of ``confidence_threshold``, ``max_detections`` and ``timeout_s``:
the JSON bodies subclass it, and the OpenAPI of query strings and multipart forms is derived from
it (``query_parameters``, ``form_properties``). ``invalid`` is the one place where a Pydantic
validation error becomes the ``invalid_parameter`` error body. Every parser here answers a typed
4xx error (or ``None`` for "not a number") for any input, never an unexpected exception: the
property tests in tests/test_parsers.py hold them to that.
"""

from __future__ import annotations

import binascii
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ipc.errors import BadInput, InvalidParameter

_DATA_URL = re.compile(rb"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_SPACE = b" \t\n\r\f\v"
_MAX_DIGITS = 18  # below 2**63; longer numbers saturate (int() refuses more than 4300 digits)


class Params(BaseModel):
    """The per-image parameters of every protocol (None: the model's or the server's default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    confidence_threshold: float | None = Field(
        None, ge=0.0, le=1.0, allow_inf_nan=False, description="minimum confidence; the model's default when absent"
    )
    max_detections: int | None = Field(
        None, ge=1, le=1000, description="at most this many detections (classes); the model's default when absent"
    )
    timeout_s: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="deadline of this request, counted from its arrival; at most REQUEST_TIMEOUT_S",
    )


PARAM_NAMES = frozenset(Params.model_fields)


def validation_detail(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, object]]:
    """Pydantic's (or FastAPI's) error list as the ``detail`` of an ``invalid_parameter`` body."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in errors]


def invalid(exc: ValidationError | Iterable[Mapping[str, Any]]) -> InvalidParameter:
    """The ``invalid_parameter`` error of a validation failure (Pydantic's, or FastAPI's error list)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    return InvalidParameter(validation_detail(errors))  # type: ignore[arg-type]


def parse_params(raw: Mapping[str, object]) -> Params:
    """Parameters from text fields (query string, form, WebSocket query); empty values are absent."""
    try:
        return Params.model_validate({k: v for k, v in raw.items() if v != ""})
    except ValidationError as exc:
        raise invalid(exc) from None


def merge(defaults: Params, given: Params) -> Params:
    """``given``'s set values over ``defaults`` (a JSON item over the request's query string).

    ``given`` may be a subclass (a JSON body): only the shared fields are taken.
    """
    return defaults.model_copy(update=given.model_dump(include=set(PARAM_NAMES), exclude_none=True))


def check_names(given: Iterable[str], allowed: Iterable[str], what: str) -> None:
    unknown = set(given) - set(allowed)
    if unknown:
        raise InvalidParameter(f"unknown {what}: {sorted(unknown)}")


def b64decode(text: str, what: str = "image_b64") -> bytes:
    """Strict base64, but line breaks and a ``data:image/...;base64,`` prefix are accepted."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid base64") from None
    # C all the way (20 MB in about 70 ms, on the event loop): base64.b64decode(validate=True) checks
    # with a regular expression, 3x slower.
    raw = _DATA_URL.sub(b"", raw, count=1).translate(None, _SPACE)
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{what} is not valid base64") from None


def ascii_int(text: str | None) -> int | None:
    """A non-negative integer written in ASCII digits only, else None.

    ``str.isdigit`` accepts digits that ``int`` refuses ("²") or reads as another script's (Arabic-Indic);
    an absurdly long number saturates instead of raising (``int`` stops at 4300 digits).
    """
    if text is None or not text or not text.isascii() or not text.isdigit():
        return None
    digits = text.lstrip("0") or "0"
    return sys.maxsize if len(digits) > _MAX_DIGITS else int(digits)


def positive_version(text: str | None) -> int | None:
    """A model version (1, 2, ...) from a path or query, else None."""
    n = ascii_int(text)
    return n if n is not None and 1 <= n < sys.maxsize else None


def query_parameters() -> list[dict[str, Any]]:
    """The OpenAPI ``parameters`` of the shared fields sent in a query string."""
    return [
        {"name": name, "in": "query", "required": False, "schema": schema} for name, schema in form_properties().items()
    ]


def form_properties() -> dict[str, dict[str, Any]]:
    """The JSON schema of each shared field as a plain (non-null) value, for forms and queries."""
    props: dict[str, dict[str, Any]] = Params.model_json_schema()["properties"]
    out = {}
    for name, prop in props.items():
        schema: dict[str, Any] = next((s for s in prop.get("anyOf", [prop]) if s.get("type") != "null"), {})
        out[name] = {**schema, **({"description": prop["description"]} if "description" in prop else {})}
    return out
