"""The Kafka source against a real broker: good events out, bad ones dead-lettered, offsets."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import read_topic  # tests/conftest.py
from kafka import KafkaProducer
from kafka.errors import KafkaTimeoutError
from malformed import MALFORMED  # tests/malformed.py
from prometheus_client import CollectorRegistry

from consumers import kafka_source
from consumers.kafka_source import KafkaSource
from consumers.produce import produce_file, publish
from consumers.source_process import ProcessSource
from ncf_stream.engine import Engine, Resume
from ncf_stream.events import Events, Reason
from ncf_stream.ids import IdMap, MappedEvents
from ncf_stream.metrics import IngestMetrics
from ncf_stream.settings import Settings
from ncf_stream.source import EventBatch, EventSource, Partition, SourceError
from ncf_stream.synth import SynthConfig, generate, write


def settings_for(bootstrap: str, topics: tuple[str, str], group: str = "g") -> Settings:
    return Settings(kafka_bootstrap=bootstrap, kafka_topic=topics[0], kafka_dlq_topic=topics[1],
                    kafka_group_id=f"{topics[0]}-{group}", kafka_max_poll_records=500)


def drain(source: KafkaSource, records: int, timeout_s: float = 60.0) -> list[EventBatch]:
    """Poll until ``records`` records (good or bad) have been consumed."""
    batches: list[EventBatch] = []
    deadline = time.monotonic() + timeout_s
    while sum(b.records for b in batches) < records:
        assert time.monotonic() < deadline, "timed out waiting for records"
        batch = source.poll(0.5)
        if batch is not None:
            batches.append(batch)
    return batches


def in_process(s: Settings, metrics: IngestMetrics | None = None,
               positions: dict[Partition, int] | None = None) -> EventSource:
    return KafkaSource(s, metrics=metrics, positions=lambda: positions or {})


def in_child(s: Settings, metrics: IngestMetrics | None = None,
             positions: dict[Partition, int] | None = None) -> EventSource:
    return ProcessSource(s, metrics=metrics, positions=positions)


class MappedBack:
    """A child source that maps ids, seen through maps that its batches extend (as the
    engine's are), with the rows turned back into ids. The maps start with ids of their
    own, as restored ones would, so the child must continue them."""

    def __init__(self, s: Settings, metrics: IngestMetrics | None = None,
                 positions: dict[Partition, int] | None = None) -> None:
        self.users, self.items = IdMap(), IdMap()
        self.users.rows(["restored-user"])
        self.items.rows(["restored-item-0", "restored-item-1"])
        self.source = ProcessSource(s, metrics=metrics, positions=positions,
                                    id_maps=(self.users, self.items))

    def poll(self, timeout_s: float) -> EventBatch | None:
        batch = self.source.poll(timeout_s)
        if batch is None:
            return None
        m = batch.events
        assert isinstance(m, MappedEvents)
        self.users.extend(m.new_users, m.user_base)
        self.items.extend(m.new_items, m.item_base)
        n = len(m)
        events = Events(self.users.ids(m.users), self.items.ids(m.items), m.ts,
                        np.ones(n), np.full(n, "unknown", dtype=object))
        return replace(batch, events=events)

    def commit(self, offsets: dict[Partition, int]) -> None:
        self.source.commit(offsets)

    def close(self) -> None:
        self.source.close()


# The daemon runs the source in a process of its own by default, mapping ids there;
# every way must deliver the same events.
@pytest.fixture(params=[in_process, in_child, MappedBack],
                ids=["in-process", "child-process", "child-maps-ids"])
def make_source(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.csv"
    write(generate(SynthConfig(users=40, items=60, events=3000, seed=3, topics=4)), path)
    return path


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(raw for raw, _ in MALFORMED) + b"\n")
    return path


def test_good_events_out_in_order_bad_ones_dead_lettered(
    kafka_bootstrap: str, topics: tuple[str, str], good_file: Path, bad_file: Path,
    make_source: Any,
) -> None:
    s = settings_for(kafka_bootstrap, topics)
    good = produce_file(good_file, s, show_progress=False)
    bad = produce_file(bad_file, s, raw=True, show_progress=False)
    assert (good.sent, good.failed, bad.sent) == (3000, 0, len(MALFORMED))

    registry = CollectorRegistry()
    source = make_source(s, metrics=IngestMetrics(registry))
    try:
        batches = drain(source, 3000 + len(MALFORMED))
    finally:
        source.close()

    # Exactly the good events, and each user's in the order they were published.
    expected = generate(SynthConfig(users=40, items=60, events=3000, seed=3, topics=4))
    want: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for u, i, t in zip(expected.users, expected.items, expected.ts, strict=True):
        want[str(u)].append((str(i), float(t)))
    got: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for b in batches:
        for u, i, t in zip(b.events.users, b.events.items, b.events.ts, strict=True):
            got[u].append((i, float(t)))
    assert got == want
    assert sum(b.rejected for b in batches) == len(MALFORMED)

    # Every bad record in the dead-letter topic: original bytes, reason in a header.
    dead = read_topic(kafka_bootstrap, topics[1], len(MALFORMED))
    reasons = {r.value: dict(r.headers)["reason"].decode() for r in dead}
    assert reasons == {raw: reason.value for raw, reason in MALFORMED}
    assert all(dict(r.headers)["source"].startswith(topics[0].encode()) for r in dead)

    assert registry.get_sample_value("ncf_stream_events_consumed_total") == 3000 + len(MALFORMED)
    for _, reason in MALFORMED:
        assert registry.get_sample_value(
            "ncf_stream_events_rejected_total", {"reason": reason.value}) == 1


def test_offsets_cover_every_record_and_commit_resumes(
    kafka_bootstrap: str, topics: tuple[str, str], good_file: Path, make_source: Any
) -> None:
    s = settings_for(kafka_bootstrap, topics)
    produce_file(good_file, s, show_progress=False)
    source = make_source(s)
    batches = drain(source, 3000)
    covered: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    for b in batches:
        for tp, rng in b.offsets.items():
            covered[tp].append(rng)
    for ranges in covered.values():  # contiguous from 0, no gap, no overlap
        assert ranges[0][0] == 0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    half = batches[: len(batches) // 2]
    for b in half:
        source.commit(b.commit_offsets())
    source.close()

    state: dict[tuple[str, int], int] = {}
    for b in half:
        state.update(b.commit_offsets())

    # A new source positions itself where the engine's state says, not where the
    # group committed: from the state's offsets, every later record exactly once...
    again = make_source(s, positions=state)
    try:
        rest = drain(again, 3000 - sum(b.records for b in half))
    finally:
        again.close()
    firsts: dict[tuple[str, int], int] = {}
    for b in rest:
        for tp, (lo, _) in b.offsets.items():
            firsts[tp] = min(lo, firsts.get(tp, lo))
    assert firsts == {tp: state.get(tp, 0) for tp in firsts}
    assert sum(b.records for b in rest) == 3000 - sum(b.records for b in half)
    # ...and with no state (nothing restored), from the beginning despite the commits.
    fresh = make_source(s)
    try:
        everything = drain(fresh, 3000)
    finally:
        fresh.close()
    assert sum(b.records for b in everything) == 3000


def test_source_process_leaves_with_the_engine(
    kafka_bootstrap: str, topics: tuple[str, str], good_file: Path
) -> None:
    """The child stops on close, and on its own when the engine's end of the connection
    goes away (a kill -9 of the daemon) instead of fetching for no one."""
    s = settings_for(kafka_bootstrap, topics)
    produce_file(good_file, s, show_progress=False)
    closed = ProcessSource(s)
    assert drain(closed, 3000)
    closed.close()
    assert closed._proc.returncode == 0

    orphan = ProcessSource(s)
    orphan.poll(5.0)
    orphan._conn.close()  # what the kernel does to a killed daemon's sockets
    assert orphan._proc.wait(20) == 0


ORPHANED = """
import sys, time
from consumers.source_process import ProcessSource
from ncf_stream.settings import Settings
source = ProcessSource(Settings(kafka_bootstrap=sys.argv[1], kafka_topic=sys.argv[2],
                                kafka_dlq_topic=sys.argv[3], kafka_group_id=sys.argv[2] + "-o"))
print(source._proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl: Linux")
def test_source_process_dies_with_a_killed_daemon_even_when_it_reads_nothing(
    kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    """kill -9 of the daemon while its child does not read the connection (stopped
    here; spinning in the client in the wild): the kernel kills the child too."""
    daemon = subprocess.Popen([sys.executable, "-c", ORPHANED, kafka_bootstrap, *topics],
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert daemon.stdout is not None
    child = int(daemon.stdout.readline())
    os.kill(child, signal.SIGSTOP)  # deaf to its connection, as a spinning child is
    daemon.kill()
    daemon.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and _state(child) != "Z":
        assert time.monotonic() < deadline, "the source process outlived its daemon"
        time.sleep(0.05)


def test_a_wedged_source_process_is_declared_so_and_killed_at_once(
    kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    """A child that stops answering (spinning inside the client, or hung) is reported
    after source_stall_s past its poll's timeout, and closing it kills it, no waiting."""
    s = settings_for(kafka_bootstrap, topics).model_copy(update={"source_stall_s": 1.0})
    source = ProcessSource(s)
    try:
        source.poll(0.5)
        os.kill(source._proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(SourceError, match="wedged"):
            source.poll(0.2)
        assert 1.2 <= time.monotonic() - start < 5
    finally:
        start = time.monotonic()
        source.close()
    assert time.monotonic() - start < 2 and source._proc.returncode is not None


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_source_process_raises_what_the_child_raised(
    kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    source = ProcessSource(settings_for(kafka_bootstrap, topics))
    try:
        with pytest.raises(ValueError, match="unknown request"):
            source._call("no-such-request")
        assert source.poll(0.1) is None  # and it goes on serving
    finally:
        source.close()


def test_a_consumer_left_without_partitions_rejoins_and_loses_nothing(
    kafka_bootstrap: str, topics: tuple[str, str], good_file: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The state kafka-python 3.0.12 was once left in (a join completed without applying
    its assignment), injected: the source notices, rejoins, and reads on from the state's
    positions, every record once."""
    monkeypatch.setattr(kafka_source, "UNASSIGNED_REJOIN_S", 1.0)
    s = settings_for(kafka_bootstrap, topics)
    produce_file(good_file, s, show_progress=False)
    positions: dict[Partition, int] = {}
    source = KafkaSource(s, positions=lambda: positions)
    try:
        batches = drain(source, 1)
        for b in batches:
            positions.update(b.commit_offsets())
        source._consumer._subscription.assign_from_subscribed([])  # the wedge
        assert not source._consumer.assignment()
        more = drain(source, 3000 - sum(b.records for b in batches), timeout_s=30)
    finally:
        source.close()
    assert source.rejoins >= 1 and "leaving and rejoining group" in caplog.text
    offsets: dict[Partition, list[int]] = defaultdict(list)
    for b in batches + more:
        for part, (lo, hi) in b.offsets.items():
            offsets[part].extend(range(lo, hi))
    assert sum(map(len, offsets.values())) == 3000
    assert all(v == list(range(len(v))) for v in offsets.values())  # each once, in order


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread policy: Linux")
@pytest.mark.parametrize("policy", ["idle", "nice"])
def test_source_process_lowers_only_its_decoding_thread(
    kafka_bootstrap: str, topics: tuple[str, str], policy: str
) -> None:
    """Decoding yields the CPU to requests; kafka-python's network and heartbeat threads
    keep their priority, so the group protocol is not starved on a busy machine."""
    source = ProcessSource(settings_for(kafka_bootstrap, topics), background=policy)
    try:
        source.poll(0.5)
        pid = source._proc.pid
        tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
        base = os.getpriority(os.PRIO_PROCESS, 0)
        state = {t: (os.sched_getscheduler(t), os.getpriority(os.PRIO_PROCESS, t)) for t in tids}
        main = state.pop(pid)  # the main thread: poll and decode
        assert main == ((os.SCHED_IDLE, base) if policy == "idle"
                        else (os.SCHED_OTHER, base + 19))
        assert len(state) >= 2 and set(state.values()) == {(os.SCHED_OTHER, base)}, state
    finally:
        source.close()


class FlakyProducer(KafkaProducer):
    """A real producer whose first send fails, as when the DLQ is briefly unreachable."""

    failures = 1

    def send(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise KafkaTimeoutError("injected: dead-letter topic unreachable")
        return super().send(*args, **kwargs)


def test_a_failed_dead_letter_blocks_the_commit_and_a_replay_resends_it(
    kafka_bootstrap: str, topics: tuple[str, str], bad_file: Path
) -> None:
    """Dead letters are written off the consumer's thread; flush (before any checkpoint or
    commit) raises if one failed, so nothing durable covers it, and reading again from the
    last durable state (here: none) dead-letters every bad record."""
    s = settings_for(kafka_bootstrap, topics)
    produce_file(bad_file, s, raw=True, show_progress=False)
    source = KafkaSource(s, dlq_producer=FlakyProducer(bootstrap_servers=kafka_bootstrap))
    try:
        batches = drain(source, len(MALFORMED))
        assert sum(b.rejected for b in batches) == len(MALFORMED)
        with pytest.raises(SourceError, match="injected"):
            source.flush()
        with pytest.raises(SourceError):
            source.commit({tp: hi for b in batches for tp, (_, hi) in b.offsets.items()})
    finally:
        with contextlib.suppress(SourceError):
            source.close()

    replay = KafkaSource(s)  # from the state that was durable: the beginning
    try:
        again = drain(replay, len(MALFORMED))
        replay.flush()
    finally:
        replay.close()
    assert sum(b.rejected for b in again) == len(MALFORMED)
    dead = read_topic(kafka_bootstrap, topics[1], 2 * len(MALFORMED) - 1, timeout_s=10)
    assert {r.value for r in dead} == {raw for raw, _ in MALFORMED}  # none lost


def test_cli_produce_reports_bad_lines_and_summary(
    kafka_bootstrap: str, topics: tuple[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "ratings.dat"
    path.write_text("1::10::5::300\n1::10::5\n2::20::3::100\n::1::1::1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "consumers.cli", "produce", str(path), "--topic", topics[0],
         "--bootstrap", kafka_bootstrap, "--quiet"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{path}:2: skipped" in proc.stderr and f"{path}:4: skipped: empty_id" in proc.stderr
    assert "sent 2 events" in proc.stdout and "skipped 2 bad lines" in proc.stdout
    records = read_topic(kafka_bootstrap, topics[0], 2)
    values = sorted((json.loads(r.value)["ts"], r.key) for r in records)
    assert values == [(100.0, b"2"), (300.0, b"1")]


def test_publish_stops_when_told_and_sends_what_it_counts(
    kafka_bootstrap: str, topics: tuple[str, str]
) -> None:
    """The demo's producer stops with the daemon, flushed, before its broker goes away."""
    s = settings_for(kafka_bootstrap, topics)
    messages = [(None, f"m{n}".encode()) for n in range(20_000)]
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    sent, failed, _ = publish(messages, s, topics[0], rate=4000, stop=stop)
    assert failed == 0 and 0 < sent < len(messages)
    records = read_topic(kafka_bootstrap, topics[0], sent + 1, timeout_s=4)
    assert sorted(int(r.value[1:]) for r in records) == list(range(sent))  # the first, once


def test_dead_letter_log_is_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """The first dead letter is logged at once; then one line per interval, with counts by
    reason and one example, whatever the rate of bad records; the rest at a flush."""
    from types import SimpleNamespace

    from consumers.kafka_source import DeadLetterLog
    from ncf_stream.events import Rejection

    now = [100.0]
    dl = DeadLetterLog("t.dlq", every_s=10.0, clock=lambda: now[0])
    records = [SimpleNamespace(topic="t", partition=p, offset=o) for p in (0, 1) for o in (7, 8)]

    def batch(*reasons: Reason) -> None:
        dl.add(records, [Rejection(j, r, f"detail {j}") for j, r in enumerate(reasons)])

    with caplog.at_level("WARNING", logger="consumers.kafka_source"):
        batch(Reason.NOT_JSON)
        for _ in range(50):  # five seconds of bad input at ten batches a second
            now[0] += 0.1
            batch(Reason.NOT_JSON, Reason.MISSING_FIELD)
        assert len(caplog.records) == 1
        assert "dead-lettered 1 records to t.dlq" in caplog.text
        assert "t[0] offset 7: not_json (detail 0)" in caplog.text
        now[0] += 6.0  # past the interval: one summary of everything since
        batch(Reason.EMPTY_ID, Reason.EMPTY_ID, Reason.EMPTY_ID)
        assert len(caplog.records) == 2
        assert caplog.records[1].getMessage().startswith(
            "dead-lettered 103 records to t.dlq in the last 11 s (not_json 50, missing_field 50, "
            "empty_id 3)")
        now[0] += 1.0
        batch(Reason.WRONG_TYPE)
        assert len(caplog.records) == 2
        dl.flush()
        assert len(caplog.records) == 3 and "(wrong_type 1)" in caplog.records[2].getMessage()
        dl.flush()  # nothing pending: nothing logged
        assert len(caplog.records) == 3


def test_availability_events_come_through_every_source_apart_and_in_order(
    kafka_bootstrap: str, topics: tuple[str, str], make_source: Any,
) -> None:
    """Not interactions: they reach the engine beside the events, never id-mapped (the
    child that maps ids must not give them rows), in the order of their partition."""
    s = settings_for(kafka_bootstrap, topics)
    values = [{"user": "u1", "item": "i1", "ts": 1.0},
              {"item": "i1", "type": "item_unavailable"},
              {"item": "only-flagged", "type": "item_unavailable"},
              {"user": "u2", "item": "i2", "ts": 2.0},
              {"item": "i1", "type": "item_available"}]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for v in values:  # one partition: one order
        producer.send(topics[0], json.dumps(v).encode(), partition=0)
    producer.flush()
    producer.close()
    source = make_source(s)
    try:
        batches = drain(source, len(values))
    finally:
        source.close()
    got = [(i, bool(a)) for b in batches
           for i, a in zip(b.availability.items, b.availability.available, strict=True)]
    assert got == [("i1", False), ("only-flagged", False), ("i1", True)]
    assert [i for b in batches for i in b.events.items] == ["i1", "i2"]
    if isinstance(source, MappedBack):
        assert "only-flagged" not in source.items


def test_deletions_reach_the_engine_in_order_through_the_child_that_maps_ids(
    kafka_bootstrap: str, topics: tuple[str, str],
) -> None:
    """The daemon's way: the child maps ids ahead of the engine. A batch with deletions
    comes by id, and the batches after it must still continue the engine's maps (an
    IdMapMismatch otherwise), with a deleted user back as a new row."""
    s = settings_for(kafka_bootstrap, topics).model_copy(update={
        "kafka_max_poll_records": 7, "device": "cpu", "factors": 8, "mlp_layers": (16, 8),
        "checkpoint_dir": "", "publish_every_s": 1e-6, "eval_interval_s": 3600.0})
    values: list[dict[str, object]] = []
    for j in range(30):
        values.append({"user": f"u{j % 4}", "item": f"i{j % 9}", "ts": float(j)})
        if j == 12:
            values.append({"user": "u1", "type": "delete_user"})
        if j == 20:
            values.append({"item": "i3", "type": "delete_item"})
            values.append({"item": "never-seen", "type": "delete_item"})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for v in values:  # one partition: one order
        producer.send(topics[0], json.dumps(v).encode(), partition=0)
    producer.flush()
    producer.close()

    def factory(resume: Resume) -> EventSource:
        return ProcessSource(s, metrics=resume.metrics, positions=resume.positions,
                             id_maps=(resume.user_ids, resume.item_ids))

    engine = Engine(s, factory)
    try:
        deadline = time.monotonic() + 60
        while engine.counters.consumed < len(values):
            assert time.monotonic() < deadline, engine.status()
            engine.cycle()
    finally:
        engine.close(final_checkpoint=False)
    t = engine.trainer
    # u1's events after its deletion (j = 13, 17, 21, 25, 29) are a new user, row 4.
    assert t.user_ids.tombstones().tolist() == [1]
    assert int(t.user_ids.rows(["u1"], add=False)[0]) == 4
    assert set(t.item_ids.ids(t.store.seen(4)).tolist()) == {"i4", "i8", "i3", "i7", "i2"}
    # i3 came back after its deletion (j = 21) as a new item: the old row is a tombstone.
    assert t.item_ids.tombstones().tolist() == [3]
    assert int(t.item_ids.rows(["i3"], add=False)[0]) == 9
    reg = engine.metrics.registry
    assert reg.get_sample_value("ncf_stream_deletions_total",
                                {"kind": "item", "outcome": "unknown"}) == 1


def test_an_admin_deletion_reopens_the_child_that_maps_ids(
    kafka_bootstrap: str, topics: tuple[str, str],
) -> None:
    """An admin deletion changes the engine's maps outside the stream; the child's maps
    must follow, or the deleted user's next events would land on its tombstone."""
    s = settings_for(kafka_bootstrap, topics).model_copy(update={
        "device": "cpu", "factors": 8, "mlp_layers": (16, 8), "checkpoint_dir": "",
        "publish_every_s": 1e-6, "eval_interval_s": 3600.0})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)

    def send(values: list[dict[str, object]]) -> None:
        for v in values:
            producer.send(topics[0], json.dumps(v).encode(), partition=0)
        producer.flush()

    def factory(resume: Resume) -> EventSource:
        return ProcessSource(s, metrics=resume.metrics, positions=resume.positions,
                             id_maps=(resume.user_ids, resume.item_ids))

    def consume(engine: Engine, records: int) -> None:
        deadline = time.monotonic() + 60
        while engine.counters.consumed < records:
            assert time.monotonic() < deadline, engine.status()
            engine.cycle()

    engine = Engine(s, factory)
    try:
        send([{"user": f"u{j % 3}", "item": f"i{j % 5}", "ts": float(j)} for j in range(12)])
        consume(engine, 12)
        old = int(engine.trainer.user_ids.rows(["u1"], add=False)[0])
        engine.request_delete("user", "u1")
        engine.cycle()
        send([{"user": "u1", "item": "i9", "ts": 20.0}, {"user": "u7", "item": "i0", "ts": 21.0}])
        consume(engine, 14)
    finally:
        producer.close()
        engine.close(final_checkpoint=False)
    t = engine.trainer
    new = int(t.user_ids.rows(["u1"], add=False)[0])
    assert new == 3 and t.user_ids.rows(["u7"], add=False).tolist() == [4]
    assert len(t.store.seen(old)) == 0
    assert t.item_ids.ids(t.store.seen(new)).tolist() == ["i9"]
