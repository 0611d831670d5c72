"""Kafka ingest: raw kafka-python consume rate next to the source's consume+decode+validate.

    python bench/kafka_io.py [--quick] [--events N] [--partitions P]

Publishes N small JSON events to a fresh topic on the local broker (one is
started unless NCF_STREAM_KAFKA_BOOTSTRAP names one), then reads them all
three ways, each in its own consumer group, in one run:

* ``default``: kafka-python with its default settings (values only);
* ``consume``: kafka-python with the source's tuned settings (values only);
* ``source``: the KafkaSource (the same consumer, plus decode, validate, arrays);
* ``source_10pct_bad``: the same over a topic where one record in ten is
  malformed, each dead-lettered with its reason (the durability issue's target:
  within 20% of the clean rate).

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
from ncf_stream.events import encode_event
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k events instead of 1M")
    parser.add_argument("--events", type=int)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()
    n = args.events or (200_000 if args.quick else 1_000_000)

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
