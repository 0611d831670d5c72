"""One malformed record of every kind, with the reason the decoder must give it.

Shared by the source's dead-letter test and the durability test's 10% bad
stream, so that a new rejection reason is added in one place.
"""

from __future__ import annotations

from ncf_stream.events import Reason

MALFORMED: list[tuple[bytes, Reason]] = [
    (b"not json", Reason.NOT_JSON),
    (b'{"item": "1", "ts": 1}', Reason.MISSING_FIELD),
    (b'{"user": [], "item": "1"}', Reason.WRONG_TYPE),
    (b'{"user": "1", "item": "2", "ts": Infinity}', Reason.NON_FINITE),
    (b'{"user": "' + b"x" * 300 + b'", "item": "2"}', Reason.OVERSIZE_ID),
    (b"[]", Reason.NOT_OBJECT),
    (b"\xc3\x28", Reason.NOT_UTF8),
    (b'{"user": "", "item": "2"}', Reason.EMPTY_ID),
    (b'{"user": "1", "item": "2", "type": ""}', Reason.BAD_EVENT_TYPE),
    (b"x" * 5000, Reason.OVERSIZE_RECORD),  # over the default max_record_bytes (4096)
]
