"""The Kafka event source: poll in batches, decode, dead-letter the bad, report offsets.

Follows the loop of quix-streams' ``_process_message``: poll, process, remember
the offsets only after success, commit what the engine says is durable. Auto
commit is off: the engine calls :meth:`KafkaSource.commit` once a batch's
effect is safe, so a crash replays events rather than losing them.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CorruptRecordError, KafkaError, UnsupportedCodecError
from kafka.structs import OffsetAndMetadata

from ncf_stream.events import EventFilter, Events, Reason, Rejection, decode_batch
from ncf_stream.metrics import IngestMetrics
from ncf_stream.settings import Settings
from ncf_stream.source import Blocked, EventBatch, Partition, SourceError, owns

log = logging.getLogger(__name__)


# A subscribed consumer with no partition for this long leaves and rejoins its group.
# kafka-python 3.0.12 once completed a join without applying its assignment (a short
# poll timed out between SyncGroup and the assignment): the group stable, the consumer
# holding nothing and fetching nothing, events consumed 0 for minutes.
UNASSIGNED_REJOIN_S = 15.0
# A probe fetch (one partition alone, from one offset) that has not answered in this
# long found nothing there: on a live broker an answer takes milliseconds.
PROBE_S = 5.0
# In a group of trainers (group_size > 1) each consumer assigns itself its partitions:
# no group coordinator tells it of partitions added to the topic later. Its client
# refreshes the topic's metadata this often (metadata_max_age_ms, a request in the
# background), and every poll compares the partitions there with those it assigned,
# so a new partition's first events wait about this long for their owner. Partitions
# are added by an operator, rarely: that wait costs little, and so does the request.
PARTITION_CHECK_S = 60.0
# How long a trainer of a group waits at start for the topic's metadata. A topic that
# exists is known within one metadata request; one missing this long is missing (a
# SourceError: the engine rebuilds the source with its back-off, so it is asked again).
TOPIC_WAIT_S = 10.0


@contextmanager
def _kafka_errors(what: str) -> Iterator[None]:
    """The engine knows no Kafka types: a client error reaches it as a SourceError."""
    try:
        yield
    except KafkaError as e:
        raise SourceError(f"{what}: {type(e).__name__}: {e}") from e


def consumer_config(settings: Settings) -> dict[str, Any]:
    # A trainer of a group assigns itself its partitions: static membership (KIP-345)
    # is for members of a subscribed consumer group, and such a consumer joins none.
    grouped = settings.group_size > 1
    static = "" if grouped else settings.kafka_group_instance_id
    return {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "group_id": settings.kafka_group_id,
        "client_id": "ncf-stream",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.kafka_max_poll_records,
        # Throughput: per-record CRC checks and client-side metrics cost more than
        # the decode itself in kafka-python; the broker already checks CRCs.
        "check_crcs": False,
        "metrics_enabled": False,
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "group_instance_id": static or None,
        "session_timeout_ms": int(settings.kafka_session_timeout_s * 1000),
        "heartbeat_interval_ms": int(settings.kafka_session_timeout_s * 1000 / 3),
        **({"metadata_max_age_ms": int(PARTITION_CHECK_S * 1000)} if grouped else {}),
        **settings.kafka_client_options,
    }


def probe_config(settings: Settings) -> dict[str, Any]:
    """A consumer outside the group that fetches one partition at a time, one record."""
    return {**consumer_config(settings), "group_id": None, "group_instance_id": None,
            "client_id": "ncf-stream-probe",
            "max_poll_records": 1, "fetch_max_wait_ms": 100}


def _message(error: Exception) -> str:
    """An exception's message without the class name kafka-python's errors repeat in it."""
    text, prefix = str(error), f"{type(error).__name__}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _decoding_error(error: Exception) -> bool:
    """Whether a poll failed decoding a batch rather than talking to the broker: the
    client's codec and corruption errors, and whatever a codec library raises."""
    return not isinstance(error, KafkaError) or isinstance(
        error, (UnsupportedCodecError, CorruptRecordError))


def _probe(consumer: KafkaConsumer, tp: TopicPartition, offset: int) -> Exception | None:
    """Fetch ``tp`` from ``offset``: the decoding error that raises, or None if a record
    (or nothing, within PROBE_S) came. A failed probe leaves ``consumer`` poisoned at
    ``offset`` (see KafkaSource._undecodable): never probe one offset twice with it."""
    if consumer.assignment() != {tp}:
        consumer.assign([tp])
    consumer.seek(tp, offset)
    deadline = time.monotonic() + PROBE_S
    while time.monotonic() < deadline:
        try:
            if consumer.poll(timeout_ms=100, max_records=1):
                return None
        except Exception as e:
            if not _decoding_error(e):
                raise
            return e
    return None


def producer_config(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap.split(","),
        "client_id": "ncf-stream",
        "acks": "all",
        "linger_ms": 5,
        "metrics_enabled": False,
        **settings.kafka_client_options,
    }


def dead_letter_producer_config(settings: Settings) -> dict[str, Any]:
    """Dead letters wait for no one (a checkpoint flushes them), so they travel in
    large batches: 27 vs 35 us of Python a record in kafka-python."""
    return {**producer_config(settings), "linger_ms": 50, "batch_size": 1 << 20,
            **settings.kafka_client_options}  # the user's client options still win


def count_batch(metrics: IngestMetrics, batch: EventBatch) -> None:
    """A polled batch in the ingest metrics: records, skips, dead letters by reason."""
    metrics.consumed.inc(batch.records)
    metrics.skipped.inc(batch.skipped)
    for reason, n in batch.rejections.items():
        metrics.rejected.labels(reason=reason).inc(n)


class _PositionFromState(ConsumerRebalanceListener):
    """On every assignment, seek to where the engine's state says it is: the offsets its
    checkpoint plus the batches ingested since cover, or the beginning of a partition the
    state has never seen. Committed offsets are never used for positioning: they are for
    lag tools, and the state in memory is what must not skip or repeat an event."""

    def __init__(self, consumer: KafkaConsumer, positions: Callable[[], Mapping[Partition, int]],
                 assigned: Callable[[set[TopicPartition]], None]) -> None:
        self.consumer, self.positions, self.assigned = consumer, positions, assigned

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        known = seek_from_state(self.consumer, assigned, self.positions())
        self.assigned(set(assigned))
        log.info("assigned %s; positions from state: %s", sorted(map(tuple, assigned)), known)


def seek_from_state(consumer: KafkaConsumer, partitions: Any,
                    positions: Mapping[Partition, int]) -> Mapping[Partition, int]:
    """Seek each of ``partitions`` to its offset in ``positions``, or to its beginning
    when the state has none; returns ``positions``."""
    fresh = [tp for tp in partitions if (tp.topic, tp.partition) not in positions]
    for tp in partitions:
        if (tp.topic, tp.partition) in positions:
            consumer.seek(tp, positions[(tp.topic, tp.partition)])
    if fresh:
        consumer.seek_to_beginning(*fresh)
    return positions


class KafkaSource:
    """An :class:`ncf_stream.source.EventSource` over a Kafka topic.

    ``positions`` returns the next offset per partition that the engine's state
    includes (its checkpoint plus what it ingested since); every assignment seeks
    there, so a restart neither skips nor repeats an event's effect.

    In a group of trainers (``group_size`` > 1) the consumer joins no consumer group:
    it assigns itself the partitions p with p % group_size == group_rank (the users in
    them are this trainer's), seeks them as an assignment would, and asks every
    PARTITION_CHECK_S for partitions added since. Its ``kafka_group_id`` then only
    names where the offsets are committed, each partition's by its owner.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: IngestMetrics | None = None,
        consumer: KafkaConsumer | None = None,
        dlq_producer: KafkaProducer | None = None,
        positions: Callable[[], Mapping[Partition, int]] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._filter = _event_filter(settings)
        with _kafka_errors(f"connecting to {settings.kafka_bootstrap}"):
            self._consumer = consumer or KafkaConsumer(**consumer_config(settings))
        self._listener: _PositionFromState | None = None
        self._blocked: dict[TopicPartition, Blocked] = {}
        self._poisoned: SourceError | None = None  # an undecodable batch left unresolved
        self._positions = positions or dict
        # Partitions by rank, assigned by hand (a consumer we are given: its owner's).
        self._grouped = consumer is None and settings.group_size > 1
        self._partitions: set[int] = set()  # the topic's, when they were last assigned
        try:
            if self._grouped:
                self._assign_owned(wait_s=TOPIC_WAIT_S)
            elif consumer is None:
                self._listener = _PositionFromState(self._consumer, self._positions,
                                                    self._reblock)
                self._consumer.subscribe([settings.kafka_topic], listener=self._listener)
        except BaseException:
            self._consumer.close(autocommit=False)
            raise
        self._unassigned_since: float | None = None
        self.rejoins = 0
        self._dlq = DeadLetterWriter(
            dlq_producer or KafkaProducer(**dead_letter_producer_config(settings)),
            settings.kafka_dlq_topic)
        self._dlq_log = DeadLetterLog(settings.kafka_dlq_topic)

    # ---- a group of trainers: each its own partitions, assigned by hand --------------------

    def _topic_partitions(self, wait_s: float) -> set[int]:
        """The topic's partitions in the client's metadata (asked of the broker while the
        topic is not there), waiting up to ``wait_s`` for a topic that is not known yet;
        raises SourceError if it still is not."""
        topic = self._settings.kafka_topic
        deadline = time.monotonic() + wait_s
        with _kafka_errors(f"reading the partitions of {topic}"):
            while True:
                partitions: set[int] = set(self._consumer.partitions_for_topic(topic) or ())
                if partitions or time.monotonic() >= deadline:
                    break
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        if not partitions:
            raise SourceError(f"topic {topic} not found on {self._settings.kafka_bootstrap} "
                              f"(waited {wait_s:.0f} s): trainer {self._settings.group_rank} of "
                              f"{self._settings.group_size} has no partitions to assign itself")
        return partitions

    def _assign_owned(self, wait_s: float = 0.0) -> None:
        """Assign the consumer the topic's partitions this rank owns; a partition new to
        it starts where the engine's state is, or at its beginning (as _PositionFromState
        seeks on a subscribed consumer's assignment). Those it held keep their positions
        and pauses: kafka-python's assign keeps the state of a partition assigned before."""
        s = self._settings
        self._partitions = self._topic_partitions(wait_s)
        mine = {TopicPartition(s.kafka_topic, p) for p in self._partitions
                if owns(p, s.group_size, s.group_rank)}
        held = self._consumer.assignment()
        if mine == held:
            return
        with _kafka_errors("assigning partitions"):
            self._consumer.assign(sorted(mine))
            known = seek_from_state(self._consumer, mine - held, self._positions())
        self._reblock(mine)
        log.info("trainer %d of %d: assigned %s; positions from state: %s", s.group_rank,
                 s.group_size, sorted(map(tuple, mine)), known)

    def _check_partitions(self) -> None:
        """Take on the partitions of ours added to the topic since they were assigned,
        once the client's metadata has them (see PARTITION_CHECK_S): a lookup in it."""
        if not self._grouped:
            return
        with _kafka_errors(f"reading the partitions of {self._settings.kafka_topic}"):
            now = self._consumer.partitions_for_topic(self._settings.kafka_topic)
        if now and set(now) != self._partitions:
            self._assign_owned()

    def poll(self, timeout_s: float | None = None) -> EventBatch | None:
        """Poll once; None when no record arrived within ``timeout_s``."""
        if self._poisoned is not None:  # its next poll would spin (see _undecodable)
            raise self._poisoned
        timeout = self._settings.kafka_poll_timeout_s if timeout_s is None else timeout_s
        self._check_partitions()
        if self._grouped and not self._consumer.assignment():
            # A rank beyond the topic's partitions owns none (yet); a consumer with no
            # assignment would not wait for its timeout.
            time.sleep(timeout)
            return None
        try:
            by_partition = self._consumer.poll(
                timeout_ms=int(timeout * 1000), max_records=self._settings.kafka_max_poll_records
            )
        except Exception as e:
            if not _decoding_error(e):
                raise SourceError(f"polling {self._settings.kafka_topic}: "
                                  f"{type(e).__name__}: {e}") from e
            return self._undecodable(e)  # a codec's error, or a corrupt batch
        records = [r for part in by_partition.values() for r in part]
        if not records:
            self._check_assignment()
            return None
        # A partition's records come in offset order.
        offsets = {(tp.topic, tp.partition): (part[0].offset, part[-1].offset + 1)
                   for tp, part in by_partition.items() if part}
        partitions = np.repeat(np.array([tp.partition for tp in by_partition], dtype=np.int32),
                               [len(part) for part in by_partition.values()])
        try:
            return self._decode(records, offsets, partitions)
        except Exception:
            # Nothing of this poll is reported, so rewind: the next poll serves
            # these records again instead of silently skipping them.
            self._rewind(offsets)
            raise

    def blocked(self) -> dict[Partition, Blocked]:
        return {(tp.topic, tp.partition): b for tp, b in self._blocked.items()}

    # ---- a batch the client cannot decode ---------------------------------------------------
    #
    # kafka-python raises from poll() without saying which partition failed (an lz4
    # batch without the lz4 module: UnsupportedCodecError; a corrupt one: the codec's own
    # error). Its consumer is then poisoned: the next poll at that position spins forever
    # in Fetcher.fetched_records over the failed batch (3.0.12), the 100% CPU the daemon
    # was once found in. So the failure is reproduced by a probe consumer of its own,
    # outside the group, one partition at a time from the main consumer's positions; the
    # partition that fails is paused in the main consumer (or its range dead-lettered and
    # skipped), and the others flow on. Only public consumer calls are used.

    def _undecodable(self, error: Exception) -> EventBatch | None:
        """Find the partition whose next batch raises ``error``; block it, or dead-letter
        its undecodable range. Raises SourceError if no single partition reproduces it,
        and on every later poll: the engine builds a new source."""
        try:
            return self._isolate(error)
        except SourceError as e:
            self._poisoned = e
            raise

    def _isolate(self, error: Exception) -> EventBatch | None:
        topic = self._settings.kafka_topic
        with _kafka_errors(f"polling {topic}: {type(error).__name__}: {error}; then "
                           "looking for the partition that fails"):
            live = [tp for tp in self._consumer.assignment() if tp not in self._blocked]
            start = {tp: self._consumer.position(tp) for tp in live}
            end = self._consumer.end_offsets(live) if live else {}
            probe = KafkaConsumer(**probe_config(self._settings))
            try:
                culprit = failure = None
                for tp in sorted((tp for tp in live if start[tp] < end[tp]),
                                 key=lambda tp: tp.partition):
                    failure = _probe(probe, tp, start[tp])
                    if failure is not None:
                        culprit = tp
                        break
                if culprit is None:
                    raise SourceError(f"polling {topic}: {type(error).__name__}: {error} "
                                      "(no single partition reproduces it)") from error
                lo = hi = start[culprit]
                if self._settings.dead_letter_undecodable:
                    # A fetch returns the whole batch around its offset, so the range ends
                    # at the first offset whose fetch succeeds (a compressed batch has no
                    # readable records; skipping ahead could skip good batches).
                    hi += 1
                    while hi < end[culprit] and _probe(probe, culprit, hi) is not None:
                        hi += 1
            finally:
                probe.close(autocommit=False)
        assert failure is not None
        log.debug("%s[%d] offset %d: undecodable batch", culprit.topic, culprit.partition, lo,
                  exc_info=failure)
        if hi == lo:
            self._blocked[culprit] = Blocked(lo, type(failure).__name__, _message(failure))
            self._consumer.pause(culprit)
            return None
        self._consumer.seek(culprit, hi)  # past the range (and the poisoned batch)
        return self._dead_letter_range(culprit, lo, hi, failure)

    def _reblock(self, assigned: set[TopicPartition]) -> None:
        """After a rebalance: a blocked partition still ours stays paused (a new
        assignment resumes every partition); one that left us is no longer ours to report."""
        self._blocked = {tp: b for tp, b in self._blocked.items() if tp in assigned}
        if self._blocked:
            self._consumer.pause(*self._blocked)

    def _dead_letter_range(self, tp: TopicPartition, lo: int, hi: int,
                           failure: Exception) -> EventBatch:
        """One dead letter for an undecodable range, and an empty batch that covers it,
        so the range is counted, rejected, and committed past like any bad record."""
        detail = f"{type(failure).__name__}: {_message(failure)}"
        letter = _RangeLetter(tp.topic, tp.partition, lo, json.dumps({
            "topic": tp.topic, "partition": tp.partition, "first_offset": lo,
            "next_offset": hi, "reason": Reason.UNDECODABLE_BATCH.value,
            "detail": detail}).encode())
        rejection = Rejection(0, Reason.UNDECODABLE_BATCH, f"offsets {lo}-{hi - 1}: {detail}")
        self._dlq_log.add([letter], [rejection])
        self._dlq.put([(letter, rejection)])
        batch = EventBatch(Events.from_rows([]), {(tp.topic, tp.partition): (lo, hi)},
                           {Reason.UNDECODABLE_BATCH.value: hi - lo})
        if self._metrics is not None:
            count_batch(self._metrics, batch)
        return batch

    def assigned(self) -> bool:
        """Whether the consumer holds a partition now."""
        return bool(self._consumer.assignment())

    def owned(self) -> set[Partition]:
        """The partitions the consumer holds now."""
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def partition_count(self) -> int:
        """The topic's partitions (0 while the topic is unknown); may ask the broker."""
        with _kafka_errors(f"reading the partitions of {self._settings.kafka_topic}"):
            return len(self._consumer.partitions_for_topic(self._settings.kafka_topic))

    def seek(self, positions: Mapping[Partition, int | None]) -> None:
        """Read on from these offsets (None: the partition's beginning). Partitions the
        consumer does not hold are left alone: their next assignment seeks them from the
        state's positions (_PositionFromState)."""
        owned = self._consumer.assignment()
        with _kafka_errors("seeking"):
            for (topic, partition), offset in positions.items():
                tp = TopicPartition(topic, partition)
                if tp not in owned:
                    continue
                if offset is None:
                    self._consumer.seek_to_beginning(tp)
                else:
                    self._consumer.seek(tp, offset)

    def _idle_by_design(self) -> bool:
        """Whether holding nothing is expected: one of kafka_sources members of a group
        with fewer partitions than members. Rejoining would only restart the group's
        rebalance, every UNASSIGNED_REJOIN_S, for every member."""
        return (self._settings.kafka_sources > 1
                and self.partition_count() < self._settings.kafka_sources)

    def _check_assignment(self) -> None:
        """Leave and rejoin the group after UNASSIGNED_REJOIN_S without a partition."""
        if self._listener is None:
            return  # given a consumer (its owner manages its group) or assigned by hand
        if self.assigned():
            self._unassigned_since = None
            return
        now = time.monotonic()
        if self._unassigned_since is None:
            self._unassigned_since = now
        elif now - self._unassigned_since < UNASSIGNED_REJOIN_S:
            return
        elif self._idle_by_design():
            self._unassigned_since = now  # asked again one period on
        else:
            log.warning("no partition of %s assigned for %.0f s: leaving and rejoining group %s",
                        self._settings.kafka_topic, now - self._unassigned_since,
                        self._settings.kafka_group_id)
            self._consumer.unsubscribe()
            self._consumer.subscribe([self._settings.kafka_topic], listener=self._listener)
            self._unassigned_since = now
            self.rejoins += 1

    def _decode(self, records: list[Any], offsets: dict[Partition, tuple[int, int]],
                partitions: np.ndarray | None = None) -> EventBatch:
        """``partitions``: each record's partition number, in ``records``' order."""
        result = decode_batch(
            [r.value for r in records],
            [r.timestamp / 1000.0 if r.timestamp is not None and r.timestamp >= 0 else None
             for r in records],
            max_record_bytes=self._settings.max_record_bytes,
            event_filter=self._filter,
        )
        if result.rejected:
            self._dead_letter(records, result.rejected)
        batch = EventBatch(result.events, offsets,
                           dict(Counter(rej.reason.value for rej in result.rejected)),
                           len(result.skipped), result.availability, result.deletions,
                           None if partitions is None else partitions[result.index])
        if self._metrics is not None:
            count_batch(self._metrics, batch)
        return batch

    def _dead_letter(self, records: list[Any], rejected: list[Rejection]) -> None:
        """Hand the original bytes and the reason to the dead-letter writer."""
        self._dlq_log.add(records, rejected)
        self._dlq.put([(records[rej.index], rej) for rej in rejected])

    def flush(self, timeout_s: float = 30.0) -> None:
        """Make every dead letter so far durable; raises SourceError if one could not be.

        The durability point: call before a checkpoint or commit that covers them.
        """
        self._dlq_log.flush()
        self._dlq.flush(timeout_s)

    def _rewind(self, offsets: Mapping[Partition, tuple[int, int]]) -> None:
        for (topic, partition), (lo, _) in offsets.items():
            self._consumer.seek(TopicPartition(topic, partition), lo)

    def commit(self, offsets: Mapping[Partition, int]) -> None:
        """Commit ``offsets`` to ``kafka_group_id``. In a group of trainers only those of
        the partitions this rank owns: each partition's offset is written by its owner
        (kafka-python and the broker take commits of a consumer assigned by hand into a
        group that has no members, at no generation)."""
        self.flush()  # never commit past a dead letter that is not written
        if self._grouped:
            offsets = {tp: o for tp, o in offsets.items()
                       if owns(tp[1], self._settings.group_size, self._settings.group_rank)}
        with _kafka_errors("committing offsets"):
            self._consumer.commit({
                TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                for (t, p), o in offsets.items()
            })

    def lag(self) -> int:
        """Records not yet consumed on the assigned partitions."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return 0
        with _kafka_errors("reading the end offsets"):
            ends = self._consumer.end_offsets(assigned)
            lag = sum(max(0, ends[tp] - self._consumer.position(tp)) for tp in assigned)
        if self._metrics is not None:
            self._metrics.consumer_lag.set(lag)
        return lag

    def close(self) -> None:
        try:
            self._dlq_log.flush()
            self._dlq.close()
        finally:
            self._consumer.close(autocommit=False)
            if self._listener is not None and self._settings.kafka_group_instance_id:
                _leave_group(self._settings)



@dataclass(frozen=True)
class _RangeLetter:
    """The dead letter of an undecodable offset range: its records cannot be read, so
    the letter carries the range and the reason (a JSON value), not their bytes."""

    topic: str
    partition: int
    offset: int  # the range's first
    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def _leave_group(settings: Settings) -> None:
    """Remove our static member from the group: a static member never leaves on close,
    so its partitions would wait out its session before another member got them. Best
    effort: the session ends it anyway."""
    from kafka.admin import KafkaAdminClient, MemberToRemove

    try:
        admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap.split(","),
                                 client_id="ncf-stream", request_timeout_ms=5000,
                                 **settings.kafka_client_options)
        try:
            admin.remove_group_members(settings.kafka_group_id, [
                MemberToRemove(group_instance_id=settings.kafka_group_instance_id)])
        finally:
            admin.close()
    except Exception as e:
        log.warning("could not leave group %s as %s (its session will end it): %s",
                    settings.kafka_group_id, settings.kafka_group_instance_id, e)


class DeadLetterLog:
    """Dead letters in the log: the first at once, then one summary per ``every_s``.

    One line per batch still meant ten lines a second from the demo stream (one
    bad record in 200 at 2,000 events/s); a flood of bad input must not flood
    the log, and the metrics and the dead-letter topic have every record.
    """

    def __init__(self, topic: str, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topic, self.every_s, self._clock = topic, every_s, clock
        self._counts: Counter[str] = Counter()
        self._example = ""
        self._last = -math.inf

    def add(self, records: list[Any], rejected: list[Rejection]) -> None:
        if not rejected:
            return
        self._counts.update(rej.reason.value for rej in rejected)
        if not self._example:
            rec, rej = records[rejected[0].index], rejected[0]
            self._example = (f"{rec.topic}[{rec.partition}] offset {rec.offset}: "
                             f"{rej.reason.value} ({rej.detail})")
        now = self._clock()
        if now - self._last >= self.every_s:
            self._emit(now)

    def flush(self) -> None:
        """Log what is pending now (at a checkpoint, and on close)."""
        if self._counts:
            self._emit(self._clock())

    def _emit(self, now: float) -> None:
        since = "" if self._last == -math.inf else f" in the last {now - self._last:.0f} s"
        reasons = ", ".join(f"{reason} {n}" for reason, n in self._counts.most_common())
        log.warning("dead-lettered %d records to %s%s (%s); e.g. %s",
                    sum(self._counts.values()), self.topic, since, reasons, self._example)
        self._counts.clear()
        self._example = ""
        self._last = now


class DeadLetterWriter:
    """Sends dead letters from a thread of its own, so ingest never waits on them.

    A kafka-python send costs ~40 us of Python; at one bad record in ten that was
    a fifth of the consumer thread's time. Here the trainer thread only queues
    them. ``flush`` is the durability point: it waits for every queued letter to
    be acknowledged and raises if one failed, so a checkpoint or commit never
    covers a dead letter that is not written (a crash before it replays the
    records, and they are dead-lettered again: at-least-once).
    """

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self._producer, self._topic = producer, topic
        self._queue: queue.Queue[list[tuple[Any, Rejection]] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._unsettled: list[Any] = []  # sends not completed yet (writer thread only)
        self._thread = threading.Thread(target=self._run, name="ncf-dead-letters", daemon=True)
        self._thread.start()

    def put(self, letters: list[tuple[Any, Rejection]]) -> None:
        self._queue.put(letters)

    def _run(self) -> None:
        while (letters := self._queue.get()) is not None:
            try:
                for rec, rej in letters:
                    self._unsettled.append(self._producer.send(
                        self._topic, value=rec.value, key=rec.key,
                        headers=[*(rec.headers or []), *dead_letter_headers(rec, rej)],
                    ))
                self._settle()
            except Exception as e:  # raised at the next flush, on the caller's thread
                self._failed(e)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _settle(self) -> None:
        """Note the failure of any send that has completed; keep the rest.

        Cheaper than an errback per record (23 vs 27 us of Python a send); the
        list stays short, as sends complete within a linger or two.
        """
        unsettled = []
        for future in self._unsettled:
            if not future.is_done:
                unsettled.append(future)
            elif future.failed():
                self._failed(future.exception)
        self._unsettled = unsettled

    def _failed(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error

    def flush(self, timeout_s: float = 30.0) -> None:
        self._queue.join()  # the writer has sent everything queued and waits for more
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as e:
            self._failed(e)
        self._settle()
        if self._error is not None:
            raise SourceError(f"could not write dead letters to {self._topic}: {self._error}")

    def close(self) -> None:
        try:
            self.flush(10.0)
        finally:
            self._queue.put(None)
            self._thread.join(10)
            self._producer.close(timeout=10)


def dead_letter_headers(record: Any, rejection: Rejection) -> list[tuple[str, bytes]]:
    return [
        ("reason", rejection.reason.value.encode()),
        ("detail", rejection.detail.encode("utf-8", "replace")),
        ("source", f"{record.topic}[{record.partition}]@{record.offset}".encode()),
    ]


def _event_filter(settings: Settings) -> EventFilter | None:
    if settings.event_types is None and settings.min_weight is None:
        return None
    types = None if settings.event_types is None else frozenset(settings.event_types)
    return EventFilter(types=types, min_weight=settings.min_weight)
