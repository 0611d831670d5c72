"""The event source interface that drives the engine, and an in-memory source.

The same engine loop (:mod:`ncf_stream.engine`) runs from Kafka in production
(``consumers.kafka_source``) and from a file or an in-memory stream in
benchmarks and tests (:class:`MemorySource`). A batch says which offsets it
covers, so the engine can commit only what is durable. Every failure a source
reports is a :class:`SourceError`, so the engine handles sources without
knowing any client library's exception types.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ncf_stream.errors import NcfStreamError
from ncf_stream.events import Availability, Deletions, Events
from ncf_stream.ids import MappedEvents
from ncf_stream.readers import read_events

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
    # Availability events (not interactions), in stream order: the engine applies them
    # to the catalogue, never to the store or training.
    availability: Availability = field(default_factory=Availability.empty)
    # Deletions, each after the first ``at`` of ``events``: the engine applies them in
    # that order among the interactions (a source that maps ids sends ``events``
    # unmapped in a batch with deletions: see consumers.source_process).
    deletions: Deletions = field(default_factory=Deletions.empty)
    # Per event of ``events``: the partition number it was read from (int32), from a
    # source that has partitions; the engine checks that each user stays in one.
    partitions: np.ndarray | None = None

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


class UserPartitions:
    """The partition each user's events arrive in, by user row.

    The event contract keys events by user, so every event of a user lands in one
    partition, whatever partitioner the producer uses. A group of trainers relies on
    it: the worker owning a partition owns its users' store rows, so a user whose
    events arrive in two partitions would have its state split between two workers.
    A producer that sends without a key (round-robin or sticky partitioning) breaks
    it, and so does adding partitions to the topic (keys move). Memory: 4 bytes per
    user row."""

    SPLIT = -2  # a user already seen in two partitions (counted once)

    def __init__(self) -> None:
        self._of = np.full(1024, -1, dtype=np.int32)  # -1: not seen in any yet
        self._n = 0  # rows observed: one past the largest user row seen

    @property
    def rows_observed(self) -> int:
        """One past the largest user row observed (rows from here on are unknown). Not
        ``len``: an empty one would be falsy, and a caller's ``x or default`` replace it."""
        return self._n

    def partition_of(self, rows: np.ndarray) -> np.ndarray:
        """The partition of each user row (int32): -1 unknown (never observed, or beyond
        the rows observed), :attr:`SPLIT` seen in more than one."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows.min() < 0:
            raise IndexError("user rows must be >= 0")
        known = rows < self._n
        return np.where(known, self._of[np.where(known, rows, 0)], -1).astype(np.int32)

    def owned_rows(self, group_size: int, group_rank: int) -> np.ndarray:
        """The user rows (sorted) whose partition trainer ``group_rank`` of a group of
        ``group_size`` owns (:func:`owns`). Users of unknown (-1) or split partitions are
        in no trainer's rows: the caller decides where those go."""
        of = self._of[: self._n].astype(np.int64)
        return np.flatnonzero((of >= 0) & (of % group_size == group_rank))

    @classmethod
    def merged(cls, parts: Sequence[tuple[UserPartitions, np.ndarray]]) -> UserPartitions:
        """The partitions of users renumbered as :func:`ncf_stream.store.merge_stores`
        renumbers them: each part's listed rows, in order, become consecutive new rows."""
        of = [p.partition_of(rows) for p, rows in parts]
        return cls.from_arrays(np.concatenate(of) if of else np.empty(0, dtype=np.int32))

    # Plain arrays in an .npz (a checkpoint's partitions.npz): nothing executes on load.
    def arrays(self) -> dict[str, np.ndarray]:
        return {"partition": self._of[: self._n].copy()}

    @classmethod
    def from_arrays(cls, partition: np.ndarray) -> UserPartitions:
        out = cls()
        partition = np.asarray(partition)
        if partition.ndim != 1 or (len(partition) and partition.min() < cls.SPLIT):
            raise ValueError("partitions: one int per user row, >= -2")
        out._n = len(partition)
        if len(partition) > len(out._of):
            out._of = np.full(len(partition), -1, dtype=np.int32)
        out._of[: len(partition)] = partition
        return out

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.arrays())  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> UserPartitions:
        with np.load(path, allow_pickle=False) as z:
            return cls.from_arrays(z["partition"])

    def observe(self, users: np.ndarray, partitions: np.ndarray) -> int:
        """Record (user row, partition) pairs; returns how many users this made seen in
        more than one partition for the first time."""
        users = np.asarray(users, dtype=np.int64)
        keep = users >= 0  # a user deleted within the batch has no row any more
        users, partitions = users[keep], np.asarray(partitions, dtype=np.int64)[keep]
        if not len(users):
            return 0
        top = int(users.max()) + 1
        if top > len(self._of):
            grown = np.full(max(top, 2 * len(self._of)), -1, dtype=np.int32)
            grown[: len(self._of)] = self._of
            self._of = grown
        self._n = max(self._n, top)
        # A user's first partition is the one it is first seen with (among a batch's new
        # users, any of theirs: a second one in the batch is then a mismatch below).
        # Gathers only: no sort of the batch (np.unique runs over the mismatches alone).
        new = self._of[users] == -1
        self._of[users[new]] = partitions[new]
        now = self._of[users]
        fresh = np.unique(users[(now >= 0) & (now != partitions)])
        self._of[fresh] = self.SPLIT
        return len(fresh)


@dataclass(frozen=True)
class Blocked:
    """A partition stopped at a batch the source cannot decode (a codec its client
    lacks, a corrupt batch). Its other partitions keep flowing; nothing at or after
    ``offset`` in this one is consumed until an operator acts (docs/operations.md)."""

    offset: int  # the first offset not consumed
    reason: str  # a short label: the exception's type
    detail: str  # the exception's message


class SourceError(NcfStreamError):
    """The source could not make progress (the broker, the dead-letter topic, its process).

    Sources wrap their client's errors in it, so the engine needs no client types."""


class EventSource(Protocol):
    """What the engine consumes from. Each method raises :class:`SourceError` on failure."""

    def poll(self, timeout_s: float) -> EventBatch | None:
        """The next batch, or None when nothing arrived within ``timeout_s``.

        Returns as soon as records arrive: the engine rests inside ``poll`` while
        idle, so new events wake it at once."""
        ...

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Record that everything before these offsets is durably applied."""
        ...

    def flush(self) -> None:
        """Make every side effect of the batches so far durable (dead letters);
        called before a checkpoint covers them."""
        ...

    def lag(self) -> int:
        """Records available but not yet polled."""
        ...

    def blocked(self) -> Mapping[Partition, Blocked]:
        """The partitions stopped at an undecodable batch (:class:`Blocked`)."""
        ...

    def close(self) -> None: ...


def owns(partition: int, group_size: int, group_rank: int) -> bool:
    """Whether trainer ``group_rank`` of a group of ``group_size`` consumes ``partition``
    (and owns the users in it): the partitions are dealt out round-robin by number."""
    return partition % group_size == group_rank


class MemorySource:
    """Events in batches, as one partition of a pseudo-topic; :meth:`push` appends more.

    Like a broker, ``poll`` waits up to its timeout for events and wakes as soon
    as some are pushed, so the engine's idle behaviour here is the daemon's.
    """

    def __init__(self, events: Events | None = None, batch_size: int = 4096,
                 topic: str = "memory", offset: int = 0) -> None:
        """``offset``: that of the first event (a source resuming a checkpoint's position)."""
        self._chunks: list[Events | Availability | Deletions] = (
            [] if events is None or len(events) == 0 else [events])
        self._batch_size = batch_size
        self._topic = topic
        self._pos = offset  # offset of the next event to deliver
        self._in_head = 0  # its index in the front chunk
        self._size = offset + sum(len(c) for c in self._chunks)  # offset after the last
        self._arrived = threading.Condition()
        self.committed: dict[Partition, int] = {}

    @classmethod
    def from_file(cls, path: str | Path, fmt: str | None = None,
                  batch_size: int = 4096) -> MemorySource:
        """A ratings or events file (:mod:`ncf_stream.readers`), replayed in file order."""
        return cls(read_events(path, fmt).events, batch_size=batch_size)

    def push(self, events: Events | Availability | Deletions) -> None:
        """Append events, or availability events or deletions (one record each, in their
        own batch)."""
        with self._arrived:
            if len(events):
                self._chunks.append(events)
                self._size += len(events)
            self._arrived.notify_all()

    def poll(self, timeout_s: float = 0.0) -> EventBatch | None:
        with self._arrived:
            if self._pos >= self._size and timeout_s > 0:
                self._arrived.wait(timeout_s)
            if self._pos >= self._size:
                return None
            batch = self._take()
        lo = self._pos
        self._pos += len(batch)
        offsets = {(self._topic, 0): (lo, self._pos)}
        if isinstance(batch, Availability):
            return EventBatch(Events.from_rows([]), offsets, availability=batch)
        if isinstance(batch, Deletions):
            return EventBatch(Events.from_rows([]), offsets, deletions=batch)
        return EventBatch(batch, offsets)

    def _take(self) -> Events | Availability | Deletions:
        """Up to one batch from the front chunk (a batch never spans two pushes)."""
        head, lo = self._chunks[0], self._in_head
        hi = min(lo + self._batch_size, len(head))
        if hi == len(head):
            self._chunks.pop(0)
            self._in_head = 0
        else:
            self._in_head = hi
        return head if (lo, hi) == (0, len(head)) else head.take(np.arange(lo, hi))

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        self.committed.update(offsets)

    def flush(self) -> None:
        pass  # nothing is written anywhere

    def lag(self) -> int:
        return self._size - self._pos

    def blocked(self) -> Mapping[Partition, Blocked]:
        return {}  # events in memory are decoded already

    def close(self) -> None:
        pass
