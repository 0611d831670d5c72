"""Ratings files as events: MovieLens ``ratings.dat``, ML-100K ``u.data``, CSV and JSON lines.

Every line becomes an event validated by the same contract as a Kafka record
(:mod:`ncf_stream.events`), or a :class:`BadLine` with its line number and
reason. Nothing is dropped silently. Events come back in timestamp order, ties
in file order, which is the order a producer should publish them in.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ncf_stream.errors import BadInput
from ncf_stream.events import Events, Rejection, validate_object

FORMATS = ("movielens", "ml100k", "csv", "jsonl")
_BY_SUFFIX = {".dat": "movielens", ".data": "ml100k", ".csv": "csv", ".jsonl": "jsonl",
              ".ndjson": "jsonl", ".json": "jsonl"}
# CSV header names accepted for each field, lower-cased.
_CSV_COLUMNS = {
    "user": ("user", "userid", "user_id"),
    "item": ("item", "movieid", "itemid", "item_id", "movie_id"),
    "ts": ("ts", "timestamp", "time"),
    "weight": ("weight", "rating"),
    "type": ("type",),
}

Row = tuple[str, str, float, str, float]  # (user, item, ts, type, weight)


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int  # 1-based line number in the file
    reason: str


@dataclass(frozen=True)
class ReadResult:
    events: Events  # valid events in timestamp order, ties in file order
    lines: np.ndarray  # (n,) int64: the line each event came from
    bad_lines: list[BadLine]


def detect_format(path: str | Path) -> str:
    fmt = _BY_SUFFIX.get(Path(path).suffix.lower())
    if fmt is None:
        raise BadInput(
            f"cannot tell the format of {path}; pass --format one of {', '.join(FORMATS)}")
    return fmt


def read_events(
    path: str | Path,
    fmt: str | None = None,
    *,
    limit: int | None = None,
    on_bad_line: Callable[[BadLine], None] | None = None,
) -> ReadResult:
    """Read a whole ratings file; ``limit`` keeps the first N in timestamp order."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows: list[Row] = []
    lines: list[int] = []
    bad: list[BadLine] = []
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        for lineno, parsed in _PARSERS[fmt](f):
            if isinstance(parsed, str):
                bad_line = BadLine(lineno, parsed)
                bad.append(bad_line)
                if on_bad_line is not None:
                    on_bad_line(bad_line)
            else:
                rows.append(parsed)
                lines.append(lineno)
    events = Events.from_rows(rows)
    order = np.argsort(events.ts, kind="stable")[:limit]
    return ReadResult(events.take(order), np.asarray(lines, dtype=np.int64)[order], bad)


def iter_raw_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Non-empty lines as bytes, untouched and in file order (for replaying captured streams)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield lineno, line


_Parsed = Iterator[tuple[int, Row | str]]


def _delimited(f: io.TextIOBase, sep: str | None, event_type: str) -> _Parsed:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        parts = line.rstrip("\r\n").split(sep)
        if len(parts) != 4:
            yield lineno, f"expected 4 fields (user, item, rating, timestamp), found {len(parts)}"
            continue
        obj = {"user": parts[0].strip(), "item": parts[1].strip(), "weight": parts[2].strip(),
               "ts": parts[3].strip(), "type": event_type}
        yield lineno, _validate_text_fields(obj)


def _movielens(f: io.TextIOBase) -> _Parsed:
    return _delimited(f, "::", "rating")


def _ml100k(f: io.TextIOBase) -> _Parsed:
    return _delimited(f, None, "rating")


def _csv(f: io.TextIOBase) -> _Parsed:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        return
    columns = _csv_columns(header)
    # MovieLens' CSV calls its weight "rating": keep that as the event type.
    rated = "weight" in columns and header[columns["weight"]].strip().lower() == "rating"
    for fields in reader:
        lineno = reader.line_num
        if not fields or not any(x.strip() for x in fields):
            continue
        if len(fields) != len(header):
            yield lineno, f"expected {len(header)} fields as in the header, found {len(fields)}"
            continue
        obj = {name: fields[col].strip() for name, col in columns.items()}
        if rated and "type" not in obj:
            obj["type"] = "rating"
        yield lineno, _validate_text_fields(obj)


def _csv_columns(header: list[str]) -> dict[str, int]:
    lowered = [h.strip().lower() for h in header]
    columns = {}
    for field, names in _CSV_COLUMNS.items():
        for i, h in enumerate(lowered):
            if h in names:
                columns[field] = i
                break
    missing = [f for f in ("user", "item", "ts") if f not in columns]
    if missing:
        raise BadInput(
            f"CSV header {header} lacks a column for {', '.join(missing)} "
            "(expected userId,movieId,rating,timestamp or user,item,ts)"
        )
    return columns


def _jsonl(f: io.TextIOBase) -> _Parsed:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            yield lineno, f"not_json: {e}"
            continue
        if not isinstance(obj, dict):
            yield lineno, "not_object: a line must hold one JSON object"
            continue
        yield lineno, _as_row(validate_object(obj))


def _validate_text_fields(obj: dict[str, str]) -> Row | str:
    """Text columns to typed fields, then the event contract's checks."""
    typed: dict[str, object] = {"user": obj["user"], "item": obj["item"]}
    if obj.get("type"):
        typed["type"] = obj["type"]
    for name in ("ts", "weight"):
        text = obj.get(name, "")
        if not text:
            if name == "ts":
                return "missing_field: empty timestamp"
            continue
        try:
            typed[name] = float(text)
        except ValueError:
            return f"wrong_type: {name} {text[:40]!r} is not a number"
    return _as_row(validate_object(typed))


def _as_row(result: Row | Rejection) -> Row | str:
    if isinstance(result, Rejection):
        return f"{result.reason.value}: {result.detail}"
    return result


_PARSERS: dict[str, Callable[[io.TextIOBase], _Parsed]] = {
    "movielens": _movielens,
    "ml100k": _ml100k,
    "csv": _csv,
    "jsonl": _jsonl,
}
