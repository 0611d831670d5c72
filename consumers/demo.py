"""``ncf-stream demo``: the daemon on a local broker, fed a synthetic stream.

Uses the broker at the configured bootstrap address when one answers, else
starts a local one (deploy/kafka/kafka.sh) and stops it afterwards. A
producer thread publishes a seeded synthetic stream (planted taste clusters,
long-tail popularity, one malformed record in 200 to show the dead-letter
path) at ``rate`` events per second while the daemon consumes, trains and
serves. Ctrl-C stops everything.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from consumers.broker import LocalBroker, create_topics, reachable
from consumers.daemon import Daemon, serve_until_signalled
from consumers.produce import publish
from ncf_stream.events import encode_event
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate

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
    cfg = SynthConfig(users=max(10, events // 100), items=max(20, events // 500), events=events,
                      seed=seed)
    s = generate(cfg)
    msgs: list[tuple[bytes | None, bytes]] = []
    for n, (u, i, t) in enumerate(zip(s.users.tolist(), s.items.tolist(), s.ts.tolist(),
                                       strict=True)):
        user = str(u)
        msgs.append((user.encode(), encode_event(user, str(i), t)))
        if n % BAD_EVERY == BAD_EVERY - 1:
            msgs.append((None, _BAD_SAMPLES[(n // BAD_EVERY) % len(_BAD_SAMPLES)]))
    return msgs


def run_demo(settings: Settings, events: int, rate: float, seed: int) -> None:
    """``events``, ``rate``, ``seed``: see ``ncf-stream demo --help`` (their defaults)."""
    with broker_for(settings) as s:
        create_topics(s.kafka_bootstrap, [s.kafka_topic, s.kafka_dlq_topic])
        msgs = demo_messages(events, seed)
        stop = threading.Event()
        producer = threading.Thread(target=publish, args=(msgs, s, s.kafka_topic, rate),
                                    kwargs={"stop": stop}, daemon=True, name="demo-producer")
        producer.start()
        print(f"demo: publishing {len(msgs):,} synthetic events to {s.kafka_topic} at "
              f"{rate:,.0f}/s (try: curl -s localhost:{s.http_port}/v1/recommend "
              f"-d '{{\"user\": \"1\", \"k\": 5}}')")
        try:
            serve_until_signalled(Daemon(s))
        finally:
            # The producer flushes and closes while the broker is still up (it stops when
            # this block ends); left to interpreter exit, its flush timed out on a gone broker.
            stop.set()
            producer.join(15)
