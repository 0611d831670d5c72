"""Several source processes feeding one engine (``kafka_sources`` > 1).

One kafka-python consumer tops out at a few hundred thousand events/s (its record
parsing is pure Python), which a GPU trainer can outrun. Here N
:class:`~consumers.source_process.ProcessSource` children join the consumer group
as N members, each with a static id of its own (``<kafka_group_instance_id>-<i>``),
so the group's coordinator splits the topic's partitions among them; the engine
sees one :class:`~ncf_stream.source.EventSource`.

**Ids.** One source process maps ids to rows ahead of the engine because the engine
applies its batches in the order it mapped them, so the two maps stay equal. N
children cannot do that: two mapping at once would each give the next free row to
a different new id. So the children send decoded events by id and the engine maps
them, as it does for an in-process KafkaSource. The price is the engine's: hashing
each event's two ids on the trainer thread, with the GIL held (a fifth of the GIL
time the daemon's threads held under full ingest, when it was measured for the one
process; docs/operations.md).

**Positions.** Each child starts at the engine's positions and seeks there on
assignment, as one source process does. But a partition that moves between
children in a rebalance would be read again from where its new owner last was, or
by its old owner from a batch in flight. So this source holds the engine's next
offset per partition (every batch it hands on is applied, in order), and accepts a
batch only if the child read each of its partitions from exactly there (the batch's
``bases``); any other batch is refused whole and the child is told, with its next
poll request, to read those partitions again from the engine's offsets (it drops a
batch it fetched ahead over them). Per partition the accepted batches are then
contiguous by construction, whatever the rebalances' timing: nothing is applied twice
and nothing skipped. A refused batch's dead letters may be written twice
(dead letters are at-least-once anyway).

**Order.** A partition is read by one child at a time and the batches of a child
arrive in order, so each partition's events stay in order; across partitions there
is no order, as in Kafka.

**Commits** go to every child, each committing the partitions it holds
(:meth:`ProcessSource.commit_owned`): a partition's offset is written by its owner only.

**Failures.** A child that dies, stops answering or raises makes the whole source
fail with a SourceError; the engine closes it (every child) and builds a new one
from its positions, losing nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from multiprocessing.connection import wait
from typing import Any

from consumers.kafka_source import count_batch
from consumers.source_process import Delivery, ProcessSource
from ncf_stream.metrics import IngestMetrics
from ncf_stream.settings import Settings
from ncf_stream.source import Blocked, EventBatch, Partition, SourceError
from ncf_stream.threads import BackgroundPolicy

log = logging.getLogger(__name__)

_warned_idle: set[tuple[str, int]] = set()  # (topic, sources): warned once per process


def member_settings(settings: Settings, index: int) -> Settings:
    """Child ``index``'s settings: a static member id of its own, derived from the
    daemon's, so a rebuilt child takes over its predecessor's partitions at once."""
    base = settings.kafka_group_instance_id
    return settings.model_copy(update={
        "kafka_group_instance_id": f"{base}-{index}" if base else ""})


class Continuity:
    """The engine's next offset per partition, and the test each batch must pass: every
    one of its partitions read from exactly there."""

    def __init__(self, positions: Mapping[Partition, int]) -> None:
        self.next: dict[Partition, int] = dict(positions)

    def admit(self, batch: EventBatch, bases: Mapping[Partition, int | None]
              ) -> dict[Partition, int | None]:
        """{} when ``batch`` continues every partition it covers (the positions then move
        past it); else where its sender must read those partitions again."""
        if all(bases.get(tp, -1) == self.next.get(tp) for tp in batch.offsets):
            self.next.update(batch.commit_offsets())
            return {}
        return {tp: self.next.get(tp) for tp in batch.offsets}


class ParallelSource:
    """An :class:`~ncf_stream.source.EventSource` over ``settings.kafka_sources`` source
    processes in one consumer group; see the module's docstring for why it is correct."""

    def __init__(self, settings: Settings, *, metrics: IngestMetrics | None = None,
                 positions: Mapping[Partition, int] | None = None,
                 background: BackgroundPolicy | None = None) -> None:
        self._metrics = metrics
        self._continuity = Continuity(positions or {})
        self._default_timeout = settings.kafka_poll_timeout_s
        self._children: list[ProcessSource] = []
        self._asked: set[int] = set()  # children with a poll request in flight
        self._answers: deque[tuple[int, Delivery]] = deque()  # taken, not yet handed on
        self._seeks: dict[int, dict[Partition, int | None]] = {}  # for a child's next poll
        self.refused = 0  # batches refused for not starting where the engine is
        try:
            # Spawned side by side: each child's start (imports, bootstrap) takes a second.
            for i in range(settings.kafka_sources):
                self._children.append(ProcessSource(
                    member_settings(settings, i), positions=self._continuity.next,
                    background=background, wait=False))
            for child in self._children:
                child.started()
            self._warn_if_idle(settings)
        except BaseException:
            with contextlib.suppress(Exception):  # the start's failure is the one to raise
                self.close()
            raise

    def _warn_if_idle(self, settings: Settings) -> None:
        n, topic = len(self._children), settings.kafka_topic
        partitions = self._children[0].partition_count()
        if 0 < partitions < n and (topic, n) not in _warned_idle:
            _warned_idle.add((topic, n))
            log.warning("kafka_sources = %d but %s has %d partitions: %d of the source processes "
                        "will sit idle", n, topic, partitions, n - partitions)

    # ---- poll ----------------------------------------------------------------------------------

    def poll(self, timeout_s: float | None = None) -> EventBatch | None:
        """The first batch any child delivers; None once every child asked has answered
        without one by ``timeout_s``."""
        deadline = time.monotonic() + (self._default_timeout if timeout_s is None
                                       else timeout_s)
        self._ask(deadline)
        while True:
            while self._answers:
                batch = self._take(*self._answers.popleft())
                if batch is not None:
                    return batch
            if not self._asked:
                return None
            self._await()
            if time.monotonic() < deadline:
                self._ask(deadline)  # a child that answered early (a refused batch) again

    def _ask(self, deadline: float) -> None:
        for i, child in enumerate(self._children):
            if i not in self._asked:
                child.request_poll(deadline, self._seeks.pop(i, None))
                self._asked.add(i)

    def _await(self) -> None:
        """Take the answers that arrive first, waiting on every child at once; a child
        that died or stopped answering raises SourceProcessError."""
        asked: dict[Any, int] = {self._children[i].connection: i for i in self._asked}
        ready = wait(list(asked), timeout=0.5)
        for conn in ready:
            i = asked[conn]
            self._asked.discard(i)
            self._answers.append((i, self._children[i].delivery()))
        if not ready:
            for i in self._asked:
                self._children[i].answering()

    def _take(self, i: int, delivery: Delivery) -> EventBatch | None:
        batch = delivery.batch
        if batch is None:
            return None
        seeks = self._continuity.admit(batch, delivery.bases)
        if seeks:
            self.refused += 1
            self._seeks.setdefault(i, {}).update(seeks)
            log.info("source process %d: refused a batch not read from the engine's "
                     "positions (a partition moved in a rebalance); reading %s again", i,
                     seeks)
            return None
        if self._metrics is not None:
            count_batch(self._metrics, batch)
        return batch

    def _settle(self) -> None:
        """Take every answer in flight (kept for the next polls): a child answers its
        requests in order, so another request must wait for them."""
        for i in sorted(self._asked):
            self._answers.append((i, self._children[i].delivery()))
        self._asked.clear()

    # ---- the rest of EventSource ---------------------------------------------------------------

    def flush(self) -> None:
        self._settle()
        for child in self._children:
            child.flush()

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Each child commits the partitions it holds. Every child is asked even when one
        fails (a member in a rebalance refuses commits); the first failure is raised."""
        self._settle()
        failures: list[SourceError] = []
        for child in self._children:
            try:
                child.commit_owned(offsets)
            except SourceError as e:
                failures.append(e)
        if failures:
            raise failures[0]

    def lag(self) -> int:
        """The sum of the lags the children measured last (each once a second)."""
        total = sum(child.lag() for child in self._children)
        if self._metrics is not None:
            self._metrics.consumer_lag.set(total)
        return total

    def blocked(self) -> dict[Partition, Blocked]:
        """As of each child's last answer."""
        return {tp: b for child in self._children for tp, b in child.blocked().items()}

    def assignment(self) -> list[set[Partition]]:
        """The partitions each child holds now (after the answers in flight)."""
        self._settle()
        return [child.owned() for child in self._children]

    def close(self) -> None:
        """Close every child, even when one fails to (raised after the rest are closed);
        each takes and drops its answer in flight first."""
        failure: Exception | None = None
        for child in self._children:
            try:
                child.close()
            except Exception as e:  # what a child raised on close: the others still close
                failure = failure or e
        if failure is not None:
            raise failure
