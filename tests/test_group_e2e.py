"""``ncf-stream serve --workers 2`` as users run it: a real broker, a topic of 4 partitions,
two trainer processes over gloo, a replica over their exports; one trainer killed with
SIGKILL on the way. Checked against one ``ncf-stream serve`` over the same events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from conftest import partitioned_topic, publish_keyed  # tests/conftest.py

from consumers.broker import free_port
from ncf_stream.events import Events
from ncf_stream.group import read_manifest
from ncf_stream.ids import IdMap
from ncf_stream.store import InteractionStore, split_keys
from ncf_stream.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "consumers.cli"]
PARTITIONS = 4
# Small and quick; replay stops at the budget, so the snapshots stop changing once the
# stream is trained and the replica's answers can be compared with the owners'.
ENV = {"NCF_STREAM_DEVICE": "cpu", "NCF_STREAM_FACTORS": "8", "NCF_STREAM_MLP_LAYERS": "[16, 8]",
       "NCF_STREAM_BATCH_SIZE": "256", "NCF_STREAM_REPLAY_RATIO": "1.0",
       "NCF_STREAM_CHECKPOINT_EVERY_S": "0.3", "NCF_STREAM_PUBLISH_EVERY_S": "0.2",
       "NCF_STREAM_SNAPSHOT_EXPORT_EVERY_S": "0.2", "NCF_STREAM_EVAL_INTERVAL_S": "3600",
       "NCF_STREAM_KAFKA_MAX_POLL_RECORDS": "200"}


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if value := condition():
                return value
        except (httpx.HTTPError, OSError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def first_half(bootstrap: str, prefix: str, seed: int) -> tuple[Events, str, dict[str, str]]:
    """A stream, a fresh topic of PARTITIONS partitions with the stream's first half on it
    (keyed by user), and the daemons' environment for it."""
    events = generate(SynthConfig(users=120, items=80, events=3000, seed=seed,
                                  topics=4)).to_events()
    topic = partitioned_topic(bootstrap, prefix, PARTITIONS)
    publish_keyed(bootstrap, topic, events.take(np.arange(len(events) // 2)))
    return events, topic, {**ENV, "NCF_STREAM_KAFKA_BOOTSTRAP": bootstrap,
                           "NCF_STREAM_KAFKA_TOPIC": topic,
                           "NCF_STREAM_KAFKA_DLQ_TOPIC": f"{topic}.dlq"}


def status(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=5).json()


def answer(port: int, user: str) -> tuple[list[str], bool]:
    """The top 10 for ``user`` and whether it was a cold start (a user the server lacks)."""
    r = httpx.post(f"http://127.0.0.1:{port}/v1/recommend", json={"user": user, "k": 10},
                   timeout=5)
    r.raise_for_status()
    body = r.json()
    return [x["item"] for x in body["items"]], body["cold_start"]


def assert_replica_answers_as(replica: int, owner: int, rank: int, user: str) -> None:
    """The replica answers ``user`` as the trainer owning it (rank ``rank``), from the same
    model version. Replay may still be publishing (until its budget is spent): an answer
    counts when the replica served the owner's version throughout."""
    def versions() -> tuple[int, int]:
        ranks = {r["rank"]: r["model_version"] for r in status(replica)["ranks"]}
        return status(owner)["model_version"], ranks[rank]

    for _ in range(300):
        before = versions()
        got, want = answer(replica, user), answer(owner, user)
        if before[0] == before[1] and versions() == before:
            assert got == want, user
            return
        time.sleep(0.1)
    raise AssertionError(f"the replica never caught up with trainer :{owner}")


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[str]]:
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stored(directory: Path, epoch: int | None = None) -> tuple[set[Any], set[Any]]:
    """The (user, item, time) pairs and the hold-outs of a checkpoint, by external ids:
    the newest in ``directory``, or the one of a group ``epoch``."""
    for ckpt in sorted(directory.glob("ckpt-*"), reverse=True):
        meta = json.loads((ckpt / "meta.json").read_text())
        if epoch is None or meta.get("group", {}).get("epoch") == epoch:
            break
    else:
        raise AssertionError(f"no checkpoint of epoch {epoch} in {directory}")
    store = InteractionStore.load(ckpt / "store.npz")
    users, items = IdMap.load(ckpt / "users.npz"), IdMap.load(ckpt / "items.npz")
    keys, vals = store._pairs.arrays()
    u, i = split_keys(keys)
    t0 = store._t0 or 0.0
    pairs = set(zip(users.ids(u).tolist(), items.ids(i).tolist(),
                    (vals.astype(np.float64) + t0).tolist(), strict=True))
    ho = store.holdout()
    holdouts = set(zip(users.ids(ho.users).tolist(), items.ids(ho.items).tolist(), strict=True))
    return pairs, holdouts


def test_a_group_of_two_survives_a_kill_9_and_ends_with_the_single_trainers_stores(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    events, topic, base = first_half(kafka_bootstrap, "grp-e2e", seed=5)
    half = len(events) // 2
    group_ckpt, snapshots = tmp_path / "group", tmp_path / "snapshots"
    first = free_port()
    http = [first, first + 1]  # rank r serves on the given port plus r
    grpc, replica_port = free_port(), free_port()
    group_env = {**base, "NCF_STREAM_KAFKA_GROUP_ID": f"{topic}-group",
                 "NCF_STREAM_CHECKPOINT_DIR": str(group_ckpt),
                 "NCF_STREAM_SNAPSHOT_DIR": str(snapshots)}
    with process([*CLI, "serve", "--workers", "2", "--http-port", str(http[0]), "--grpc-port",
                  str(grpc)], group_env, tmp_path / "group.log") as supervisor, \
         process([*CLI, "serve-replica", "--snapshot-dir", str(snapshots), "--http-port",
                  str(replica_port), "--grpc-port", "0"], base, tmp_path / "replica.log"):
        log = (tmp_path / "group.log").read_text

        def consumed() -> int:
            return sum(status(p)["events_consumed"] for p in http)

        wait_for(lambda: consumed() >= half, 120, "the first half consumed")
        for rank, port in enumerate(http):  # each trainer says which rank it is
            assert [r["rank"] for r in status(port)["ranks"]] == [rank]
        manifest = wait_for(lambda: read_manifest(group_ckpt), 60, "an aligned checkpoint")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{replica_port}/readyz").status_code == 200,
                 60, "the replica ready")
        # Requests to the replica go on through the kill and the group's restart.
        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        def ask() -> None:
            users = sorted(set(events.users.tolist()))
            while not stop.is_set():
                for user in users[:20]:
                    try:
                        answer(replica_port, user)
                        answered[0] += 1
                    except httpx.HTTPError as e:
                        failures.append(f"{user}: {e!r}")
        asker = threading.Thread(target=ask)
        asker.start()
        try:
            pid = int(log().split("trainer 1 of 2 (pid ")[1].split(")")[0])
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: "generation 2" in log(), 120, "the group restarted")
            publish_keyed(kafka_bootstrap, topic, events.take(np.arange(half, len(events))))
            wait_for(lambda: consumed() >= len(events), 180, "every event consumed")
        finally:
            stop.set()
            asker.join()
        assert not failures, failures[:5]
        assert answered[0] > 0
        assert manifest["size"] == 2

        # Any user, asked of the replica, gets what the trainer owning it answers, from
        # the same model version. Replay may still be publishing (until its budget is
        # spent): an answer counts when the replica served the owner's version throughout.
        owners = {}
        for user in sorted(set(events.users.tolist())):
            known = [(p, items) for p in http for items, cold in [answer(p, user)] if not cold]
            assert len(known) == 1, user  # keyed by user: one owner
            owners[user] = known[0][0]
            assert_replica_answers_as(replica_port, owners[user], http.index(owners[user]), user)
        assert set(owners.values()) == set(http)  # both trainers own users

        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, log()

    want_pairs, want_holdouts = reference_stores(tmp_path, base, topic, len(events))
    final = read_manifest(group_ckpt)
    assert final is not None and final["epoch"] > manifest["epoch"]
    got = [stored(group_ckpt / f"rank-{r}", final["epoch"]) for r in range(2)]
    assert got[0][0].isdisjoint(got[1][0])  # each user's pairs on one trainer only
    assert got[0][0] | got[1][0] == want_pairs  # every event's effect exactly once
    assert got[0][1] | got[1][1] == want_holdouts


def reference_stores(tmp: Path, base: dict[str, str], topic: str, n: int
                     ) -> tuple[set[Any], set[Any]]:
    """What one trainer over the whole topic, from the start, holds once it consumed n."""
    ref_ckpt = tmp / "single"
    single_port = free_port()
    with process([*CLI, "serve", "--http-port", str(single_port), "--grpc-port", "0"],
                 {**base, "NCF_STREAM_KAFKA_GROUP_ID": f"{topic}-single",
                  "NCF_STREAM_CHECKPOINT_DIR": str(ref_ckpt)}, tmp / "single.log") as single:
        wait_for(lambda: status(single_port)["events_consumed"] >= n, 120,
                 "the single trainer consumed every event")
        single.send_signal(signal.SIGTERM)
        assert single.wait(timeout=60) == 0
    return stored(ref_ckpt)


def test_a_lost_trainers_partitions_move_to_the_survivor_with_its_users(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    """Two trainers started apart (as on two machines); one is lost for good (SIGKILL),
    the other fails the group and exits; the survivor restarts alone from the same
    checkpoint directory: it re-deals the group's last aligned epoch, takes all four
    partitions and the lost trainer's users, and ends with one trainer's stores. A
    replica answers throughout."""
    events, topic, base = first_half(kafka_bootstrap, "grp-move", seed=6)
    half = len(events) // 2
    ckpt, snapshots = tmp_path / "group", tmp_path / "snapshots"
    http, replica_port = [free_port(), free_port()], free_port()
    trainer_env = {**base, "NCF_STREAM_KAFKA_GROUP_ID": f"{topic}-group",
                   "NCF_STREAM_CHECKPOINT_DIR": str(ckpt),
                   "NCF_STREAM_SNAPSHOT_DIR": str(snapshots)}
    address = f"127.0.0.1:{free_port()}"

    def trainer(rank: int) -> Any:
        return process([*CLI, "serve", "--http-port", str(http[rank]), "--grpc-port", "0"],
                       {**trainer_env, "NCF_STREAM_GROUP_SIZE": "2",
                        "NCF_STREAM_GROUP_RANK": str(rank), "NCF_STREAM_GROUP_ADDRESS": address},
                       tmp_path / f"rank{rank}.log")

    with process([*CLI, "serve-replica", "--snapshot-dir", str(snapshots), "--http-port",
                  str(replica_port), "--grpc-port", "0"], base, tmp_path / "replica.log"), \
            trainer(0) as rank0, trainer(1) as rank1:
        wait_for(lambda: sum(status(p)["events_consumed"] for p in http) >= half, 120,
                 "the first half consumed")
        wait_for(lambda: read_manifest(ckpt), 60, "an aligned checkpoint")
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{replica_port}/readyz").status_code == 200,
                 60, "the replica ready")
        failures: list[str] = []
        stop = threading.Event()
        users = sorted(set(events.users.tolist()))

        def ask() -> None:
            while not stop.is_set():
                for user in users[:20]:
                    try:
                        answer(replica_port, user)
                    except httpx.HTTPError as e:
                        failures.append(f"{user}: {e!r}")
        asker = threading.Thread(target=ask)
        asker.start()
        try:
            rank1.kill()  # lost for good
            assert rank0.wait(timeout=90) == 3  # the group failed: a group error
            with process([*CLI, "serve", "--http-port", str(http[0]), "--grpc-port", "0"],
                         trainer_env, tmp_path / "alone.log") as alone:
                publish_keyed(kafka_bootstrap, topic, events.take(np.arange(half, len(events))))
                wait_for(lambda: status(http[0])["events_consumed"] >= len(events), 180,
                         "every event consumed by the survivor")
                # Every user is the survivor's now, and the replica answers it from there
                # (the lost trainer's last exports are older).
                # Checkpointed at its new size, the survivor removed rank 1's directories,
                # and the replica no longer serves that rank.
                wait_for(lambda: [r["rank"] for r in status(replica_port)["ranks"]] == [0],
                         60, "the replica dropping the lost rank")
                assert not (ckpt / "rank-1").exists() and not (snapshots / "rank-1").exists()
                for user in users:
                    assert not answer(http[0], user)[1], user  # known: not a cold start
                    assert_replica_answers_as(replica_port, http[0], 0, user)
                stop.set()
                asker.join()
                alone.send_signal(signal.SIGTERM)
                assert alone.wait(timeout=60) == 0, (tmp_path / "alone.log").read_text()
        finally:
            stop.set()
            asker.join()
        assert not failures, failures[:5]
    final = read_manifest(ckpt)
    assert final is not None and final["size"] == 1
    want_pairs, want_holdouts = reference_stores(tmp_path, base, topic, len(events))
    got_pairs, got_holdouts = stored(ckpt / "rank-0", final["epoch"])
    assert got_pairs == want_pairs  # every event's effect exactly once, across the move
    assert got_holdouts == want_holdouts
