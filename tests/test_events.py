"""The event contract: every record is an exact event, a named rejection, or skipped."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncf_stream.events import (
    DEFAULT_TYPE,
    MAX_ID_BYTES,
    EventFilter,
    Reason,
    decode_batch,
    decode_one,
    encode_event,
)

ids = st.one_of(
    st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= MAX_ID_BYTES),
    st.integers(min_value=-(10**30), max_value=10**30),
)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def good_events(draw: st.DrawFn) -> dict[str, object]:
    event: dict[str, object] = {"user": draw(ids), "item": draw(ids)}
    if draw(st.booleans()):
        event["ts"] = draw(st.one_of(finite, st.integers(-(10**15), 10**15)))
    if draw(st.booleans()):
        event["type"] = draw(st.text(min_size=1, max_size=16))
    if draw(st.booleans()):
        event["weight"] = draw(finite)
    if draw(st.booleans()):
        event["extra"] = draw(st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))
    return event


def expected_row(event: dict[str, object], fallback: float) -> tuple[str, str, float, str, float]:
    return (
        str(event["user"]),
        str(event["item"]),
        float(event.get("ts", fallback)),  # type: ignore[arg-type]
        str(event.get("type", DEFAULT_TYPE)),
        float(event.get("weight", 1.0)),  # type: ignore[arg-type]
    )


@given(st.lists(good_events(), max_size=20), finite)
def test_good_events_decode_exactly(events: list[dict[str, object]], fallback: float) -> None:
    values = [json.dumps(e).encode() for e in events]
    result = decode_batch(values, [fallback] * len(values))
    assert result.rejected == []
    assert result.index.tolist() == list(range(len(events)))
    got = list(zip(result.events.users, result.events.items, result.events.ts.tolist(),
                   result.events.types, result.events.weights.tolist(), strict=True))
    assert got == [expected_row(e, fallback) for e in events]


@given(st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=30))
def test_arbitrary_bytes_never_raise(values: list[bytes | None]) -> None:
    result = decode_batch(values, [1.0] * len(values))
    accounted = sorted(result.index.tolist() + [r.index for r in result.rejected])
    assert accounted == list(range(len(values)))
    assert all(isinstance(r.reason, Reason) and r.detail for r in result.rejected)


def _mutations() -> list[tuple[str, object, Reason]]:
    """(field, bad value, expected reason) applied to an otherwise valid event."""
    return [
        ("user", None, Reason.WRONG_TYPE),
        ("item", [1], Reason.WRONG_TYPE),
        ("user", {"a": 1}, Reason.WRONG_TYPE),
        ("item", True, Reason.WRONG_TYPE),
        ("user", 4.5, Reason.WRONG_TYPE),
        ("user", "", Reason.EMPTY_ID),
        ("item", "x" * (MAX_ID_BYTES + 1), Reason.OVERSIZE_ID),
        ("user", "é" * (MAX_ID_BYTES // 2 + 1), Reason.OVERSIZE_ID),  # 258 bytes, 129 chars
        ("user", "\ud800", Reason.INVALID_UNICODE),
        ("ts", "978300760", Reason.WRONG_TYPE),
        ("ts", True, Reason.WRONG_TYPE),
        ("ts", float("nan"), Reason.NON_FINITE),
        ("ts", float("inf"), Reason.NON_FINITE),
        ("weight", float("-inf"), Reason.NON_FINITE),
        ("weight", 10**400, Reason.NON_FINITE),
        ("weight", [], Reason.WRONG_TYPE),
        ("type", 3, Reason.WRONG_TYPE),
        ("type", "", Reason.BAD_EVENT_TYPE),
        ("type", "t" * 65, Reason.BAD_EVENT_TYPE),
    ]


@pytest.mark.parametrize(("field", "value", "reason"), _mutations())
def test_each_malformed_field_has_its_reason(field: str, value: object, reason: Reason) -> None:
    event = {"user": "1", "item": "2", "ts": 5.0, field: value}
    raw = json.dumps(event).encode("utf-8", "surrogatepass")
    result = decode_batch([raw], [1.0])
    assert len(result.events) == 0
    assert [(r.index, r.reason) for r in result.rejected] == [(0, reason)]
    assert field in result.rejected[0].detail


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, Reason.EMPTY_VALUE),
        (b"", Reason.EMPTY_VALUE),
        (b"\xff\xfe{}", Reason.NOT_UTF8),
        (b'{"user": "1", "item"', Reason.NOT_JSON),
        (b"[" * 100_00, Reason.OVERSIZE_RECORD),
        (b"[" * 3000 + b"]" * 3000, Reason.OVERSIZE_RECORD),
        (b"[" * 2000 + b"]" * 2000, Reason.NOT_JSON),  # nesting beyond the parser's limit
        (b'["user", "item"]', Reason.NOT_OBJECT),
        (b'"user"', Reason.NOT_OBJECT),
        (b"42", Reason.NOT_OBJECT),
        (b'{"item": "2"}', Reason.MISSING_FIELD),
        (b'{"user": "1"}', Reason.MISSING_FIELD),
        (b'{"user": "1", "item": "2", "ts": NaN}', Reason.NON_FINITE),
        (b'{"user": "1", "item": "2", "ts": 1e999}', Reason.NON_FINITE),
        (b'{"user": 1' + b"0" * 5000 + b', "item": "2"}', Reason.OVERSIZE_RECORD),
    ],
)
def test_malformed_records(raw: bytes | None, reason: Reason) -> None:
    result = decode_batch([raw], [1.0])
    assert [r.reason for r in result.rejected] == [reason]


def test_deep_nesting_inside_the_size_limit_is_rejected_not_raised() -> None:
    deep = b'{"user": "1", "item": "2", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}"
    result = decode_batch([deep], [1.0], max_record_bytes=len(deep))
    assert [r.reason for r in result.rejected] == [Reason.NOT_JSON]


def test_integer_ids_mean_their_decimal_string() -> None:
    result = decode_batch([b'{"user": 42, "item": -7, "ts": 1}'])
    assert (result.events.users[0], result.events.items[0]) == ("42", "-7")


def test_missing_ts_falls_back_to_record_timestamp_and_needs_one() -> None:
    value = b'{"user": "1", "item": "2"}'
    assert decode_batch([value], [123.5]).events.ts.tolist() == [123.5]
    assert decode_one(value, None).reason is Reason.MISSING_FIELD  # type: ignore[union-attr]


def test_batch_keeps_positions_of_good_bad_and_skipped() -> None:
    values = [
        encode_event("u1", "i1", 1.0, "click"),
        b"garbage",
        encode_event("u2", "i2", 2.0, "view"),
        encode_event("u3", "i3", 3.0, "click", weight=0.5),
        encode_event("u4", "i4", 4.0, "click", weight=2.0),
    ]
    result = decode_batch(values, event_filter=EventFilter(frozenset({"click"}), min_weight=1.0))
    assert result.index.tolist() == [0, 4]
    assert result.events.users.tolist() == ["u1", "u4"]
    assert [(r.index, r.reason) for r in result.rejected] == [(1, Reason.NOT_JSON)]
    assert result.skipped.tolist() == [2, 3]


@given(good_events())
@settings(max_examples=50)
def test_encode_event_round_trips(event: dict[str, object]) -> None:
    user, item = str(event["user"]), str(event["item"])
    ts = float(event.get("ts", 0.0))  # type: ignore[arg-type]
    raw = encode_event(user, item, ts, "t", 2.0)
    row = decode_one(raw)
    assert row == (user, item, ts, "t", 2.0)


def test_availability_events_come_apart_in_order_and_need_only_an_item() -> None:
    values = [
        b'{"item": "i1", "type": "item_unavailable"}',
        encode_event("u1", "i2", 1.0, "click"),
        b'{"item": 7, "type": "item_unavailable", "user": ["ignored"], "ts": "ignored"}',
        b'{"item": "i1", "type": "item_available", "weight": 0}',
        b'{"type": "item_unavailable"}',
        b'{"item": "", "type": "item_available"}',
        b'{"user": "u", "item": "i", "ts": 1, "type": ["item_available"]}',
    ]
    # The filter chooses interactions to train on: it never drops availability.
    result = decode_batch(values, event_filter=EventFilter(frozenset({"click"}), min_weight=1.0))
    assert result.availability.items.tolist() == ["i1", "7", "i1"]
    assert result.availability.available.tolist() == [False, False, True]
    assert result.events.items.tolist() == ["i2"] and result.index.tolist() == [1]
    assert [(r.index, r.reason) for r in result.rejected] == [
        (4, Reason.MISSING_FIELD), (5, Reason.EMPTY_ID), (6, Reason.WRONG_TYPE)]
    assert result.skipped.tolist() == []
