"""A group of trainers, its Kafka side: partitions by rank, the supervisor, the checks.

Each trainer of a group of N (``group_size``) reads the partitions p with
p % N == rank, assigned by hand (no consumer group), from the engine's positions;
``ncf-stream serve --workers N`` runs N of them and restarts them together. The
exchange of item rows and the tower (ncf_stream.group) is not tested here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from conftest import committed, partitioned_topic, publish_keyed  # tests/conftest.py
from kafka import KafkaAdminClient
from kafka.admin import NewPartitions

from consumers import kafka_source
from consumers.cli import _load, build_parser, torchrun_group
from consumers.daemon import Daemon
from consumers.group_supervisor import Ports, Supervisor, trainer_argv
from consumers.kafka_source import KafkaSource
from consumers.source_process import ProcessSource
from ncf_stream.errors import ConfigError
from ncf_stream.events import Events
from ncf_stream.settings import Settings, check_group
from ncf_stream.source import EventBatch, EventSource, Partition, SourceError
from ncf_stream.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4
EVENTS = 2000
OWNED = {0: {0, 2}, 1: {1, 3}}


def wait_for(condition: Callable[[], Any], timeout_s: float = 30.0, what: str = "") -> Any:
    """``condition()``'s first truthy value, asked every 50 ms for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.05)
    return value


# ---- the checks ----------------------------------------------------------------------------

def test_a_trainer_of_a_group_reads_through_one_source() -> None:
    with pytest.raises(ConfigError, match=r"kafka_sources = 2 with group_size = 3.*more "
                                          r"trainers"):
        check_group(Settings(group_size=3, group_rank=1, kafka_sources=2))
    check_group(Settings(kafka_sources=2))  # one trainer: as before
    check_group(Settings(group_size=3, group_rank=2))


def test_a_rank_is_below_the_group_size() -> None:
    with pytest.raises(ConfigError, match="group_rank = 2 with group_size = 2"):
        check_group(Settings(group_size=2, group_rank=2))
    with pytest.raises(ConfigError, match="group_rank = 1 with group_size = 1"):
        Daemon(Settings(group_rank=1))  # before it builds anything
    with pytest.raises(ConfigError, match="kafka_sources = 2"):
        Supervisor(Settings(kafka_sources=2), 2, ["serve", "--workers", "2"])


# ---- torchrun --------------------------------------------------------------------------------

TORCHRUN_ENV = {"WORLD_SIZE": "4", "RANK": "3", "MASTER_ADDR": "trainer-0", "MASTER_PORT": "29400"}


def test_serve_takes_the_group_from_torchrun_where_not_given(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    args = build_parser().parse_args(["serve"])
    _, sources = _load(args)
    assert torchrun_group(sources, TORCHRUN_ENV) == {
        "group_size": "4", "group_rank": "3", "group_address": "trainer-0:29400"}
    assert torchrun_group(sources, {**TORCHRUN_ENV, "MASTER_PORT": ""}) == {}  # all or none
    settings = _load(args, **torchrun_group(sources, TORCHRUN_ENV))[0]
    assert (settings.group_size, settings.group_rank, settings.group_address) == (
        4, 3, "trainer-0:29400")

    monkeypatch.setenv("NCF_STREAM_GROUP_RANK", "1")  # given: it wins
    _, sources = _load(args)
    assert "group_rank" not in torchrun_group(sources, TORCHRUN_ENV)


# ---- partitions by rank, against the broker ----------------------------------------------------

@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return partitioned_topic(kafka_bootstrap, "grp", PARTITIONS)


@pytest.fixture
def stream() -> Events:
    return generate(SynthConfig(users=100, items=60, events=EVENTS, seed=11, topics=4)).to_events()


def publish(bootstrap: str, topic: str, events: Events, lo: int, hi: int,
            partition: int | None = None) -> None:
    """Events lo..hi, keyed by user (or all to ``partition``)."""
    publish_keyed(bootstrap, topic, events.take(np.arange(lo, hi)), partition)


def member(bootstrap: str, topic: str, rank: int, size: int = 2) -> Settings:
    return Settings(kafka_bootstrap=bootstrap, kafka_topic=topic, kafka_dlq_topic=f"{topic}.dlq",
                    kafka_group_id=f"{topic}-g", kafka_max_poll_records=300,
                    group_size=size, group_rank=rank)


def read_together(sources: list[EventSource], records: int,
                  timeout_s: float = 60.0) -> list[list[EventBatch]]:
    """Poll the sources in turn until they have consumed ``records`` in all."""
    batches: list[list[EventBatch]] = [[] for _ in sources]
    deadline = time.monotonic() + timeout_s
    while sum(b.records for got in batches for b in got) < records:
        assert time.monotonic() < deadline, "timed out waiting for records"
        for source, got in zip(sources, batches, strict=True):
            if (batch := source.poll(0.2)) is not None:
                got.append(batch)
    return batches


def offsets_read(batches: list[EventBatch]) -> dict[Partition, list[int]]:
    out: dict[Partition, list[int]] = {}
    for b in batches:
        for tp, (lo, hi) in b.offsets.items():
            out.setdefault(tp, []).extend(range(lo, hi))
    return out


def events_of(batches: list[EventBatch]) -> list[tuple[str, str, float]]:
    return [(u, i, t) for b in batches for u, i, t in zip(
        b.events.users.tolist(), b.events.items.tolist(), b.events.ts.tolist(), strict=True)]


def test_two_ranks_read_their_partitions_every_event_once_and_resume_where_told(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    half = EVENTS // 2
    publish(kafka_bootstrap, topic, stream, 0, half)
    sources = [KafkaSource(member(kafka_bootstrap, topic, r)) for r in (0, 1)]
    try:
        for rank, source in enumerate(sources):
            assert source.owned() == {(topic, p) for p in OWNED[rank]}
            assert source.assigned() and source.rejoins == 0
        batches = read_together(sources, half)
        positions: dict[Partition, int] = {}
        for rank, got in enumerate(batches):
            read = offsets_read(got)
            assert {p for _, p in read} == OWNED[rank]  # keyed users fill every partition
            assert all(v == list(range(len(v))) for v in read.values())  # each once, in order
            for b in got:
                positions.update(b.commit_offsets())
        assert sorted(events_of(batches[0] + batches[1])) == sorted(events_of_stream(stream, 0,
                                                                                       half))
        users = [{u for u, _, _ in events_of(got)} for got in batches]
        assert not users[0] & users[1]  # a user's events in its owner's partitions only
        assert [s.lag() for s in sources] == [0, 0]
        sources[0].seek({(topic, 0): 0, (topic, 1): 0})  # partition 1 is rank 1's: left be
        assert sources[0].lag() == positions[(topic, 0)]
        reread = wait_for(lambda: sources[0].poll(0.2), what="partition 0 again")
        assert set(reread.offsets) == {(topic, 0)} and reread.offsets[(topic, 0)][0] == 0
        assert sources[1].poll(0.2) is None
        # Each rank is told every position; it commits its own partitions only (into a
        # group with no members: commits of consumers assigned by hand are taken).
        for source in sources:
            source.commit(positions)
        assert committed(kafka_bootstrap, f"{topic}-g") == positions
    finally:
        for source in sources:
            source.close()

    # Restarted from those positions (rank 1 in a process of its own, as the daemon runs
    # it): the rest, exactly, and nothing read again.
    publish(kafka_bootstrap, topic, stream, half, EVENTS)
    again: list[Any] = [
        KafkaSource(member(kafka_bootstrap, topic, 0), positions=lambda: positions),
        ProcessSource(member(kafka_bootstrap, topic, 1), positions=positions)]
    try:
        assert again[1].owned() == {(topic, p) for p in OWNED[1]}
        rest = read_together(again, EVENTS - half)
    finally:
        for source in again:
            source.close()
    for rank, got in enumerate(rest):
        for tp, read in offsets_read(got).items():
            assert tp[1] in OWNED[rank]
            assert read == list(range(positions[tp], positions[tp] + len(read)))
    assert sorted(events_of(rest[0] + rest[1])) == sorted(events_of_stream(stream, half, EVENTS))


def events_of_stream(stream: Events, lo: int, hi: int) -> list[tuple[str, str, float]]:
    return list(zip(stream.users[lo:hi].tolist(), stream.items[lo:hi].tolist(),
                    stream.ts[lo:hi].tolist(), strict=True))


def test_partitions_added_later_are_taken_on_by_their_owner(
    kafka_bootstrap: str, topic: str, stream: Events
) -> None:
    s = member(kafka_bootstrap, topic, 0).model_copy(update={  # PARTITION_CHECK_S, shortened
        "kafka_client_options": {"metadata_max_age_ms": 300}})
    positions = {(topic, 0): 0}
    source = KafkaSource(s, positions=lambda: positions)
    try:
        assert source.poll(0.2) is None
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:
            admin.create_partitions({topic: NewPartitions(total_count=PARTITIONS + 2)})
        finally:
            admin.close()
        publish(kafka_bootstrap, topic, stream, 0, 50, partition=4)  # rank 0's
        publish(kafka_bootstrap, topic, stream, 50, 80, partition=5)  # rank 1's
        batches = []
        deadline = time.monotonic() + 30
        while sum(b.records for b in batches) < 50:
            assert time.monotonic() < deadline, source.owned()
            if (batch := source.poll(0.2)) is not None:
                batches.append(batch)
        assert source.owned() == {(topic, 0), (topic, 2), (topic, 4)}
        assert offsets_read(batches) == {(topic, 4): list(range(50))}  # from its beginning
    finally:
        source.close()


def test_a_missing_topic_is_a_source_error(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka_source, "TOPIC_WAIT_S", 0.5)
    with pytest.raises(SourceError, match=r"topic grp-missing-.* not found.*trainer 1 of 2"):
        KafkaSource(member(kafka_bootstrap, f"grp-missing-{uuid.uuid4().hex[:8]}", 1))


def test_the_daemon_gives_a_trainer_of_a_group_a_source_that_maps_no_ids(
    kafka_bootstrap: str, topic: str
) -> None:
    """The engine maps ids itself in a group (its item rows are the group's)."""
    daemon = object.__new__(Daemon)  # only the source factory, not the engine behind it
    resume = SimpleNamespace(positions={}, metrics=None, user_ids=None, item_ids=None,
                             grouped=True)
    daemon.settings = member(kafka_bootstrap, topic, 1)
    source = daemon._kafka_source(resume)  # type: ignore[arg-type]
    try:
        assert isinstance(source, ProcessSource) and not source.maps_ids
        assert source.owned() == {(topic, p) for p in OWNED[1]}
    finally:
        source.close()
    daemon.settings = daemon.settings.model_copy(update={"kafka_source_process": False})
    source = daemon._kafka_source(resume)  # type: ignore[arg-type]
    try:
        assert isinstance(source, KafkaSource)
    finally:
        source.close()


# ---- the supervisor ------------------------------------------------------------------------------

def test_the_trainers_argv_is_the_supervisors_less_workers() -> None:
    for argv in (["-v", "serve", "--workers", "3", "--device", "cpu"],
                 ["-v", "serve", "--workers=3", "--device", "cpu"],
                 ["-v", "serve", "--work", "3", "--device", "cpu"]):
        assert trainer_argv(argv) == ["-v", "serve", "--device", "cpu"]
    assert build_parser().parse_args(["serve"]).workers == 1


def test_each_rank_serves_on_the_ports_plus_its_rank() -> None:
    s = Settings(http_port=8080, grpc_port=0, metrics_port=9100)
    assert [Ports.of(s, r) for r in (0, 2)] == [Ports(8080, 0, 9100), Ports(8082, 0, 9102)]
    assert Ports.of(Settings(), 1).metrics is None
    with pytest.raises(ConfigError, match="distinct ports"):
        Supervisor(Settings(http_port=8080, grpc_port=8081), 2, ["serve"])


STUB = """
    import json, os, sys, time
    out = os.environ["STUB_OUT"]
    record = {"pid": os.getpid(), "argv": sys.argv[1:],
              "env": {k: v for k, v in os.environ.items() if k.startswith("NCF_STREAM_")}}
    with open(f"{out}/{os.getpid()}.tmp", "w") as f:
        json.dump(record, f)
    os.rename(f"{out}/{os.getpid()}.tmp", f"{out}/{os.getpid()}.json")
    while True:
        time.sleep(60)
"""

LAUNCHER = """
    import sys
    from consumers.group_supervisor import Supervisor
    from ncf_stream.settings import Settings

    settings = Settings(http_port=18080, grpc_port=19050, metrics_port=17000,
                        shutdown_grace_s=1.0)
    argv = ["-v", "serve", "--workers", "2", "--device", "cpu"]
    sys.exit(Supervisor(settings, 2, argv, command=[sys.executable, sys.argv[1]]).run())
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_supervisor_runs_restarts_and_stops_the_group(tmp_path: Path) -> None:
    (tmp_path / "stub.py").write_text(textwrap.dedent(STUB))
    (tmp_path / "launch.py").write_text(textwrap.dedent(LAUNCHER))
    out = tmp_path / "children"
    out.mkdir()
    env = {**os.environ, "STUB_OUT": str(out), "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("NCF_STREAM_GROUP_")}
    log = (tmp_path / "supervisor.out").open("w")
    supervisor = subprocess.Popen([sys.executable, str(tmp_path / "launch.py"),
                                   str(tmp_path / "stub.py")], cwd=ROOT, env=env,
                                  stdout=log, stderr=subprocess.STDOUT)

    def children() -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]

    def generation(address: str) -> dict[int, dict[str, Any]]:
        return {int(c["env"]["NCF_STREAM_GROUP_RANK"]): c for c in children()
                if c["env"]["NCF_STREAM_GROUP_ADDRESS"] == address}

    try:
        first = wait_for(lambda: len(children()) == 2 and children(), what="generation 1")
        address = first[0]["env"]["NCF_STREAM_GROUP_ADDRESS"]
        assert address.startswith("127.0.0.1:")
        one = generation(address)
        assert sorted(one) == [0, 1]
        for rank, child in one.items():
            assert child["env"]["NCF_STREAM_GROUP_SIZE"] == "2"
            assert child["env"]["NCF_STREAM_METRICS_PORT"] == str(17000 + rank)
            assert child["argv"] == ["-v", "serve", "--device", "cpu", "--http-port",
                                     str(18080 + rank), "--grpc-port", str(19050 + rank)]

        os.kill(one[1]["pid"], signal.SIGKILL)  # a trainer dies: the group starts again
        wait_for(lambda: len(children()) == 4, what="generation 2")
        second = [c for c in children() if c["env"]["NCF_STREAM_GROUP_ADDRESS"] != address]
        assert len(second) == 2
        two = generation(second[0]["env"]["NCF_STREAM_GROUP_ADDRESS"])
        assert sorted(two) == [0, 1]
        assert not alive(one[0]["pid"])  # stopped, and reaped, before the restart
        assert all(alive(c["pid"]) for c in two.values())

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        assert not any(alive(c["pid"]) for c in two.values())
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
        for child in children():
            if alive(child["pid"]):
                os.kill(child["pid"], signal.SIGKILL)
        log.close()
    text = (tmp_path / "supervisor.out").read_text()
    assert "generation 2: trainer 1 of 2" in text
    assert "http://127.0.0.1:18081 and gRPC 127.0.0.1:19051, metrics :17001" in text
    assert "trainer 1 of 2" in text and "signal SIGKILL in generation 1" in text
    assert len(list(out.glob("*.json"))) == 4  # no third generation


# ---- deploy/ ----------------------------------------------------------------------------------

def test_the_group_compose_file_runs_two_ranks_and_a_replica_over_their_exports() -> None:
    import yaml

    deploy = ROOT / "deploy"
    compose = yaml.safe_load((deploy / "compose.group.yaml").read_text())
    services = compose["services"]
    trainers = [services[f"ncf-stream-{r}"] for r in (0, 1)]
    envs = [t["environment"] for t in trainers]
    assert [e["NCF_STREAM_GROUP_RANK"] for e in envs] == ["0", "1"]
    assert {e["NCF_STREAM_GROUP_SIZE"] for e in envs} == {"2"}
    address = {e["NCF_STREAM_GROUP_ADDRESS"] for e in envs}
    assert len(address) == 1 and address.pop().split(":")[0] == "ncf-stream-0"  # by name
    replica = services["ncf-stream-replica"]
    assert replica["command"] == ["serve-replica"]
    assert {e["NCF_STREAM_SNAPSHOT_DIR"] for e in envs} == {
        replica["environment"]["NCF_STREAM_SNAPSHOT_DIR"]}
    assert services["kafka"]["extends"]["file"] == "docker-compose.yml"
    assert "kafka" in yaml.safe_load((deploy / "docker-compose.yml").read_text())["services"]
    for service in [*trainers, replica]:
        build = service["build"]
        assert (deploy / build["context"] / build["dockerfile"]).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("..") or source in compose["volumes"], volume
