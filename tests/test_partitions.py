"""Users whose events arrive in more than one partition: the event contract keys events
by user, and a group of trainers would split such a user's state between workers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import kcat_publish, small_engine_settings  # tests/conftest.py
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from consumers.kafka_source import KafkaSource
from consumers.source_process import ProcessSource
from ncf_stream.engine import Engine, Resume
from ncf_stream.settings import Settings
from ncf_stream.source import EventSource, UserPartitions


def test_user_partitions_match_a_brute_force_reference() -> None:
    """Random batches with repeats, several partitions per user within one batch and
    across batches, deleted users (-1): each user counted once, when first seen in a
    second partition."""
    rng = np.random.default_rng(0)
    tracker = UserPartitions()
    seen: dict[int, set[int]] = {}
    for _ in range(60):
        n = int(rng.integers(1, 50))
        users = rng.integers(-1, 3000, n)  # rows past the initial 1024: growth
        # Most users stay in the partition their row suggests; a few stray.
        parts = np.where(rng.random(n) < 0.03, rng.integers(0, 4, n), users % 4)
        before = sum(len(p) > 1 for p in seen.values())
        for u, p in zip(users.tolist(), parts.tolist(), strict=True):
            if u >= 0:
                seen.setdefault(u, set()).add(p)
        after = sum(len(p) > 1 for p in seen.values())
        assert tracker.observe(users, parts) == after - before
    assert after > 5  # the test saw splits at all


def settings_for(bootstrap: str, topics: tuple[str, str]) -> Settings:
    return small_engine_settings(kafka_bootstrap=bootstrap, kafka_topic=topics[0],
                                 kafka_dlq_topic=topics[1], kafka_group_id=f"{topics[0]}-g")


def in_process(s: Settings) -> Callable[[Resume], EventSource]:
    return lambda resume: KafkaSource(s, metrics=resume.metrics,
                                      positions=lambda: resume.positions)


def in_child(s: Settings) -> Callable[[Resume], EventSource]:
    """The daemon's default: a source process that maps ids itself."""
    return lambda resume: ProcessSource(s, metrics=resume.metrics, positions=resume.positions,
                                        id_maps=(resume.user_ids, resume.item_ids))


def event(user: str, item: str, ts: float) -> dict[str, object]:
    return {"user": user, "item": item, "ts": ts}


@pytest.mark.parametrize("make", [in_process, in_child], ids=["in-process", "child-maps-ids"])
def test_a_user_sent_to_two_partitions_is_counted_and_keyed_users_are_not(
    kafka_bootstrap: str, topics: tuple[str, str], make: Any
) -> None:
    """Keyed by user, by kafka-python's murmur2 partitioner and by kcat's (librdkafka's
    CRC32 one), no user is split; one user sent to partitions 0 and 2 by hand is, once,
    however many more events it sends there."""
    s = settings_for(kafka_bootstrap, topics)
    topic = topics[0]
    kcat_publish(kafka_bootstrap, topic, [event(f"c{u}", f"i{i}", 1.0 + i)
                                          for u in range(6) for i in range(5)], "none")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    sent = 30
    for u in range(6):
        for i in range(5):
            producer.send(topic, json.dumps(event(f"k{u}", f"i{i}", 1.0 + i)).encode(),
                          key=f"k{u}".encode())
            sent += 1
    for n, partition in enumerate([0, 0, 2, 2, 0, 2]):
        producer.send(topic, json.dumps(event("stray", f"i{n}", 10.0 + n)).encode(),
                      partition=partition)
        sent += 1
    producer.flush()
    producer.close()
    registry = CollectorRegistry()
    engine = Engine(s, make(s), registry=registry)
    try:
        deadline = time.monotonic() + 60
        while engine.counters.consumed < sent:
            assert time.monotonic() < deadline, engine.status()
            engine.cycle()
        assert engine.counters.consumed == sent
        assert engine.split_users == 1
        assert registry.get_sample_value(
            "ncf_stream_users_in_several_partitions_total") == 1.0
    finally:
        engine.close(final_checkpoint=False)
