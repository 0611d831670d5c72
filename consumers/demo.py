"""``ncf-stream demo``: a local broker, a synthetic stream, and the source reading it.

Until the daemon (training and serving) lands, the demo shows the ingest path
end to end: synthetic events, with a few malformed ones mixed in, go through
the real broker into the validating source; the bad ones land in the
dead-letter topic with their reason.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry

from consumers.broker import LocalBroker, create_topics, reachable
from consumers.kafka_source import KafkaSource
from consumers.produce import publish
from ncf_stream.events import encode_event
from ncf_stream.metrics import IngestMetrics
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate

# One in every BAD_EVERY demo records is malformed, to show the dead-letter path.
BAD_EVERY = 200
_BAD_SAMPLES = [b"not json", b'{"user": "1"}', b'{"user": "1", "item": "2", "ts": NaN}', b"[]"]


@contextlib.contextmanager
def broker_for(settings: Settings) -> Iterator[Settings]:
    """Use the configured broker if it answers; otherwise start a local one for the demo."""
    if reachable(settings.kafka_bootstrap):
        print(f"using the Kafka broker at {settings.kafka_bootstrap}")
        yield settings
        return
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    print(f"no broker at {settings.kafka_bootstrap}: starting a local one (deploy/kafka/kafka.sh)")
    with LocalBroker(port=port) as broker:
        yield settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})


def demo_messages(events: int, seed: int) -> list[tuple[bytes | None, bytes]]:
    cfg = SynthConfig(users=max(10, events // 50), items=max(20, events // 100),
                      events=events, seed=seed)
    s = generate(cfg)
    msgs: list[tuple[bytes | None, bytes]] = []
    for n, (u, i, t) in enumerate(zip(s.users.tolist(), s.items.tolist(), s.ts.tolist(),
                                       strict=True)):
        user = str(u)
        msgs.append((user.encode(), encode_event(user, str(i), t)))
        if n % BAD_EVERY == BAD_EVERY - 1:
            msgs.append((None, _BAD_SAMPLES[(n // BAD_EVERY) % len(_BAD_SAMPLES)]))
    return msgs


def run_demo(settings: Settings, events: int = 100_000, rate: float = 5_000.0,
             seed: int = 0) -> None:
    print("ncf-stream demo: training and serving are not built yet; this streams synthetic "
          "events through a real Kafka broker into the validating source.")
    with broker_for(settings) as s:
        create_topics(s.kafka_bootstrap, [s.kafka_topic, s.kafka_dlq_topic])
        msgs = demo_messages(events, seed)
        producer = threading.Thread(
            target=publish, args=(msgs, s, s.kafka_topic, rate), daemon=True
        )
        producer.start()
        print(f"publishing {len(msgs)} records to {s.kafka_topic} at {rate:,.0f}/s; Ctrl-C stops")
        _consume(s, len(msgs), producer)


def _consume(settings: Settings, expected: int, producer: threading.Thread) -> None:
    metrics = IngestMetrics(CollectorRegistry())
    source = KafkaSource(settings, metrics=metrics)
    users: set[str] = set()
    items: set[str] = set()
    consumed = rejected = 0
    last = last_data = time.monotonic()
    try:
        while consumed < expected:
            batch = source.poll(0.5)
            now = time.monotonic()
            if batch is not None:
                consumed += batch.records
                rejected += batch.rejected
                users.update(batch.events.users.tolist())
                items.update(batch.events.items.tolist())
                source.commit(batch.commit_offsets())
                last_data = now
            elif not producer.is_alive() and now - last_data > 15:
                print("the producer stopped and nothing arrived for 15 s; giving up")
                break
            if now - last >= 2.0 or consumed >= expected:
                last = now
                print(f"consumed {consumed}, dead-lettered {rejected}, users {len(users)}, "
                      f"items {len(items)}, lag {source.lag()}")
    except KeyboardInterrupt:
        print("stopping")
    finally:
        source.close()
    ratio = rejected / consumed if consumed else np.nan
    print(f"done: {consumed} records, {rejected} in {settings.kafka_dlq_topic} ({ratio:.2%})")
