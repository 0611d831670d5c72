"""Several source processes feeding one engine (kafka_sources > 1), against the real broker.

The promise is the one source's: every event's effect on the store exactly once,
through rebalances that move partitions between the children, a checkpoint and
restart, and a child killed mid-stream. Each test compares the engine's store with
a reference trainer fed every event once, in published order (conftest.same_content:
partitions interleave differently, each user's events stay in order).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import (  # tests/conftest.py
    committed,
    partitioned_topic,
    running,
    same_content,
    small_engine_settings,
)
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import MemberToRemove

from consumers.broker import create_topics
from consumers.parallel_source import Continuity, ParallelSource, member_settings
from consumers.source_process import ProcessSource
from ncf_stream.engine import Engine, Resume
from ncf_stream.events import Events, encode_event
from ncf_stream.settings import Settings
from ncf_stream.source import EventBatch, EventSource, Partition
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer, TrainerConfig

PARTITIONS = 4
EVENTS = 4000


# ---- the continuity test, alone ------------------------------------------------------------

def _batch(offsets: dict[Partition, tuple[int, int]]) -> EventBatch:
    return EventBatch(Events.from_rows([]), offsets)


def test_a_batch_is_admitted_only_where_the_engine_is() -> None:
    """The race a rebalance allows: the old owner's batch of partition 0 arrives after
    the new owner's, which read from the same place. The second is refused whole, and
    its sender is sent back to the engine's positions, its other partitions included."""
    gate = Continuity({("t", 0): 100})
    assert gate.admit(_batch({("t", 0): (100, 150)}), {("t", 0): 100}) == {}
    assert gate.next == {("t", 0): 150}
    late = _batch({("t", 0): (100, 130), ("t", 1): (0, 10)})
    assert gate.admit(late, {("t", 0): 100, ("t", 1): None}) == {("t", 0): 150, ("t", 1): None}
    assert gate.next == {("t", 0): 150}  # nothing of a refused batch counts
    # A partition the engine has never seen is read from its beginning (base None) once.
    assert gate.admit(_batch({("t", 1): (0, 10)}), {("t", 1): None}) == {}
    assert gate.admit(_batch({("t", 1): (0, 5)}), {("t", 1): None}) == {("t", 1): 10}
    # A child that jumped ahead of the engine (its own positions) is refused too: a gap.
    assert gate.admit(_batch({("t", 0): (170, 180)}), {("t", 0): 170}) == {("t", 0): 150}
    # A base is where the child read from, not the first record's offset: offsets the
    # topic skips (transaction markers, compaction) do not break the chain.
    assert gate.admit(_batch({("t", 0): (151, 160)}), {("t", 0): 150}) == {}


def test_each_member_has_a_static_id_of_its_own() -> None:
    s = Settings(kafka_group_instance_id="ncf-host-7", kafka_sources=3)
    assert [member_settings(s, i).kafka_group_instance_id for i in range(3)] == [
        "ncf-host-7-0", "ncf-host-7-1", "ncf-host-7-2"]
    assert member_settings(Settings(), 1).kafka_group_instance_id == ""  # dynamic stays so


# ---- against the broker --------------------------------------------------------------------

@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return partitioned_topic(kafka_bootstrap, "par", PARTITIONS)


@pytest.fixture
def stream() -> Events:
    return generate(SynthConfig(users=120, items=80, events=EVENTS, seed=7, topics=4)).to_events()


def settings_for(bootstrap: str, topic: str, tmp_path: Path | None = None,
                 sources: int = 2) -> Settings:
    # Small polls, so the stream spans many batches and rebalances fall among them; the
    # shortest session the broker allows, so members learn of a rebalance within 2 s.
    return small_engine_settings(
        tmp_path, kafka_bootstrap=bootstrap, kafka_topic=topic, kafka_dlq_topic=f"{topic}.dlq",
        kafka_group_id=f"{topic}-g", kafka_group_instance_id=f"{topic}-m",
        kafka_sources=sources, kafka_max_poll_records=200, kafka_session_timeout_s=6.0)


def parallel(s: Settings) -> object:
    def factory(resume: Resume) -> EventSource:
        return ParallelSource(s, metrics=resume.metrics, positions=resume.positions)
    return factory


def publish(bootstrap: str, topic: str, events: Events, lo: int, hi: int) -> None:
    """Events lo..hi, keyed by user as the contract asks (so by user to a partition)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for u, i, t in zip(events.users[lo:hi].tolist(), events.items[lo:hi].tolist(),
                       events.ts[lo:hi].tolist(), strict=True):
        producer.send(topic, encode_event(u, i, t), key=u.encode())
    producer.flush()
    producer.close()


def reference(s: Settings, events: Events) -> Trainer:
    trainer = Trainer(TrainerConfig.from_settings(s))
    trainer.ingest(events)
    return trainer


def consume(engine: Engine, records: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.counters.consumed < records:
        assert time.monotonic() < deadline, engine.status()
        engine.cycle()
    assert engine.counters.consumed == records


def source_of(engine: Engine) -> ParallelSource:
    assert isinstance(engine.source, ParallelSource)
    return engine.source


def split_between_children(engine: Engine, timeout_s: float = 30.0) -> list[set[Partition]]:
    """Cycle until every child holds partitions, all of them between the children."""
    deadline = time.monotonic() + timeout_s
    while True:
        engine.cycle()
        owned = source_of(engine).assignment()
        if all(owned) and len(set().union(*owned)) == PARTITIONS:
            return owned
        assert time.monotonic() < deadline, owned


def test_two_sources_over_four_partitions_apply_every_event_once(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    """Half the stream waits before the children join (the first takes every partition,
    then hands two on: the rebalance whose reads must not overlap); half comes after."""
    s = settings_for(kafka_bootstrap, topic)
    publish(kafka_bootstrap, topic, stream, 0, EVENTS // 2)
    engine = Engine(s, parallel(s))
    try:
        owned = split_between_children(engine)
        publish(kafka_bootstrap, topic, stream, EVENTS // 2, EVENTS)
        consume(engine, EVENTS)
        engine.cycle()  # nothing more arrives
        assert engine.counters.consumed == EVENTS
    finally:
        engine.close(final_checkpoint=False)
    assert len(owned) == 2 and not owned[0] & owned[1]
    same_content(engine.trainer, reference(s, stream))


def end_offset(bootstrap: str, topic: str, partition: int) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tp = TopicPartition(topic, partition)
        return int(consumer.end_offsets([tp])[tp])
    finally:
        consumer.close()


def leave(bootstrap: str, group: str, instance: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.remove_group_members(group, [MemberToRemove(group_instance_id=instance)])
    finally:
        admin.close()


class ThirdMember:
    """A static member of the engine's group outside it, polled on a thread of its own.

    Polled without gaps: kafka-python 3.0.12 runs a join on its IO thread, and a poll
    that times out mid-join and comes back after the join completed sends another
    JoinGroup (see kafka_source.UNASSIGNED_REJOIN_S). A member polled in short bursts
    between engine cycles can so restart the group's rebalance: the suspect in a CI run
    where the children had not settled 30 s after the third member joined."""

    def __init__(self, bootstrap: str, topic: str, group: str, instance: str) -> None:
        self.consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                      group_instance_id=instance, enable_auto_commit=False,
                                      session_timeout_ms=6000, heartbeat_interval_ms=2000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="third-member", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.consumer.poll(timeout_ms=500)

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment())

    def close(self) -> None:
        """Stop polling and close without leaving: a static member is removed by admin."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=30)
            self.consumer.close(autocommit=False)


def test_partitions_moved_by_rebalances_are_read_on_from_the_engine_positions(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    """A third member joins the group and leaves again, so partitions move between the
    children: a child given one reads it from its own stale position first (the start's,
    or where it was before it lost it), the batch is refused, and the child reads on from
    the engine's. Still every event once."""
    s = settings_for(kafka_bootstrap, topic)
    publish(kafka_bootstrap, topic, stream, 0, EVENTS // 2)
    engine = Engine(s, parallel(s))
    other: ThirdMember | None = None
    try:
        split_between_children(engine)
        consume(engine, EVENTS // 2)
        # A static member whose id sorts first: range assignment gives it partitions 0 and
        # 1 and moves 2 from the second child to the first; its leaving moves 2 back.
        other = ThirdMember(kafka_bootstrap, topic, s.kafka_group_id, "aaa-other")
        # Generous: under a loaded CI machine a rebalance can take more than one round.
        deadline = time.monotonic() + 90
        while (owned := source_of(engine).assignment()) != [{(topic, 2)}, {(topic, 3)}]:
            assert time.monotonic() < deadline, (owned, other.assignment(), engine.status())
            engine.cycle()
        publish(kafka_bootstrap, topic, stream, EVENTS // 2, EVENTS)
        consume_until, end = time.monotonic() + 30, end_offset(kafka_bootstrap, topic, 2)
        while engine.positions.get((topic, 2), 0) < end:  # the first child read it all
            assert time.monotonic() < consume_until
            engine.cycle()
        other.close()
        leave(kafka_bootstrap, s.kafka_group_id, "aaa-other")  # a static member must be removed
        consume(engine, EVENTS, timeout_s=90)
        refused = source_of(engine).refused
    finally:
        if other is not None:
            other.close()  # again: a no-op
        engine.close(final_checkpoint=False)
    # Partition 2 was read by the first child from the beginning, then by the second
    # from where it had left it: each refused once at least.
    assert refused >= 2
    same_content(engine.trainer, reference(s, stream))


def test_commit_and_restart_from_a_checkpoint_resume_without_loss_or_repeat(
    kafka_bootstrap: str, topic: str, stream: Events, tmp_path: Path
) -> None:
    """The checkpoint's offsets reach the group, each partition's from its owner; a
    restart from that checkpoint, after more was consumed and lost with the process,
    applies the rest once."""
    s = settings_for(kafka_bootstrap, topic, tmp_path)
    engine = Engine(s, parallel(s))
    try:
        split_between_children(engine)
        publish(kafka_bootstrap, topic, stream, 0, EVENTS // 2)
        consume(engine, EVENTS // 2)
        engine.checkpoint()
        saved = dict(engine.positions)
        assert len(saved) == PARTITIONS
        assert committed(kafka_bootstrap, s.kafka_group_id) == saved
        publish(kafka_bootstrap, topic, stream, EVENTS // 2, EVENTS)
        consume(engine, EVENTS)  # applied in memory, never checkpointed: a crash
    finally:
        engine.close(final_checkpoint=False)

    again = Engine(s, parallel(s))
    try:
        assert again.positions == saved and again.counters.consumed == EVENTS // 2
        consume(again, EVENTS)
    finally:
        again.close(final_checkpoint=False)
    same_content(again.trainer, reference(s, stream))


def test_a_child_killed_mid_stream_is_rebuilt_and_nothing_is_lost_or_repeated(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    s = settings_for(kafka_bootstrap, topic)
    publish(kafka_bootstrap, topic, stream, 0, EVENTS)
    engine = Engine(s, parallel(s))
    try:
        split_between_children(engine)
        consume_until = time.monotonic() + 60
        while engine.counters.consumed < EVENTS // 3:
            assert time.monotonic() < consume_until
            engine.cycle()
        killed = source_of(engine)
        os.kill(killed._children[1]._proc.pid, signal.SIGKILL)
        consume(engine, EVENTS)
        assert engine.source is not killed and engine.health.up
    finally:
        engine.close(final_checkpoint=False)
    reg = engine.metrics.registry
    assert reg.get_sample_value("ncf_stream_source_restarts_total", {"reason": "poll"}) == 1
    same_content(engine.trainer, reference(s, stream))


def test_a_child_told_to_seek_reads_from_there_again(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    """The child's side of a refusal: a poll request with seeks reads those partitions
    again from there (a batch fetched ahead over them is dropped), and says so in its
    bases."""
    s = settings_for(kafka_bootstrap, topic, sources=1)
    publish(kafka_bootstrap, topic, stream, 0, 1000)
    child = ProcessSource(s)
    try:
        first = None
        deadline = time.monotonic() + 30
        while first is None or first.batch is None:
            assert time.monotonic() < deadline
            child.request_poll(time.monotonic() + 0.5)
            first = child.delivery()
        tp, (lo, _) = next(iter(first.batch.offsets.items()))
        assert first.bases[tp] is None  # from the beginning: the state knew nothing
        seen: list[tuple[int, int]] = []
        seeks: dict[Partition, int | None] | None = {tp: lo}
        while not seen:
            assert time.monotonic() < deadline
            child.request_poll(time.monotonic() + 0.5, seeks)
            seeks = None
            d = child.delivery()
            if d.batch is not None and tp in d.batch.offsets:
                assert d.bases[tp] == lo
                seen.append(d.batch.offsets[tp])
    finally:
        child.close()
    assert seen[0][0] == lo < seen[0][1]  # the same records again, not what followed


def test_more_sources_than_partitions_warns_once(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"par-{uuid.uuid4().hex[:10]}"
    create_topics(kafka_bootstrap, [name, f"{name}.dlq"], partitions=2)
    s = settings_for(kafka_bootstrap, name, sources=3)
    with caplog.at_level("WARNING", logger="consumers.parallel_source"):
        for _ in range(2):  # a rebuilt source says it no more
            ParallelSource(s).close()
    assert [r.getMessage() for r in caplog.records] == [
        f"kafka_sources = 3 but {name} has 2 partitions: 1 of the source processes will "
        "sit idle"]


def test_the_daemon_runs_kafka_sources_children(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    s = settings_for(kafka_bootstrap, topic).model_copy(update={
        "kafka_group_instance_id": "", "http_port": 0, "grpc_port": 0, "shutdown_grace_s": 1.0})
    publish(kafka_bootstrap, topic, stream, 0, EVENTS)
    with running(s) as (daemon, _):
        deadline = time.monotonic() + 60
        while daemon.engine.counters.consumed < EVENTS:
            assert time.monotonic() < deadline, daemon.engine.status()
            time.sleep(0.1)
        assert isinstance(daemon.engine.source, ParallelSource)
        assert len(daemon.engine.source._children) == 2
