"""A batch the client cannot decode stops its partition only, or is dead-lettered by choice.

The batch here is real: kcat compresses it with lz4, and the consumer lacks the lz4
module, as the project's environment once did (kafka-python then raises
UnsupportedCodecError on every poll, without saying which partition failed).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import kafka.codec
import pytest
from conftest import kcat_publish, read_topic, running, same_content  # tests/conftest.py

from consumers.broker import create_topics
from consumers.daemon import Daemon
from consumers.kafka_source import KafkaSource
from ncf_stream import checkpoint
from ncf_stream.events import Events, Reason
from ncf_stream.settings import Settings
from ncf_stream.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.slow

Event = dict[str, object]


def publish_with_a_bad_batch(bootstrap: str, topic: str) -> tuple[list[Event], list[Event]]:
    """Partition 0: 300 plain events. Partition 1: 100 plain, 100 in lz4 (offsets 100-199),
    100 plain. Returns (the events outside the lz4 range, those inside it)."""
    def events(tag: str, n: int) -> list[Event]:
        return [{"user": f"{tag}-u{i % 17}", "item": f"i{i % 29}", "ts": 1.7e9 + i}
                for i in range(n)]

    p0, before, bad, after = events("p0", 300), events("a", 100), events("b", 100), \
        events("c", 100)
    create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    kcat_publish(bootstrap, topic, p0, "none", partition=0)
    kcat_publish(bootstrap, topic, before, "none", partition=1)
    kcat_publish(bootstrap, topic, bad, "lz4", partition=1)
    kcat_publish(bootstrap, topic, after, "none", partition=1)
    return p0 + before + after, bad


def settings(bootstrap: str, topic: str, **kw: object) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, kafka_topic=topic,
                    kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g", **kw)


def pairs(events: list[Event]) -> Counter[tuple[object, object]]:
    return Counter((e["user"], e["item"]) for e in events)


def consume(source: KafkaSource, until: int, quiet_s: float) -> tuple[int, int, Counter]:
    """Poll until ``until`` records, then on for ``quiet_s``: (records, rejected, pairs)."""
    records = rejected = 0
    got: Counter[tuple[object, object]] = Counter()
    deadline, quiet_until = time.monotonic() + 60, None
    while quiet_until is None or time.monotonic() < quiet_until:
        assert time.monotonic() < deadline, f"{records} records of {until}"
        batch = source.poll(0.2)
        if batch is not None:
            records += batch.records
            rejected += batch.rejected
            assert isinstance(batch.events, Events)
            got.update(zip(batch.events.users.tolist(), batch.events.items.tolist(),
                           strict=True))
        if quiet_until is None and records >= until:
            quiet_until = time.monotonic() + quiet_s
    return records, rejected, got


@pytest.fixture
def no_lz4(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's Kafka client without the lz4 codec."""
    monkeypatch.setattr(kafka.codec, "lz4", None)
    assert not kafka.codec.has_lz4()


def test_the_partition_of_an_undecodable_batch_stops_the_others_flow(
        kafka_bootstrap: str, no_lz4: None) -> None:
    topic = f"undecodable-{uuid.uuid4().hex[:8]}"
    good, _ = publish_with_a_bad_batch(kafka_bootstrap, topic)
    source = KafkaSource(settings(kafka_bootstrap, topic))
    try:
        records, rejected, got = consume(source, until=400, quiet_s=2.0)
        # Everything before the batch, in both partitions; nothing at or after it.
        assert (records, rejected) == (400, 0)
        assert got == pairs(good[:400])
        blocked = source.blocked()
        assert list(blocked) == [(topic, 1)]
        assert blocked[(topic, 1)].offset == 100
        assert blocked[(topic, 1)].reason == "UnsupportedCodecError"
        assert "lz4" in blocked[(topic, 1)].detail
        assert source.lag() == 200  # the stopped range and what follows it wait
    finally:
        source.close()


def test_opted_in_the_undecodable_range_is_dead_lettered_and_the_rest_consumed(
        kafka_bootstrap: str, no_lz4: None) -> None:
    topic = f"undecodable-dl-{uuid.uuid4().hex[:8]}"
    good, bad = publish_with_a_bad_batch(kafka_bootstrap, topic)
    source = KafkaSource(settings(kafka_bootstrap, topic, dead_letter_undecodable=True))
    try:
        records, rejected, got = consume(source, until=600, quiet_s=1.0)
        assert source.blocked() == {}
        source.flush()
    finally:
        source.close()
    assert (records, rejected) == (600, len(bad))
    assert got == pairs(good)  # exactly the run without the range
    [letter] = read_topic(kafka_bootstrap, f"{topic}.dlq", 2, timeout_s=5)
    assert dict(letter.headers)["reason"] == Reason.UNDECODABLE_BATCH.value.encode()
    body = json.loads(letter.value)
    assert (body["partition"], body["first_offset"], body["next_offset"]) == (1, 100, 200)
    assert body["detail"].startswith("UnsupportedCodecError")


def test_the_daemon_serves_through_a_blocked_partition_then_dead_letters_it_on_request(
        kafka_bootstrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The operator's path: a daemon whose source process lacks lz4 keeps serving and
    says which partition stopped where; restarted with dead_letter_undecodable, it
    skips exactly that range and ends in the store of the run without it."""
    hidden = tmp_path / "hide-lz4" / "lz4"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(hidden.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    topic = f"undecodable-d-{uuid.uuid4().hex[:8]}"
    good, bad = publish_with_a_bad_batch(kafka_bootstrap, topic)
    ckpt = tmp_path / "ckpt"

    def run(until: str, **kw: object) -> tuple[Daemon, dict]:
        s = settings(kafka_bootstrap, topic, http_port=0, grpc_port=0, device="cpu",
                     eval_interval_s=3600, replay=False, shutdown_grace_s=1.0,
                     checkpoint_dir=str(ckpt), **kw)
        with running(s) as (daemon, thread):
            url = f"http://127.0.0.1:{daemon.http_port}"
            deadline = time.monotonic() + 90
            with httpx.Client(base_url=url, timeout=5) as c:
                while True:
                    assert thread.is_alive(), "the daemon stopped"
                    st = c.get("/v1/status").json()
                    if st["snapshot_events"] >= 400:  # served throughout once it has a model
                        r = c.post("/v1/recommend", json={"user": "p0-u3", "k": 5})
                        assert r.status_code == 200 and not r.json()["cold_start"]
                    if until == "blocked" and st["ingest"] == "degraded" \
                            and st["snapshot_events"] >= 400:
                        time.sleep(2)  # polls go on: the block is logged once, not again
                        st = c.get("/v1/status").json()
                        st["healthz"] = c.get("/healthz").json()
                        st["readyz"] = c.get("/readyz").status_code
                        break
                    if until == "all" and st["events_consumed"] >= 600:
                        break
                    assert time.monotonic() < deadline, st
                    time.sleep(0.1)
            return daemon, st

    with caplog.at_level(logging.ERROR, logger="ncf_stream.engine"):
        daemon, st = run("blocked")
    assert st["events_consumed"] == 400 and st["events_rejected"] == 0
    reason = f"{topic}[1] blocked at offset 100: UnsupportedCodecError"
    assert st["ingest_reason"].startswith(reason)
    assert st["healthz"] == {"status": "degraded", "reason": st["ingest_reason"]}
    assert st["readyz"] == 200
    assert daemon.metrics.registry.get_sample_value(
        "ncf_stream_partition_blocked", {"partition": "1", "reason": "UnsupportedCodecError"}
    ) == 1
    logged = [r for r in caplog.records if "cannot decode" in r.getMessage()]
    assert len(logged) == 1 and f"{topic}[1] offset 100" in logged[0].getMessage()

    daemon, st = run("all", dead_letter_undecodable=True)
    assert st["ingest"] == "ok" and st["events_rejected"] == len(bad)
    assert daemon.metrics.registry.get_sample_value(
        "ncf_stream_events_rejected_total", {"reason": "undecodable_batch"}) == len(bad)
    # The uninterrupted run minus exactly the range, in memory and in the last checkpoint.
    want = Trainer(TrainerConfig(replay=False))
    want.ingest(Events.from_rows([(str(e["user"]), str(e["item"]), float(e["ts"]), "", 1.0)
                                  for e in good]))
    restored = Trainer(TrainerConfig(replay=False))
    assert checkpoint.load_latest(str(ckpt), restored) is not None
    for got in (daemon.engine.trainer, restored):
        same_content(got, want)
