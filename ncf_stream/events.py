"""The event contract: decode and validate raw Kafka values into columnar arrays.

An event is a UTF-8 JSON object (ARCHITECTURE.md, "Event"):

    {"user": "42", "item": "1193", "ts": 978300760.0, "type": "rating", "weight": 5.0}

``user`` and ``item`` are required (a string, or an integer meaning its decimal
string; 1 to 256 UTF-8 bytes). ``ts`` is seconds since the epoch and falls back
to the record's own timestamp. ``type`` (default ``"interaction"``) and
``weight`` (finite, default 1.0) are kept. Unknown fields are ignored so that
producers can add fields without breaking consumers.

Two types are not interactions but **availability** events for the catalogue:
``{"item": "1193", "type": "item_unavailable"}`` and ``"item_available"``.
They need only ``item`` (``user`` and ``ts`` are ignored: an item's
availability belongs to no user). :func:`decode_batch` hands them apart, in
stream order (:class:`Availability`), so they never reach id mapping, the
store or training, and the event filter (``event_types``, ``min_weight``),
which chooses interactions to train on, does not apply to them.

Two more are **deletions** (forgetting, docs/operations.md):
``{"user": "42", "type": "delete_user"}`` and ``{"item": "1193", "type": "delete_item"}``
need only the id they name. They are handed apart too (:class:`Deletions`), each
with its place among the batch's interactions, because unlike availability their
order against interactions matters: a ``delete_user`` followed by events of the
same id starts a new user. They never train and the filter never drops them.

Everything else is rejected with a :class:`Reason` and a human-readable detail;
:func:`decode_batch` never raises for bad input, so one bad record can never
stop the daemon.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import orjson

from ncf_stream.settings import default

MAX_ID_BYTES = 256
MAX_TYPE_BYTES = 64
DEFAULT_MAX_RECORD_BYTES: int = default("max_record_bytes")
DEFAULT_TYPE = "interaction"
# Event types that set an item's availability instead of recording an interaction:
# the type -> the availability it sets.
AVAILABILITY_TYPES = {"item_unavailable": False, "item_available": True}
# Event types that delete a user or an item: the type -> the field naming the entity.
DELETE_TYPES = {"delete_user": "user", "delete_item": "item"}


class Reason(StrEnum):
    """Why a record was rejected; the value is the dead-letter header and metric label."""

    EMPTY_VALUE = "empty_value"
    OVERSIZE_RECORD = "oversize_record"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    NON_FINITE = "non_finite"
    EMPTY_ID = "empty_id"
    OVERSIZE_ID = "oversize_id"
    BAD_EVENT_TYPE = "bad_event_type"
    INVALID_UNICODE = "invalid_unicode"
    # A whole offset range: a batch the client could not decode, skipped by choice
    # (the dead_letter_undecodable setting). One dead letter names the range.
    UNDECODABLE_BATCH = "undecodable_batch"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record that is not an event: its position in the batch and why."""

    index: int
    reason: Reason
    detail: str


class _Reject(Exception):
    """Internal: carries a reason out of the field checks."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class EventFilter:
    """Which valid events to train on; the others are counted as skipped, not bad."""

    types: frozenset[str] | None = None  # keep only these event types; None keeps all
    min_weight: float | None = None  # keep only events with weight >= this

    def keeps(self, event_type: str, weight: float) -> bool:
        if self.types is not None and event_type not in self.types:
            return False
        return self.min_weight is None or weight >= self.min_weight


@dataclass(frozen=True)
class Events:
    """Valid events, columnar. All arrays have the same length."""

    users: np.ndarray  # (n,) object: external user ids (str)
    items: np.ndarray  # (n,) object: external item ids (str)
    ts: np.ndarray  # (n,) float64: seconds since the epoch
    weights: np.ndarray  # (n,) float64
    types: np.ndarray  # (n,) object: event type (str)

    def __len__(self) -> int:
        return len(self.users)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, str, float, str, float]]) -> Events:
        """Build from (user, item, ts, type, weight) tuples."""
        users = np.empty(len(rows), dtype=object)
        items = np.empty(len(rows), dtype=object)
        types = np.empty(len(rows), dtype=object)
        users[:] = [r[0] for r in rows]
        items[:] = [r[1] for r in rows]
        types[:] = [r[3] for r in rows]
        ts = np.fromiter((r[2] for r in rows), dtype=np.float64, count=len(rows))
        weights = np.fromiter((r[4] for r in rows), dtype=np.float64, count=len(rows))
        return cls(users, items, ts, weights, types)

    def take(self, index: np.ndarray) -> Events:
        return Events(
            self.users[index], self.items[index], self.ts[index],
            self.weights[index], self.types[index],
        )


@dataclass(frozen=True)
class Availability:
    """Availability events in stream order: item ``items[j]`` became ``available[j]``.

    Order matters only among events of one item (the last one wins), and it is kept."""

    items: np.ndarray  # (n,) object: external item ids (str)
    available: np.ndarray  # (n,) bool
    # (n,) int64: deletions of the same batch before each (Deletions): a delete_item and
    # an availability event of one item take effect in their order.
    after: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, bool]],
                  after: Sequence[int] | None = None) -> Availability:
        items = np.empty(len(rows), dtype=object)
        items[:] = [r[0] for r in rows]
        return cls(items, np.array([r[1] for r in rows], dtype=bool),
                   np.zeros(len(rows), np.int64) if after is None
                   else np.asarray(after, dtype=np.int64))

    @classmethod
    def empty(cls) -> Availability:
        return cls.from_rows([])

    def take(self, index: np.ndarray) -> Availability:
        return Availability(self.items[index], self.available[index], self.after[index])


@dataclass(frozen=True)
class Deletions:
    """Deletion events in stream order: forget ``kinds[j]`` ("user" or "item") ``ids[j]``
    after the first ``at[j]`` interactions of the same batch (the batch's ``events``)."""

    kinds: np.ndarray  # (n,) object: "user" or "item"
    ids: np.ndarray  # (n,) object: external ids (str)
    at: np.ndarray  # (n,) int64, non-decreasing: interactions of the batch before it

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, str, int]]) -> Deletions:
        kinds = np.empty(len(rows), dtype=object)
        ids = np.empty(len(rows), dtype=object)
        kinds[:] = [r[0] for r in rows]
        ids[:] = [r[1] for r in rows]
        return cls(kinds, ids, np.array([r[2] for r in rows], dtype=np.int64))

    @classmethod
    def empty(cls) -> Deletions:
        return cls.from_rows([])

    def take(self, index: np.ndarray) -> Deletions:
        return Deletions(self.kinds[index], self.ids[index], np.zeros(len(index), np.int64))


def segments(events: Events, deletions: Deletions) -> list[tuple[Events, Deletions]]:
    """A batch in stream order: runs of interactions, each followed by the deletions
    that came after it (``Deletions.at``). Whoever keeps id maps (the engine, a source
    that maps rows ahead of it) applies a batch this way, so the maps stay equal."""
    if not len(deletions):
        return [(events, deletions)]
    parts: list[tuple[Events, Deletions]] = []
    lo = start = 0
    for end in np.r_[np.flatnonzero(np.diff(deletions.at)) + 1, len(deletions)].tolist():
        at = int(deletions.at[start])
        sel = np.arange(start, end)
        parts.append((events.take(np.arange(lo, at)),
                      Deletions(deletions.kinds[sel], deletions.ids[sel], deletions.at[sel])))
        lo, start = at, end
    if lo < len(events):
        parts.append((events.take(np.arange(lo, len(events))), Deletions.empty()))
    return parts


@dataclass(frozen=True)
class DecodeResult:
    """The outcome of decoding one batch of raw values."""

    events: Events  # the valid events that pass the filter, in input order
    index: np.ndarray  # (n,) int64: position of each event in the input
    rejected: list[Rejection]  # the invalid records, in input order
    skipped: np.ndarray  # int64: positions of valid events the filter dropped
    availability: Availability = field(default_factory=Availability.empty)
    deletions: Deletions = field(default_factory=Deletions.empty)


def decode_batch(
    values: Sequence[bytes | None],
    timestamps: Sequence[float | None] | None = None,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    event_filter: EventFilter | None = None,
) -> DecodeResult:
    """Decode raw values; ``timestamps`` (seconds) stand in for a missing ``ts``.

    Never raises for bad input: every record is either an event, a rejection
    with its reason, or skipped by ``event_filter``.
    """
    rows: list[tuple[str, str, float, str, float]] = []
    index: list[int] = []
    skipped: list[int] = []
    rejected: list[Rejection] = []
    availability: list[tuple[str, bool]] = []
    after: list[int] = []
    deletions: list[tuple[str, str, int]] = []
    for i, value in enumerate(values):
        fallback = None if timestamps is None else timestamps[i]
        try:
            row = _record(value, fallback, max_record_bytes=max_record_bytes)
        except _Reject as r:
            rejected.append(Rejection(i, r.reason, r.detail))
            continue
        if len(row) == 3:  # a deletion: in its place among the interactions
            deletions.append((row[0], row[1], len(rows)))
            continue
        if len(row) == 2:  # an availability event: not an interaction, never filtered
            availability.append(row)
            after.append(len(deletions))
            continue
        if event_filter is not None and not event_filter.keeps(row[3], row[4]):
            skipped.append(i)
            continue
        rows.append(row)
        index.append(i)
    return DecodeResult(
        Events.from_rows(rows),
        np.asarray(index, dtype=np.int64),
        rejected,
        np.asarray(skipped, dtype=np.int64),
        Availability.from_rows(availability, after),
        Deletions.from_rows(deletions),
    )


def decode_one(
    value: bytes | None,
    fallback_ts: float | None = None,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[str, str, float, str, float] | Rejection:
    """Decode a single value to (user, item, ts, type, weight) or a Rejection."""
    try:
        return _decode(value, fallback_ts, max_record_bytes=max_record_bytes)
    except _Reject as r:
        return Rejection(0, r.reason, r.detail)


def validate_object(
    obj: dict[str, Any], fallback_ts: float | None = None
) -> tuple[str, str, float, str, float] | Rejection:
    """Validate an already parsed event object (file readers use this)."""
    try:
        return _fields(obj, fallback_ts)
    except _Reject as r:
        return Rejection(0, r.reason, r.detail)


def _decode(
    value: bytes | None, fallback_ts: float | None, *, max_record_bytes: int
) -> tuple[str, str, float, str, float]:
    return _fields(_parse(value, max_record_bytes), fallback_ts)


def _record(
    value: bytes | None, fallback_ts: float | None, *, max_record_bytes: int
) -> (tuple[str, str, float, str, float] | tuple[str, bool]
      | tuple[str, str, None]):
    """An interaction row, (item, available) for an availability event, or
    (kind, id, None) for a deletion."""
    obj = _parse(value, max_record_bytes)
    kind = obj.get("type")  # may be any JSON value: only a string can name one
    entity = DELETE_TYPES.get(kind) if isinstance(kind, str) else None
    if entity is not None:
        return entity, _id_field(obj, entity), None
    available = AVAILABILITY_TYPES.get(kind) if isinstance(kind, str) else None
    if available is None:
        return _fields(obj, fallback_ts)
    return _id_field(obj, "item"), available


def _fields(obj: dict[str, Any], fallback_ts: float | None) -> tuple[str, str, float, str, float]:
    user = _id_field(obj, "user")
    item = _id_field(obj, "item")
    ts = _number_field(obj, "ts", fallback_ts)
    weight = _number_field(obj, "weight", 1.0)
    event_type = _type_field(obj)
    return user, item, ts, event_type, weight


def _parse(value: bytes | None, max_record_bytes: int) -> dict[str, Any]:
    if not value:
        raise _Reject(Reason.EMPTY_VALUE, "record has no value")
    if len(value) > max_record_bytes:
        raise _Reject(
            Reason.OVERSIZE_RECORD, f"record is {len(value)} bytes, limit {max_record_bytes}"
        )
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError:
        # orjson is 4x faster on the valid majority; the standard parser takes the
        # rest, to name the fault exactly (NaN and 1e999 parse there as non-finite).
        obj = _parse_slow(value)
    else:
        # orjson reads integers beyond 64 bits as floats; an id must keep its digits.
        if type(obj) is dict and float in (type(obj.get("user")), type(obj.get("item"))):
            obj = _parse_slow(value)
    if not isinstance(obj, dict):
        raise _Reject(Reason.NOT_OBJECT, f"value is a JSON {_json_type(obj)}, not an object")
    return obj


def _parse_slow(value: bytes) -> Any:
    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        detail = f"value is not UTF-8: {e.reason} at byte {e.start}"
        raise _Reject(Reason.NOT_UTF8, detail) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _Reject(Reason.NOT_JSON, f"value is not JSON: {e}"[:200]) from None


def _id_field(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise _Reject(Reason.MISSING_FIELD, f"missing field '{name}'")
    raw = obj[name]
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, int) and not isinstance(raw, bool):
        text = str(raw)
    else:
        raise _Reject(
            Reason.WRONG_TYPE, f"'{name}' must be a string or an integer, not {_json_type(raw)}"
        )
    size = _utf8_len(text, name)
    if size == 0:
        raise _Reject(Reason.EMPTY_ID, f"'{name}' is empty")
    if size > MAX_ID_BYTES:
        raise _Reject(Reason.OVERSIZE_ID, f"'{name}' is {size} bytes, limit {MAX_ID_BYTES}")
    return text


def _number_field(obj: dict[str, Any], name: str, default: float | None) -> float:
    raw = obj.get(name)
    if raw is None:
        # Absent or JSON null: the default stands in (the record timestamp for ts).
        if default is None:
            raise _Reject(Reason.MISSING_FIELD, f"missing field '{name}' and no record timestamp")
        return float(default)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise _Reject(Reason.WRONG_TYPE, f"'{name}' must be a number, not {_json_type(raw)}")
    try:
        number = float(raw)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Reject(Reason.NON_FINITE, f"'{name}' is not finite: {raw!r}"[:200])
    return number


def _type_field(obj: dict[str, Any]) -> str:
    raw = obj.get("type")
    if raw is None:
        return DEFAULT_TYPE
    if not isinstance(raw, str):
        raise _Reject(Reason.WRONG_TYPE, f"'type' must be a string, not {_json_type(raw)}")
    size = _utf8_len(raw, "type")
    if not 0 < size <= MAX_TYPE_BYTES:
        raise _Reject(Reason.BAD_EVENT_TYPE, f"'type' must be 1 to {MAX_TYPE_BYTES} bytes")
    return raw


def _utf8_len(text: str, name: str) -> int:
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        # JSON escapes can spell lone surrogates, which no UTF-8 id can hold.
        raise _Reject(Reason.INVALID_UNICODE, f"'{name}' holds a lone surrogate") from None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def encode_event(
    user: str, item: str, ts: float | None = None, event_type: str | None = None,
    weight: float | None = None,
) -> bytes:
    """The canonical JSON value for one event (what the producer tool publishes)."""
    obj: dict[str, object] = {"user": user, "item": item}
    if ts is not None:
        obj["ts"] = ts
    if event_type is not None:
        obj["type"] = event_type
    if weight is not None:
        obj["weight"] = weight
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
