"""Crashes, broker outages and bad input at volume, against the real broker.

The promise: every event's effect on the store is applied exactly once, the
daemon keeps serving from its last snapshot while the broker is away, and
every bad record ends in the dead-letter topic with its reason.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import running, same_content  # tests/conftest.py
from kafka import KafkaConsumer, KafkaProducer
from malformed import MALFORMED  # tests/malformed.py

from consumers.broker import LocalBroker, create_topics, free_port
from consumers.daemon import Daemon
from consumers.produce import file_messages, publish
from ncf_stream import checkpoint
from ncf_stream.events import Reason
from ncf_stream.faults import KILL_AT_ENV
from ncf_stream.readers import read_events
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate, write
from ncf_stream.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.slow


def reference(path: Path) -> Trainer:
    """The uninterrupted run: every event once, in published order."""
    trainer = Trainer(TrainerConfig(replay=False))
    trainer.ingest(read_events(path).events)
    return trainer


def same_state(got: Trainer, want: Trainer) -> None:
    assert got.user_ids.all_ids().tolist() == want.user_ids.all_ids().tolist()
    assert got.item_ids.all_ids().tolist() == want.item_ids.all_ids().tolist()
    assert len(got.store) == len(want.store)
    gk, _ = got.store._pairs.arrays()
    wk, _ = want.store._pairs.arrays()
    assert np.array_equal(gk, wk)
    assert np.array_equal(got.store.holdout().items, want.store.holdout().items)
    assert got.store.events == want.store.events  # no event applied twice
    assert got.store.repeats == want.store.repeats


def wait_status(port: int, until, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=2).json()
            if until(last):
                return last
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out; last status {last}")


# Where a kill -9 must lose nothing (ncf_stream.faults), in an order that keeps every run
# consuming before it dies: the stream is still flowing, or a backlog is waiting.
KILLS = ("checkpoint-written:1", "ingest:3", "checkpoint-renamed:1", "publish:2", "ingest:4")


def test_kill_9_at_every_crash_point_applies_every_event_exactly_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"crash-{time.time_ns()}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    path = tmp_path / "stream.csv"
    n = 30_000
    write(generate(SynthConfig(users=2000, items=800, events=n, seed=21, topics=10)), path)
    ckpt = tmp_path / "ckpt"
    http_port = free_port()
    env = {**os.environ, "NCF_STREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "NCF_STREAM_KAFKA_TOPIC": topic, "NCF_STREAM_KAFKA_DLQ_TOPIC": f"{topic}.dlq",
           "NCF_STREAM_KAFKA_GROUP_ID": f"{topic}-g", "NCF_STREAM_CHECKPOINT_DIR": str(ckpt),
           "NCF_STREAM_CHECKPOINT_EVERY_S": "0.3", "NCF_STREAM_DEVICE": "cpu",
           "NCF_STREAM_HTTP_PORT": str(http_port), "NCF_STREAM_GRPC_PORT": str(free_port()),
           "NCF_STREAM_EVAL_INTERVAL_S": "3600", "NCF_STREAM_KAFKA_MAX_POLL_RECORDS": "500",
           "NCF_STREAM_PUBLISH_EVERY_S": "0.5",
           # A killed member holds its partitions until its session expires: the broker's
           # minimum before each restart can consume.
           "NCF_STREAM_KAFKA_SESSION_TIMEOUT_S": "6"}
    settings = Settings(kafka_bootstrap=kafka_bootstrap)
    messages = file_messages(path, None, None, False, lambda _: None)
    producer = threading.Thread(target=publish, args=(messages, settings, topic, 1000.0))
    producer.start()

    def start(kill_at: str | None = None) -> subprocess.Popen:
        extra = {KILL_AT_ENV: kill_at} if kill_at else {}
        return subprocess.Popen([sys.executable, "-m", "consumers.cli", "serve"],
                                env={**env, **extra}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    for point in KILLS:
        proc = start(point)
        try:
            assert proc.wait(90) == -signal.SIGKILL, f"{point}: not reached"
        finally:
            if proc.poll() is None:
                proc.kill()
    producer.join()
    proc = start()
    try:
        status = wait_status(http_port, lambda s: s["events_consumed"] >= n and
                             s["snapshot_events"] >= n, timeout=120)
        assert status["events_consumed"] == n  # counted once, across the crashes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # writes the final checkpoint
    finally:
        if proc.poll() is None:
            proc.kill()
    restored = Trainer(TrainerConfig(replay=False))
    assert checkpoint.load_latest(ckpt, restored) is not None
    same_content(restored, reference(path))


def test_broker_outage_serves_from_the_last_snapshot_and_loses_nothing(tmp_path: Path) -> None:
    broker = LocalBroker(state_dir=tmp_path / "kafka").start()
    try:
        topic = "outage"
        create_topics(broker.bootstrap, [topic, f"{topic}.dlq"], partitions=1)
        path = tmp_path / "stream.csv"
        n = 12_000
        write(generate(SynthConfig(users=500, items=300, events=n, seed=3, topics=5)), path)
        s = Settings(kafka_bootstrap=broker.bootstrap, kafka_topic=topic,
                     kafka_dlq_topic=f"{topic}.dlq", kafka_group_id="outage-g", http_port=0,
                     grpc_port=0, device="cpu", eval_interval_s=3600, publish_every_s=0.3,
                     checkpoint_dir=str(tmp_path / "ckpt"), replay=False)  # a still snapshot
        messages = file_messages(path, None, None, False, lambda _: None)
        publish(messages[: n // 2], s, topic)
        daemon = Daemon(s)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{daemon.http_port}"
        wait_status(daemon.http_port, lambda st: st["snapshot_events"] >= n // 2)
        before = httpx.post(f"{url}/v1/recommend", json={"user": "3", "k": 5}).json()

        broker.stop()
        time.sleep(3)  # the consumer notices and keeps retrying
        during = httpx.post(f"{url}/v1/recommend", json={"user": "3", "k": 5})
        assert during.status_code == 200 and during.json() == before  # the last snapshot
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert thread.is_alive()

        broker.start()
        publish(messages[n // 2:], s, topic)
        wait_status(daemon.http_port, lambda st: st["snapshot_events"] >= n, timeout=120)
        daemon.stop()
        thread.join(30)
        same_state(daemon.engine.trainer, reference(path))
    finally:
        broker.keep_state = False
        broker.stop()


def test_ten_percent_bad_records_all_dead_lettered_counters_exact(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"bad-{time.time_ns()}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=3)
    good_n = 9000
    path = tmp_path / "good.csv"
    write(generate(SynthConfig(users=300, items=200, events=good_n, seed=4, topics=5)), path)
    good = file_messages(path, None, None, False, lambda _: None)
    rng = random.Random(1)
    bad = [MALFORMED[i % len(MALFORMED)] for i in range(good_n // 9)]  # 10% of all records
    mixed: list[tuple[bytes | None, bytes]] = list(good)
    for raw, _ in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), (None, raw))
    s = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=topic,
                 kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g", http_port=0,
                 grpc_port=0, device="cpu", eval_interval_s=3600, replay=False)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    publish(mixed, s, topic, producer=producer)
    producer.close()
    with running(s) as (daemon, _thread):
        status = wait_status(daemon.http_port, lambda st: st["events_consumed"] >= len(mixed))
        assert status["events_consumed"] == len(mixed)
        assert status["events_rejected"] == len(bad)
        reg = daemon.metrics.registry
        want = Counter(reason.value for _, reason in bad)
        for reason in Reason:
            assert reg.get_sample_value("ncf_stream_events_rejected_total",
                                        {"reason": reason.value}) == want.get(reason.value, 0)
        assert daemon.engine.trainer.store.events == good_n
    consumer = KafkaConsumer(f"{topic}.dlq", bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    dead = list(consumer)
    consumer.close()
    assert Counter((r.value, dict(r.headers)["reason"].decode()) for r in dead) == Counter(
        (raw, reason.value) for raw, reason in bad)


def test_a_killed_source_process_is_rebuilt_serving_goes_on_nothing_lost(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"srckill-{time.time_ns()}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=1)
    path = tmp_path / "stream.csv"
    n = 12_000
    write(generate(SynthConfig(users=500, items=300, events=n, seed=5, topics=5)), path)
    s = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=topic,
                 kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g", http_port=0,
                 grpc_port=0, device="cpu", eval_interval_s=3600, replay=False,
                 shutdown_grace_s=1.0)
    messages = file_messages(path, None, None, False, lambda _: None)
    publish(messages[: n // 2], s, topic)
    with running(s) as (daemon, _thread):
        url = f"http://127.0.0.1:{daemon.http_port}"
        wait_status(daemon.http_port, lambda st: st["snapshot_events"] >= n // 2)
        child = daemon.engine.source._proc  # type: ignore[union-attr]
        os.kill(child.pid, signal.SIGKILL)
        publish(messages[n // 2:], s, topic)
        deadline = time.monotonic() + 120
        while (st := httpx.get(f"{url}/v1/status").json())["snapshot_events"] < n:
            assert time.monotonic() < deadline, st
            r = httpx.post(f"{url}/v1/recommend", json={"user": "3", "k": 5})
            assert r.status_code == 200  # served throughout
            time.sleep(0.05)
        assert st["ingest"] == "ok"
        reg = daemon.metrics.registry
        assert reg.get_sample_value("ncf_stream_source_restarts_total", {"reason": "poll"}) == 1
        assert daemon.engine.source._proc.pid != child.pid  # type: ignore[union-attr]
    same_state(daemon.engine.trainer, reference(path))
