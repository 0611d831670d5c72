"""Kafka ingest: raw kafka-python consume rate next to the source's consume+decode+validate.

    python bench/kafka_io.py [--quick] [--events N] [--partitions P]
    python bench/kafka_io.py --sources 1,2,4 [--quick] [--events N] [--partitions P]

Publishes N small JSON events to a fresh topic on the local broker (one is
started unless NCF_STREAM_KAFKA_BOOTSTRAP names one), then reads them all
three ways, each in its own consumer group, in one run:

* ``default``: kafka-python with its default settings (values only);
* ``consume``: kafka-python with the source's tuned settings (values only);
* ``source``: the KafkaSource (the same consumer, plus decode, validate, arrays);
* ``source_10pct_bad``: the same over a topic where one record in ten is
  malformed, each dead-lettered with its reason (the durability issue's target:
  within 20% of the clean rate).

With ``--sources N[,N...]`` it measures instead the daemon's source stack with
``kafka_sources = N`` (consumers.parallel_source: N source processes in one group)
over one topic of ``--partitions`` (8 unless given), each N in a group of its own
that joins before the events are published (no rate counts a join), the ids mapped
on the reading thread as the engine maps them for N > 1. ``kafka_sources = 1`` here
is the same stack with one child (the daemon's N = 1 is ProcessSource, which maps
ids in its child). It needs the cores: on 2 of them the children only take turns.

The last line is a JSON object with the rates and their ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaConsumer, KafkaProducer

from consumers.broker import create_topics, existing_or_local
from consumers.kafka_source import KafkaSource, consumer_config
from consumers.parallel_source import ParallelSource
from ncf_stream.events import encode_event
from ncf_stream.ids import IdMap
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate

BAD = [b"not json", b'{"item": "1"}', b'{"user": [1], "item": "1"}', b"[]",
       b'{"user": "1", "item": "2", "ts": NaN}', b'{"user": "", "item": "2"}']


def publish(bootstrap: str, topic: str, n: int, bad_every: int = 0) -> float:
    """n records; with ``bad_every``, one in that many is malformed."""
    s = generate(SynthConfig(users=max(100, n // 50), items=max(100, n // 100), events=n))
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024,
                             acks=1, metrics_enabled=False)
    start = time.perf_counter()
    for j, (u, i, t) in enumerate(zip(s.users.tolist(), s.items.tolist(), s.ts.tolist(),
                                      strict=True)):
        user = str(u)
        value = (BAD[j % len(BAD)] if bad_every and j % bad_every == 0
                 else encode_event(user, str(i), t))
        producer.send(topic, value=value, key=user.encode())
    producer.flush()
    producer.close()
    return n / (time.perf_counter() - start)


def timed_drain(poll: Any, n: int) -> float:
    """Records per second from the first record to the last (group join excluded)."""
    got, start = 0, None
    deadline = time.monotonic() + 300
    while got < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {got} of {n} records arrived")
        count = poll()
        if count and start is None:
            start = time.perf_counter()
        got += count
    assert start is not None
    return got / (time.perf_counter() - start)


def raw_rate(config: dict[str, Any], topic: str, n: int) -> float:
    consumer = KafkaConsumer(topic, **config)
    try:
        def poll() -> int:
            batch = consumer.poll(timeout_ms=500, max_records=8192)
            return sum(len(v) for v in batch.values())
        return timed_drain(poll, n)
    finally:
        consumer.close()


def source_rate(settings: Settings, n: int) -> float:
    source = KafkaSource(settings)
    try:
        def poll() -> int:
            batch = source.poll(0.5)
            return 0 if batch is None else batch.records
        return timed_drain(poll, n)
    finally:
        source.close()


def settled_source(settings: Settings, sources: int, partitions: int) -> ParallelSource:
    """kafka_sources = ``sources`` in a group of its own, once every child that can hold
    a partition holds some (the topic still empty, so the joins read nothing)."""
    source = ParallelSource(settings.model_copy(update={
        "kafka_sources": sources, "kafka_group_id": f"{settings.kafka_topic}-sources-{sources}",
        "kafka_group_instance_id": f"{settings.kafka_topic}-sources-{sources}",
        "kafka_session_timeout_s": 6.0}))  # the broker's least: members rejoin within 2 s
    deadline = time.monotonic() + 120
    while sum(1 for owned in source.assignment() if owned) < min(sources, partitions):
        if time.monotonic() > deadline:
            source.close()
            raise RuntimeError(f"kafka_sources = {sources}: the group never settled")
        source.poll(0.5)
    return source


def parallel_rate(source: ParallelSource, n: int) -> float:
    """Records per second through ``source``, the ids mapped as the engine maps them."""
    users, items = IdMap(), IdMap()

    got, start = 0, time.perf_counter()  # the group has settled: from the first request
    deadline = time.monotonic() + 300
    while got < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {got} of {n} records arrived")
        batch = source.poll(0.5)
        if batch is not None:
            users.rows(batch.events.users)
            items.rows(batch.events.items)
            got += batch.records
    return got / (time.perf_counter() - start)


def sources_main(args: argparse.Namespace, n: int) -> None:
    counts = [int(c) for c in args.sources.split(",")]
    partitions = args.partitions or 8
    with existing_or_local() as bootstrap:
        topic = f"bench-sources-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=partitions)
        settings = Settings(kafka_bootstrap=bootstrap, kafka_topic=topic,
                            kafka_dlq_topic=f"{topic}.dlq")
        # Every group joins before the events exist, so no rate counts a join (a member's
        # children idle meanwhile: not asked, they fetch nothing).
        ready: list[ParallelSource] = []
        try:
            for count in counts:
                ready.append(settled_source(settings, count, partitions))
            produce = publish(bootstrap, topic, n)
            print(f"published {n} events at {produce:,.0f}/s", file=sys.stderr)
            rates = []
            for count, source in zip(counts, ready, strict=True):
                rates.append(parallel_rate(source, n))
                source.close()
                print(f"kafka_sources = {count}: {rates[-1]:,.0f} events/s", file=sys.stderr)
        finally:
            for source in ready:
                source.close()
    print(json.dumps({
        "events": n, "partitions": partitions, "produce_records_per_s": round(produce),
        "sources": [{"n": c, "events_per_s": round(r)} for c, r in zip(counts, rates,
                                                                       strict=True)],
        f"vs_{counts[0]}": {str(c): round(r / rates[0], 3) for c, r in zip(counts, rates,
                                                                          strict=True)},
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k events instead of 1M")
    parser.add_argument("--events", type=int)
    parser.add_argument("--partitions", type=int, help="4; 8 with --sources")
    parser.add_argument("--sources", help="N[,N...]: measure kafka_sources = N instead")
    args = parser.parse_args()
    n = args.events or (200_000 if args.quick else 1_000_000)
    if args.sources:
        sources_main(args, n)
        return
    args.partitions = args.partitions or 4

    with existing_or_local() as bootstrap:
        topic = f"bench-io-{uuid.uuid4().hex[:8]}"
        bad_topic = f"{topic}-bad"
        create_topics(bootstrap, [topic, f"{topic}.dlq", bad_topic, f"{bad_topic}.dlq"],
                      partitions=args.partitions)
        produce = publish(bootstrap, topic, n)
        publish(bootstrap, bad_topic, n, bad_every=10)
        print(f"published {n} events at {produce:,.0f}/s", file=sys.stderr)

        settings = Settings(kafka_bootstrap=bootstrap, kafka_topic=topic,
                            kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-source")
        tuned = consumer_config(settings) | {"group_id": f"{topic}-raw"}
        default = {"bootstrap_servers": bootstrap, "group_id": f"{topic}-default",
                   "auto_offset_reset": "earliest", "enable_auto_commit": False}
        bad_settings = Settings(kafka_bootstrap=bootstrap, kafka_topic=bad_topic,
                                kafka_dlq_topic=f"{bad_topic}.dlq",
                                kafka_group_id=f"{bad_topic}-source")
        rates = {
            "default_consume_records_per_s": raw_rate(default, topic, n),
            "consume_records_per_s": raw_rate(tuned, topic, n),
            "source_records_per_s": source_rate(settings, n),
            "source_10pct_bad_records_per_s": source_rate(bad_settings, n),
        }
    for name, rate in rates.items():
        print(f"{name}: {rate:,.0f}", file=sys.stderr)
    print(json.dumps({
        "events": n,
        "partitions": args.partitions,
        "produce_records_per_s": round(produce),
        **{k: round(v) for k, v in rates.items()},
        "source_vs_consume": round(
            rates["source_records_per_s"] / rates["consume_records_per_s"], 3),
        "bad_10pct_vs_clean": round(
            rates["source_10pct_bad_records_per_s"] / rates["source_records_per_s"], 3),
        "tuned_vs_default": round(
            rates["consume_records_per_s"] / rates["default_consume_records_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
