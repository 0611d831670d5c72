"""What HTTP and gRPC share: request limits, the status fields, and the request metrics.

Both servers are thin: they validate, call :class:`ncf_stream.recommend.Recommender`
and format. The status fields come from a callable the daemon provides, so the
servers know nothing of Kafka.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from ncf_stream.errors import BadInput
from ncf_stream.events import MAX_ID_BYTES

DEFAULT_K = 10  # items per answer when a request does not say
# What a recommendation leaves out: "seen", every item the user touched (the default);
# "trained", those but the user's current hold-out, to evaluate through the API (the
# hold-out would be dropped as seen); "none", nothing.
Exclude = Literal["seen", "trained", "none"]
EXCLUDE: tuple[str, ...] = get_args(Exclude)


def resolve_exclude(exclude: str | None, exclude_seen: bool) -> Exclude:
    """A request's exclusion: ``exclude`` when given, else the older ``exclude_seen``."""
    if exclude is None:
        return "seen" if exclude_seen else "none"
    if exclude not in EXCLUDE:
        raise BadInput(f"exclude must be one of {', '.join(EXCLUDE)}, got {exclude!r}")
    return exclude  # type: ignore[return-value]
MAX_BATCH_USERS = 1000
MAX_SCORE_ITEMS = 10_000
# exclude_items and include_only: candidate lists of a few thousand items, scored whole.
MAX_FILTER_ITEMS = 10_000
# An anonymous request's items: a session or a profile, not a catalogue; its fit costs
# a forward and backward pass over them and their negatives per step.
MAX_ANONYMOUS_ITEMS = 1000
MAX_BODY_BYTES = 1 << 20
# A user's known items come in pages: a heavy user has thousands.
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_OFFSET = 2**31 - 1  # an int32 in the .proto


def check_page(offset: int, limit: int) -> tuple[int, int]:
    if not 0 <= offset <= MAX_OFFSET:
        raise BadInput(f"'offset' must be an integer from 0 to {MAX_OFFSET}")
    if not 1 <= limit <= MAX_PAGE:
        raise BadInput(f"'limit' must be an integer from 1 to {MAX_PAGE}")
    return offset, limit


@dataclass(frozen=True)
class RankStatus:
    """One rank's snapshot, as a replica over a group of trainers serves it."""

    rank: int
    model_version: int = 0  # 0: no snapshot of this rank loaded yet
    snapshot_events: int = 0
    snapshot_age_seconds: float = 0.0


@dataclass(frozen=True)
class Status:
    events_consumed: int = 0
    events_rejected: int = 0
    events_trained: int = 0
    consumer_lag: int = 0
    users: int = 0
    items: int = 0
    interactions: int = 0
    model_version: int = 0
    snapshot_events: int = 0  # consumed events the served snapshot includes
    snapshot_age_seconds: float = 0.0
    ingest: str = "ok"  # "degraded" while the source is down (serving goes on)
    ingest_reason: str = ""  # why it is degraded
    # "trainer" (ncf-stream serve), or "replica" (ncf-stream serve-replica: it serves the
    # trainer's exported snapshots; the counts above are the trainer's as of that export).
    role: str = "trainer"
    # A replica over a group of trainers (ncf_stream.routing): each rank's snapshot, by
    # rank; empty otherwise.
    ranks: tuple[RankStatus, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


StatusSource = Callable[[], Status]


def check_id(value: object, what: str) -> str:
    """An id: a string or an integer, 1 to 256 characters (the HTTP schema's rule too).

    One longer than 256 UTF-8 bytes can never have been stored, so it is unknown.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise BadInput(f"'{what}' must be a string or an integer")
    text = str(value)
    if not 0 < len(text) <= MAX_ID_BYTES:
        raise BadInput(f"'{what}' must be 1 to {MAX_ID_BYTES} characters")
    return text


def check_k(k: int, max_k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise BadInput(f"'k' must be an integer from 1 to {max_k}")
    return k
