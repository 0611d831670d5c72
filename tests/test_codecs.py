"""Batches from a non-Python producer: kcat (librdkafka) with every codec Kafka defines.

Java, Go, C/C++ and .NET clients and Kafka Connect compress their batches; before
the codec packages were dependencies, one lz4 batch sent the source into a spin
and took the daemon down.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import httpx
import pytest
from conftest import kcat_publish, running  # tests/conftest.py

from consumers.broker import create_topics
from consumers.kafka_source import KafkaSource
from ncf_stream.settings import Settings

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def events_for(codec: str, n: int) -> list[dict[str, object]]:
    # Ids unique to this producer and codec: a user seen only through it.
    return [{"user": f"kcat-{codec}-u{i % 37}", "item": f"kcat-i{i % 23}", "ts": 1.7e9 + i}
            for i in range(n)]


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_is_consumed_exactly(kafka_bootstrap: str, codec: str) -> None:
    topic = f"codec-{codec}-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    sent = events_for(codec, 500)
    kcat_publish(kafka_bootstrap, topic, sent, codec)
    s = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=topic,
                 kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g")
    source = KafkaSource(s)
    got: Counter[tuple[str, str]] = Counter()
    records = rejected = 0
    deadline = time.monotonic() + 60
    try:
        while records < len(sent):
            assert time.monotonic() < deadline, f"{records} of {len(sent)} records consumed"
            batch = source.poll(0.5)
            if batch is None:
                continue
            records += batch.records
            rejected += batch.rejected
            got.update(zip(batch.events.users.tolist(), batch.events.items.tolist(),
                           strict=True))
    finally:
        source.close()
    assert records == len(sent) and rejected == 0
    assert got == Counter((e["user"], e["item"]) for e in sent)


def test_a_topic_of_mixed_codecs_is_served(kafka_bootstrap: str) -> None:
    """Every codec in one topic, through the daemon: counts exact, and a user seen only
    through kcat gets model recommendations (not the cold-start answer)."""
    topic = f"codecs-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    total = 0
    for codec in CODECS:
        events = events_for(codec, 300)
        kcat_publish(kafka_bootstrap, topic, events, codec)
        total += len(events)
    s = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=topic,
                 kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g", http_port=0,
                 grpc_port=0, device="cpu", eval_interval_s=3600, shutdown_grace_s=1.0)
    with running(s) as (daemon, thread):
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=10) as c:
            deadline = time.monotonic() + 90
            while True:
                assert thread.is_alive(), "the daemon stopped"
                try:
                    status = c.get("/v1/status").json()
                except httpx.TransportError:
                    status = {}
                if status.get("snapshot_events", 0) >= total:
                    break
                assert time.monotonic() < deadline, f"not consumed in time: {status}"
                time.sleep(0.2)
            assert status["events_consumed"] == total and status["events_rejected"] == 0
            reply = c.post("/v1/recommend", json={"user": "kcat-lz4-u5", "k": 5}).json()
        assert reply["cold_start"] is False and len(reply["items"]) == 5
