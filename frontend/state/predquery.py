"""Reading the prediction log: filters, cursor pages (newest first), export chunks (oldest first)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

_COLUMNS = "id, request_id, at, client, route, model, version, task, width, height, cached, batch_size, timings, labels"
CSV_FIELDS = (
    "id",
    "time",
    "request_id",
    "client",
    "route",
    "model",
    "version",
    "width",
    "height",
    "cached",
    "batch_size",
    "decode_ms",
    "queue_ms",
    "inference_ms",
    "total_ms",
    "results",
)


@dataclass(frozen=True)
class Filter:
    since: float | None = None  # seconds since the epoch
    until: float | None = None
    model: str | None = None
    label: str | None = None
    min_confidence: float | None = None

    def where(self) -> tuple[str, list[object]]:
        clauses: list[str] = []
        args: list[object] = []
        if self.since is not None:
            clauses.append("at >= ?")
            args.append(self.since)
        if self.until is not None:
            clauses.append("at < ?")
            args.append(self.until)
        if self.model is not None:
            clauses.append("model = ?")
            args.append(self.model)
        if self.label is not None or self.min_confidence is not None:
            inner = ["1"]
            if self.label is not None:
                inner.append("json_extract(j.value, '$.label') = ?")
                args.append(self.label)
            if self.min_confidence is not None:
                inner.append("json_extract(j.value, '$.confidence') >= ?")
                args.append(self.min_confidence)
            clauses.append(f"EXISTS (SELECT 1 FROM json_each(prediction.labels) AS j WHERE {' AND '.join(inner)})")
        return (" AND ".join(clauses) or "1"), args


def page(
    conn: sqlite3.Connection, f: Filter, before: int | None, limit: int
) -> tuple[list[dict[str, object]], int | None]:
    """Up to ``limit`` entries older than the cursor ``before`` (an id), and the next cursor."""
    where, args = f.where()
    if before is not None:
        where += " AND id < ?"
        args.append(before)
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM prediction WHERE {where} ORDER BY id DESC LIMIT ?", [*args, limit + 1]
    ).fetchall()
    more = len(rows) > limit
    rows = rows[:limit]
    return [to_dict(r) for r in rows], (int(rows[-1][0]) if more and rows else None)


def chunk(conn: sqlite3.Connection, f: Filter, after: int, limit: int) -> list[tuple[object, ...]]:
    where, args = f.where()
    return conn.execute(
        f"SELECT {_COLUMNS} FROM prediction WHERE {where} AND id > ? ORDER BY id LIMIT ?", [*args, after, limit]
    ).fetchall()


def to_dict(row: tuple[object, ...]) -> dict[str, object]:
    pid, request_id, at, client, route, model, version, task, width, height, cached, batch_size, timings, labels = row
    items = orjson.loads(labels)  # type: ignore[arg-type]
    return {
        "id": pid,
        "time": iso(float(at)),  # type: ignore[arg-type]
        "request_id": request_id,
        "client": client,
        "route": route,
        "model": {"name": model, "version": version},
        "image": {"width": width, "height": height},
        "cached": bool(cached),
        "batch_size": batch_size,
        "timings": orjson.loads(timings),  # type: ignore[arg-type]
        ("detections" if task in ("ssd", "yolo") else "classes"): items,
    }


def csv_row(row: tuple[object, ...]) -> list[object]:
    pid, request_id, at, client, route, model, version, _task, width, height, cached, batch_size, timings, labels = row
    t = orjson.loads(timings)  # type: ignore[arg-type]
    return [
        pid,
        iso(float(at)),  # type: ignore[arg-type]
        request_id,
        client,
        route,
        model,
        version,
        width,
        height,
        int(bool(cached)),
        batch_size,
        t["decode_ms"],
        t["queue_ms"],
        t["inference_ms"],
        t["total_ms"],
        labels,
    ]


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """Seconds since the epoch, or an ISO 8601 time (UTC when it has no offset); ValueError otherwise."""
    text = text.strip()
    if text.isascii() and text.replace(".", "", 1).isdigit():
        return float(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
