"""Shared fixtures. Integration tests get a real Kafka broker from one session fixture."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from consumers.broker import create_topics, existing_or_local
from consumers.daemon import Daemon
from ncf_stream.events import Events, encode_event
from ncf_stream.model import NeuMFConfig
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.source import EventSource, MemorySource, Partition
from ncf_stream.store import split_keys
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer, TrainerConfig

# Every user evaluated: the tests measure on a few hundred users.
SMALL = TrainerConfig(batch_size=2048, model=NeuMFConfig(factors=8, mlp_layers=(16, 8, 4)),
                      holdout_fraction=1.0)

# Daemons in tests do not checkpoint unless a test gives them a directory of their
# own: a shared one would let one test's daemon restore another's state.
os.environ["NCF_STREAM_CHECKPOINT_DIR"] = ""


def train_stream(trainer: Trainer, events: Events, poll: int, replay_steps: int) -> Trainer:
    """Each poll of ``poll`` events trained until drained, then ``replay_steps`` steps.

    Deterministic, unlike the engine's loop (whose slices are timed), for tests that
    need a trained model rather than the loop itself."""
    source = MemorySource(events, batch_size=poll)
    while (batch := source.poll()) is not None:
        trainer.ingest(batch.events)
        while trainer.pending:
            trainer.step()
    for _ in range(replay_steps):
        trainer.step()
    return trainer


@pytest.fixture(scope="module")
def trained() -> Iterator[tuple[Trainer, SnapshotHolder, Publisher]]:
    """A small model trained on a planted stream (12k events), its snapshot published."""
    stream = generate(SynthConfig(users=300, items=250, events=12_000, seed=2, topics=6))
    trainer = Trainer(SMALL)
    holder = SnapshotHolder()
    publisher = Publisher(trainer, holder)
    train_stream(trainer, stream.to_events(), poll=3000, replay_steps=30)
    publisher.publish(12_000)
    yield trainer, holder, publisher
    publisher.close()


def swapped_stream(seed: int, n_users: int = 40, n_items: int = 60,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, items_alt, ts): one stream, and the same with each of the first
    ``n_users`` users' newest item (their hold-out) replaced by another item that user
    never touched. A last user touches the whole catalogue first, so both streams have
    the same catalogue in the same order; every tenth user has touched most of it."""
    rng = np.random.default_rng(seed)
    users, items, alt = [n_users] * n_items, list(range(n_items)), []
    for u in range(n_users):
        size = int(rng.integers(50, 55)) if u % 10 == 0 else int(rng.integers(3, 30))
        chosen = rng.permutation(n_items)[: size + 1]  # the last one stays untouched
        users += [u] * size
        items += chosen[:size].tolist()
        alt.append(int(chosen[size]))
    u, i = np.array(users), np.array(items)
    last = np.array([np.flatnonzero(u == x).max() for x in range(n_users)])
    i_alt = i.copy()
    i_alt[last] = alt
    return u, i, i_alt, np.arange(len(u), dtype=np.float64)


@contextlib.contextmanager
def running(settings: Settings, source: EventSource | None = None,
            ) -> Iterator[tuple[Daemon, threading.Thread]]:
    """A daemon serving on a thread of its own (Kafka unless ``source``), stopped on exit."""
    daemon = Daemon(settings, source)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        yield daemon, thread
    finally:
        daemon.stop()
        thread.join(30)


def same_content(got: Trainer, want: Trainer) -> None:
    """The same store by external ids, whatever order partitions interleaved in."""
    def pairs(t: Trainer) -> set[tuple[str, str]]:
        keys, _ = t.store._pairs.arrays()
        users, items = split_keys(keys)
        return set(zip(t.user_ids.ids(users).tolist(), t.item_ids.ids(items).tolist(),
                       strict=True))

    def holdouts(t: Trainer) -> dict[str, str]:
        h = t.store.holdout()
        return dict(zip(t.user_ids.ids(h.users).tolist(), t.item_ids.ids(h.items).tolist(),
                        strict=True))

    assert pairs(got) == pairs(want)
    assert holdouts(got) == holdouts(want)
    assert got.store.events == want.store.events  # no event applied twice
    assert got.store.repeats == want.store.repeats


def bench_module(name: str) -> ModuleType:
    """``bench/<name>.py`` imported as a module (bench/ is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def require_program(*names: str, why: str = ".ci/run installs it") -> str:
    """The path of the first of ``names`` on PATH. Missing: a skip on a developer's
    machine, a failure under CI=true, where a skipped real part would pass unseen."""
    for name in names:
        if (path := shutil.which(name)) is not None:
            return path
    message = f"{names[0]} is not installed ({why})"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """An existing broker when NCF_STREAM_KAFKA_BOOTSTRAP is set, else a fresh local one."""
    with existing_or_local() as bootstrap:
        yield bootstrap


@pytest.fixture
def topics(kafka_bootstrap: str) -> tuple[str, str]:
    """A fresh (topic, dead-letter topic) pair, so tests never see each other's records."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    create_topics(kafka_bootstrap, [name, f"{name}.dlq"], partitions=3)
    return name, f"{name}.dlq"


def committed(bootstrap: str, group: str) -> dict[Partition, int]:
    """The offsets consumer group ``group`` has committed, per partition."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets(group)[group]
    finally:
        admin.close()
    return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items()}


def partitioned_topic(bootstrap: str, prefix: str, partitions: int) -> str:
    """A fresh topic of ``partitions`` partitions and its dead-letter topic; the topic's name."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    create_topics(bootstrap, [name, f"{name}.dlq"], partitions=partitions)
    return name


def publish_keyed(bootstrap: str, topic: str, events: Events,
                  partition: int | None = None) -> None:
    """``events`` keyed by user, as the event contract asks (so each user to one
    partition), or all to ``partition``."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    for u, i, t in zip(events.users.tolist(), events.items.tolist(), events.ts.tolist(),
                       strict=True):
        producer.send(topic, encode_event(u, i, t), key=u.encode(), partition=partition)
    producer.flush()
    producer.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Whatever needs the broker is an integration test, so `-m "not integration"` skips it."""
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


def kcat_publish(bootstrap: str, topic: str, events: list[dict[str, object]], codec: str,
                 partition: int | None = None) -> None:
    """Publish with kcat (librdkafka), keyed by user as the event contract asks, one
    compressed batch per linger; to ``partition`` when given, else by key."""
    kcat = require_program("kcat")
    lines = "".join(f"{e['user']}\t{json.dumps(e)}\n" for e in events)
    where = [] if partition is None else ["-p", str(partition)]
    subprocess.run([kcat, "-P", "-b", bootstrap, "-t", topic, "-z", codec, "-K", "\t",
                    "-X", "linger.ms=50", *where], input=lines, text=True, check=True,
                   timeout=60)


def read_topic(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0) -> list[Any]:
    """Up to ``count`` records of ``topic`` from its start (a dead-letter topic, say)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=2000)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count and time.monotonic() < deadline:
        out.extend(consumer)
    consumer.close()
    return out


def small_engine_settings(tmp_path: Path | None = None, **overrides: Any) -> Settings:
    """A tiny CPU engine that publishes on every cycle and never evaluates on its own."""
    base: dict[str, Any] = dict(device="cpu", factors=8, mlp_layers=[16, 8], batch_size=512,
                                eval_interval_s=3600.0, replay=False, publish_every_s=1e-6)
    return Settings(**(base | overrides),
                    checkpoint_dir=None if tmp_path is None else str(tmp_path))


def drain_engine(engine: Any, after: int = 1) -> None:
    """Cycle until the source is drained and every fresh positive trained, then ``after``
    more cycles (replay steps, a publish)."""
    for _ in range(400):
        engine.cycle()
        if engine.source is not None and engine.source.lag() == 0 and not engine.trainer.pending:
            break
    for _ in range(after):
        engine.cycle()
