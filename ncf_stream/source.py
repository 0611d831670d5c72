"""The event source interface that drives the engine, and a file-backed source.

The same trainer runs from Kafka in production (``consumers.kafka_source``)
and from a file or an in-memory stream in benchmarks and tests (here). A batch
says which offsets it covers, so the engine can commit only what is durable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ncf_stream.events import Events
from ncf_stream.ids import MappedEvents

# (topic, partition) -> offset; a plain tuple keeps Kafka types out of the engine.
Partition = tuple[str, int]

# How often the consumer lag is measured (a broker round trip), by the source
# process and by the daemon's gauges alike.
LAG_EVERY_S = 1.0


@dataclass(frozen=True)
class EventBatch:
    """Valid events from one poll, and the offsets the poll covered."""

    events: Events | MappedEvents  # mapped: by a source that maps ids itself
    # (topic, partition) -> (first offset, next offset): every record in the
    # range was either an event here, dead-lettered, or skipped by the filter.
    offsets: dict[Partition, tuple[int, int]] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)  # dead-lettered, by reason
    skipped: int = 0  # valid records the event filter dropped

    @property
    def rejected(self) -> int:
        """Records dead-lettered."""
        return sum(self.rejections.values())

    @property
    def records(self) -> int:
        """Records consumed, good or not."""
        return sum(hi - lo for lo, hi in self.offsets.values())

    def commit_offsets(self) -> dict[Partition, int]:
        """What to commit once this batch's effect is durable: the next offset per partition."""
        return {tp: hi for tp, (_, hi) in self.offsets.items()}


class EventSource(Protocol):
    def poll(self, timeout_s: float) -> EventBatch | None:
        """The next batch, or None when nothing arrived within ``timeout_s``."""
        ...

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Record that everything before these offsets is durably applied."""
        ...

    def close(self) -> None: ...


class MemorySource:
    """Replays a fixed set of events in batches, as one partition of a pseudo-topic."""

    def __init__(self, events: Events, batch_size: int = 4096, topic: str = "memory") -> None:
        self._events = events
        self._batch_size = batch_size
        self._topic = topic
        self._pos = 0
        self.committed: dict[Partition, int] = {}

    def poll(self, timeout_s: float = 0.0) -> EventBatch | None:
        lo = self._pos
        hi = min(lo + self._batch_size, len(self._events))
        if lo >= hi:
            return None
        self._pos = hi
        return EventBatch(self._events.take(np.arange(lo, hi)), {(self._topic, 0): (lo, hi)})

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.committed.update(offsets)

    def close(self) -> None:
        pass

    @property
    def exhausted(self) -> bool:
        return self._pos >= len(self._events)
