"""The prediction log over REST: filtered cursor pages and a streamed export (CSV or JSON lines)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.responses import Response, StreamingResponse

from frontend.errors import error_response
from frontend.jsonresp import JSONResponse
from frontend.openapi import ERRORS
from frontend.state import predquery
from frontend.state.db import StoreError
from ipc.errors import InvalidParameter

router = APIRouter(tags=["predictions"])
EXPORT_CHUNK = 1000


class PredictionPage(BaseModel):
    model_config = ConfigDict(frozen=True)
    predictions: list[dict[str, Any]]
    next_cursor: str | None


def _filter(
    since: str | None, until: str | None, model: str | None, label: str | None, min_confidence: float | None
) -> predquery.Filter:
    times: dict[str, float | None] = {}
    for name, text in (("since", since), ("until", until)):
        try:
            times[name] = None if text is None else predquery.parse_time(text)
        except ValueError:
            raise InvalidParameter(f"{name}={text!r}: seconds since the epoch or an ISO 8601 time") from None
    return predquery.Filter(times["since"], times["until"], model, label, min_confidence)


def _log_db(request: Request) -> Any:
    log = request.app.state.shared.log
    if log is None:
        return None
    return log.db


def _off(request: Request) -> Response:
    return error_response(request, 404, "prediction_log_off", "the prediction log is off (RINGSERVE_PREDICTION_LOG=1)")


def _failed(request: Request, exc: StoreError) -> Response:
    response = error_response(request, 503, "prediction_log_unavailable", str(exc))
    response.headers["Retry-After"] = "5"
    return response


_TIME = "seconds since the epoch or ISO 8601 (UTC without an offset)"


@router.get("/api/v1/predictions", response_model=PredictionPage, responses=ERRORS)
async def list_predictions(
    request: Request,
    since: str | None = Query(None, description=f"at or after this time; {_TIME}"),
    until: str | None = Query(None, description=f"before this time; {_TIME}"),
    model: str | None = Query(None, max_length=256),
    label: str | None = Query(None, max_length=256, description="with a detection (or class) of this label"),
    min_confidence: float | None = Query(
        None, ge=0, le=1, description="with a detection (of ``label``) at least this confident"
    ),
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = Query(None, max_length=32, description="``next_cursor`` of the previous page"),
) -> Response:
    """Logged predictions, newest first, ``limit`` per page."""
    db = _log_db(request)
    if db is None:
        return _off(request)
    f = _filter(since, until, model, label, min_confidence)
    before = None
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdigit()):
            raise InvalidParameter(f"cursor={cursor!r} is not a cursor of this log")
        before = int(cursor)
    try:
        rows, nxt = await db.call(predquery.page, f, before, limit, timeout=10)
    except StoreError as exc:
        return _failed(request, exc)
    return JSONResponse({"predictions": rows, "next_cursor": None if nxt is None else str(nxt)})


@router.get(
    "/api/v1/predictions/export", responses={200: {"content": {"text/csv": {}, "application/x-ndjson": {}}}, **ERRORS}
)
async def export_predictions(
    request: Request,
    format: Literal["csv", "jsonl"] = Query("jsonl"),
    since: str | None = Query(None, description=f"at or after this time; {_TIME}"),
    until: str | None = Query(None, description=f"before this time; {_TIME}"),
    model: str | None = Query(None, max_length=256),
    label: str | None = Query(None, max_length=256),
    min_confidence: float | None = Query(None, ge=0, le=1),
) -> Response:
    """Every matching logged prediction, oldest first, streamed (CSV with a header row, or JSON lines)."""
    db = _log_db(request)
    if db is None:
        return _off(request)
    f = _filter(since, until, model, label, min_confidence)
    try:
        first = await db.call(predquery.chunk, f, 0, EXPORT_CHUNK, timeout=10)
    except StoreError as exc:
        return _failed(request, exc)

    async def lines() -> AsyncIterator[bytes]:
        rows = first
        if format == "csv":
            yield _csv([list(predquery.CSV_FIELDS)])
        while rows:
            if format == "csv":
                yield _csv([predquery.csv_row(r) for r in rows])
            else:
                yield b"".join(orjson.dumps(predquery.to_dict(r)) + b"\n" for r in rows)
            if len(rows) < EXPORT_CHUNK:
                return
            rows = await db.call(predquery.chunk, f, int(rows[-1][0]), EXPORT_CHUNK, timeout=10)

    media = "text/csv" if format == "csv" else "application/x-ndjson"
    name = f"predictions.{format}"
    return StreamingResponse(
        lines(), media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
    )


def _csv(rows: list[list[object]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue().encode()
