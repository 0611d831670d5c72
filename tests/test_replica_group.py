"""A serving replica over a group of trainers: ``{snapshot_dir}/rank-{r}/`` each a trainer's
export directory, each user answered from the rank whose snapshot knows it.

Two trainers with disjoint users (even and odd ids) and the same items are exported
with the real :class:`~ncf_stream.export.Exporter`, no Kafka; every answer the
replica gives is checked against a Recommender over the owning rank's export read
directly (the brute force), never against fixed answers.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from conftest import SMALL, small_engine_settings, train_stream  # tests/conftest.py
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from test_replica import exported_version, until  # tests/test_replica.py

from ncf_stream import export
from ncf_stream.api import Status
from ncf_stream.events import Events
from ncf_stream.metrics import EngineMetrics
from ncf_stream.proto import recommender_pb2 as pb
from ncf_stream.proto import recommender_pb2_grpc as pb_grpc
from ncf_stream.recommend import Recommendation, Recommender
from ncf_stream.replica import Replica
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer

CPU = torch.device("cpu")


class Trained:
    """One rank's trainer and publisher: what a group member would export."""

    def __init__(self, rank: int, events: Events) -> None:
        self.rank, self.trainer = rank, Trainer(SMALL)
        self.publisher = Publisher(self.trainer, SnapshotHolder())
        self.events = 0
        self.train(events)

    def train(self, events: Events) -> None:
        train_stream(self.trainer, events, poll=1000, replay_steps=3)
        self.events += len(events)

    def export(self, root: Path, directory: Path | None = None) -> int:
        """Publish a snapshot and export it to ``root/rank-<r>`` (or ``directory``) with the
        real Exporter; returns its version once LATEST names it."""
        self.publisher.publish(self.events)
        snap = self.publisher.holder.get()
        assert snap is not None
        directory = directory or root / f"rank-{self.rank}"
        exporter = export.Exporter(directory, 0.0, EngineMetrics(CollectorRegistry()))
        try:
            exporter.offer(snap, Status(events_consumed=self.events, users=snap.n_users,
                                        items=snap.n_items))
            until(lambda: exported_version(directory) == snap.version)
        finally:
            exporter.close()
        return snap.version


def split_stream() -> tuple[list[Events], str]:
    """Two ranks' streams, users by parity, over the same items; and one user of rank 0
    whose first few events also reached rank 1 (events not keyed by user)."""
    stream = generate(SynthConfig(users=120, items=50, events=4000, seed=3,
                                  topics=4)).to_events()
    ids = np.array([int(u) for u in stream.users])
    parts = [stream.take(np.flatnonzero(ids % 2 == r)) for r in (0, 1)]
    shared = str(np.bincount(ids[ids % 2 == 0]).argmax())  # rank 0's busiest user
    stray = np.flatnonzero(stream.users == shared)[:5]
    return [parts[0], concat(parts[1], stream.take(stray))], shared


def concat(a: Events, b: Events) -> Events:
    return Events(*(np.concatenate([getattr(a, f), getattr(b, f)])
                    for f in ("users", "items", "ts", "weights", "types")))


@pytest.fixture(scope="module")
def trained() -> tuple[list[Trained], str]:
    streams, shared = split_stream()
    return [Trained(rank, events) for rank, events in enumerate(streams)], shared


def settings(root: Path) -> Any:
    return small_engine_settings(snapshot_dir=str(root), http_port=0, grpc_port=0)


def direct(root: Path, rank: int, replica: Replica) -> Recommender:
    """A Recommender over rank ``rank``'s newest export, read directly: the owner's own
    answers, with the replica's serving settings."""
    directory = root / f"rank-{rank}"
    holder = SnapshotHolder()
    holder.set(export.read(directory / str(export.latest(directory)), CPU).snapshot)
    return Recommender.from_settings(holder, replica.settings)


def served_versions(replica: Replica) -> list[int]:
    return [0 if (s := m.holder.get()) is None else s.version for m in replica.group.ranks]


@pytest.fixture
def group(tmp_path: Path, trained: tuple[list[Trained], str]) -> Iterator[
        tuple[Path, list[int], Replica]]:
    """Both ranks exported to tmp_path (rank 1 after rank 0: its snapshot is the newer),
    and a replica serving tmp_path, once it has loaded both."""
    ranks, _ = trained
    versions = []
    for t in ranks:
        versions.append(t.export(tmp_path))
        time.sleep(0.01)  # publish times apart: "newer" is well defined
    replica = Replica(settings(tmp_path))
    replica.start()
    try:
        until(lambda: served_versions(replica) == versions)
        yield tmp_path, versions, replica
    finally:
        replica.stop()


def users_of(replica: Replica, rank: int, shared: str, n: int = 6) -> list[str]:
    users = users_of_snapshot(replica.group.ranks[rank].holder, shared, n)
    assert all(int(u) % 2 == rank for u in users)  # disjoint, as built
    return users


def users_of_snapshot(holder: SnapshotHolder, shared: str, n: int) -> list[str]:
    snap = holder.get()
    assert snap is not None
    return [u for u in snap.user_ids.ids(np.arange(snap.n_users)).tolist() if u != shared][:n]


def same(got: dict[str, Any], want: Recommendation) -> None:
    assert [i["item"] for i in got["items"]] == want.items
    assert [i["score"] for i in got["items"]] == want.scores
    assert (got["model_version"], got["cold_start"]) == (want.model_version, want.cold_start)


def same_pb(got: Any, want: Recommendation) -> None:
    assert [(i.item, i.score) for i in got.items] == list(zip(want.items, want.scores,
                                                              strict=True))
    assert (got.model_version, got.cold_start) == (want.model_version, want.cold_start)


def several(replica: Replica) -> float:
    return replica.registry.get_sample_value(
        "ncf_stream_replica_users_in_several_ranks_total") or 0.0


def clients(replica: Replica) -> tuple[httpx.Client, grpc.Channel]:
    return (httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}", timeout=10),
            grpc.insecure_channel(f"127.0.0.1:{replica.grpc_port}"))


def test_each_user_is_answered_by_its_owner_and_the_rest_by_rank_0(
        group: tuple[Path, list[int], Replica], trained: tuple[list[Trained], str]) -> None:
    root, versions, replica = group
    _, shared = trained
    owners = [direct(root, r, replica) for r in (0, 1)]
    http, channel = clients(replica)
    with http, channel:
        stub = pb_grpc.RecommenderStub(channel)
        for rank in (0, 1):
            for user in users_of(replica, rank, shared):
                for exclude in ("seen", "none"):
                    want = owners[rank].recommend(user, 10, exclude)
                    assert not want.cold_start and want.model_version == versions[rank]
                    same(http.post("/v1/recommend", json={"user": user, "exclude": exclude})
                         .json(), want)
                    same_pb(stub.Recommend(pb.RecommendRequest(user=user, k=10,
                                                               exclude=exclude)), want)
            user = users_of(replica, rank, shared)[0]
            items = owners[rank].snapshot().item_ids.ids(np.arange(5)).tolist()
            assert http.post("/v1/score", json={"user": user, "items": items}).json()[
                "scores"] == owners[rank].score(user, items).scores
            known = owners[rank].known_items(user, 0, 5)
            got = http.get(f"/v1/users/{user}/items", params={"limit": 5}).json()
            assert [i["item"] for i in got["items"]] == known.items
            assert got["total"] == known.total and got["model_version"] == versions[rank]
        # Nobody knows these: rank 0's cold start; nor items' requests: rank 0's.
        for user in ("nobody", "1000001"):
            want = owners[0].recommend(user, 7)
            assert want.cold_start and want.scores != owners[1].recommend(user, 7).scores
            same(http.post("/v1/recommend", json={"user": user, "k": 7}).json(), want)
            same_pb(stub.Recommend(pb.RecommendRequest(user=user, k=7)), want)
        assert http.get("/v1/users/nobody/items").status_code == 404
        items = owners[0].snapshot().item_ids.ids(np.arange(6)).tolist()
        anonymous = owners[0].recommend_items(items[:4], 8)
        same(http.post("/v1/recommend", json={"items": items[:4], "k": 8}).json(), anonymous)
        similar = owners[0].similar(items[0], 5)
        assert similar.scores != owners[1].similar(items[0], 5).scores  # rank 0's, not any
        got = http.post("/v1/similar", json={"item": items[0], "k": 5}).json()
        assert [(i["item"], i["score"]) for i in got["items"]] == list(
            zip(similar.items, similar.scores, strict=True))
        assert got["model_version"] == versions[0]
        popular = owners[0].popular(6)
        got = http.get("/v1/popular", params={"k": 6}).json()
        assert [(i["item"], i["count"]) for i in got["items"]] == list(
            zip(popular.items, popular.counts, strict=True))
    assert several(replica) == 0  # no shared user asked yet


def test_a_batch_is_split_by_owner_and_comes_back_in_order(
        group: tuple[Path, list[int], Replica], trained: tuple[list[Trained], str]) -> None:
    root, _, replica = group
    _, shared = trained
    owners = [direct(root, r, replica) for r in (0, 1)]
    evens, odds = users_of(replica, 0, shared, 4), users_of(replica, 1, shared, 4)
    batch = [odds[0], evens[0], "nobody", evens[1], odds[1], odds[2], shared, evens[2],
             "nobody-else", odds[3]]
    owner = [1, 0, 0, 0, 1, 1, 1, 0, 0, 1]  # shared: rank 1's snapshot is the newer
    want = [owners[r].recommend(u, 5, "none") for u, r in zip(batch, owner, strict=True)]
    http, channel = clients(replica)
    with http, channel:
        got = http.post("/v1/recommend/batch", json={"users": batch, "k": 5,
                                                     "exclude": "none"}).json()["results"]
        assert [r["user"] for r in got] == batch
        for g, w in zip(got, want, strict=True):
            same(g, w)
        g = pb_grpc.RecommenderStub(channel).RecommendBatch(pb.RecommendBatchRequest(
            users=batch, k=5, exclude="none"))
        assert [r.user for r in g.results] == batch
        for r, w in zip(g.results, want, strict=True):
            same_pb(r, w)
        # One rank's users only: still that rank's answers.
        got = http.post("/v1/recommend/batch", json={"users": odds, "k": 3}).json()["results"]
        for g, u in zip(got, odds, strict=True):
            same(g, owners[1].recommend(u, 3))
    assert several(replica) == 2  # the shared user, once per batch


def test_a_user_two_ranks_know_is_answered_from_the_newer_snapshot_and_counted(
        group: tuple[Path, list[int], Replica], trained: tuple[list[Trained], str]) -> None:
    root, versions, replica = group
    ranks, shared = trained
    for r in (0, 1):  # both snapshots know it
        assert replica.group.ranks[r].holder.get().user_row(shared) is not None  # type: ignore[union-attr]
    http = httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}", timeout=10)
    with http:
        want = direct(root, 1, replica).recommend(shared)
        assert want.scores != direct(root, 0, replica).recommend(shared).scores
        same(http.post("/v1/recommend", json={"user": shared}).json(), want)
        assert several(replica) == 1
        time.sleep(0.01)
        newer = ranks[0].export(root)  # now rank 0's is the newer
        until(lambda: served_versions(replica) == [newer, versions[1]])
        want = direct(root, 0, replica).recommend(shared)
        assert want.model_version == newer
        same(http.post("/v1/recommend", json={"user": shared}).json(), want)
        got = http.get(f"/v1/users/{shared}/items").json()
        total = direct(root, 0, replica).known_items(shared).total
        assert got["total"] == total != direct(root, 1, replica).known_items(shared).total
        assert several(replica) == 3  # every answer for it: its known items too


def test_status_readiness_and_a_rank_exporting_on_its_own(
        tmp_path: Path, trained: tuple[list[Trained], str]) -> None:
    ranks, shared = trained
    v0 = ranks[0].export(tmp_path)
    (tmp_path / "rank-1").mkdir()  # rank 1 has started: no export yet
    replica = Replica(settings(tmp_path))
    replica.start()
    http, channel = clients(replica)
    try:
        with http, channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                return health.Check(health_pb2.HealthCheckRequest()).status == (
                    health_pb2.HealthCheckResponse.SERVING)

            until(lambda: served_versions(replica) == [v0, 0])
            # Rank 0 answers its users (and everyone else) meanwhile; not ready yet.
            user0 = users_of(replica, 0, shared, 1)[0]
            same(http.post("/v1/recommend", json={"user": user0}).json(),
                 direct(tmp_path, 0, replica).recommend(user0))
            r = http.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
            assert not serving()
            status = http.get("/v1/status").json()
            assert status["ingest"] == "degraded" and status["model_version"] == v0
            assert "rank 1: no snapshot loaded yet" in status["ingest_reason"]
            assert [(s["rank"], s["model_version"]) for s in status["ranks"]] == [(0, v0),
                                                                                  (1, 0)]

            v1 = ranks[1].export(tmp_path)
            until(lambda: served_versions(replica) == [v0, v1])
            until(serving)
            assert http.get("/readyz").json() == {"status": "ready", "model_version": v0}
            status = http.get("/v1/status").json()
            assert (status["role"], status["ingest"], status["ingest_reason"]) == (
                "replica", "ok", "")
            assert [(s["rank"], s["model_version"]) for s in status["ranks"]] == [(0, v0),
                                                                                  (1, v1)]
            ages = [s["snapshot_age_seconds"] for s in status["ranks"]]
            assert all(0 <= a < 60 for a in ages)
            assert status["snapshot_age_seconds"] == max(ages)  # the oldest
            assert status["events_consumed"] == ranks[0].events + ranks[1].events
            g = pb_grpc.RecommenderStub(channel).Status(pb.StatusRequest())
            assert [(s.rank, s.model_version) for s in g.ranks] == [(0, v0), (1, v1)]
            assert g.model_version == v0 and g.role == "replica"

            # Rank 1 trains new users and exports; rank 0 serves on, unchanged.
            newcomers = [f"{2 * n + 1}001" for n in range(3)]  # odd: rank 1's
            items = ranks[1].trainer.item_ids.ids(np.arange(9)).tolist()
            for user in newcomers:  # unknown so far: rank 0's cold start
                want = direct(tmp_path, 0, replica).recommend(user)
                assert want.cold_start
                same(http.post("/v1/recommend", json={"user": user}).json(), want)
            ranks[1].train(Events.from_rows([
                (u, i, 2e9 + n, "click", 1.0)
                for n, (u, i) in enumerate((u, i) for u in newcomers for i in items)]))
            time.sleep(0.01)
            v1b = ranks[1].export(tmp_path)
            until(lambda: served_versions(replica) == [v0, v1b])
            owners = [direct(tmp_path, r, replica) for r in (0, 1)]
            for user in newcomers:
                want = owners[1].recommend(user)
                assert not want.cold_start and want.model_version == v1b
                same(http.post("/v1/recommend", json={"user": user}).json(), want)
            same(http.post("/v1/recommend", json={"user": user0}).json(),
                 owners[0].recommend(user0))
            metrics = http.get("/metrics").text
            assert f'ncf_stream_replica_rank_snapshot_version{{rank="1"}} {float(v1b)}' in (
                metrics)
            assert f"ncf_stream_replica_snapshot_version {float(v0)}" in metrics
            # Rank 0's snapshot, never re-exported, is the oldest: it drives the stale check.
            replica.group.ranks[0].watcher.stale_s = 1e-3
            status = http.get("/v1/status").json()
            assert status["ingest"] == "degraded"
            assert status["ingest_reason"].startswith("rank 0: the served snapshot is")
            assert status["snapshot_age_seconds"] == status["ranks"][0]["snapshot_age_seconds"]
    finally:
        replica.stop()


def test_a_directory_with_a_latest_of_its_own_is_one_trainers(
        tmp_path: Path, trained: tuple[list[Trained], str]) -> None:
    """LATEST at the top: a single trainer's directory, served as always, whatever rank
    directories are beside it."""
    ranks, shared = trained
    ranks[1].export(tmp_path)  # rank-1/: not looked at
    single = ranks[0].export(tmp_path, directory=tmp_path)
    replica = Replica(settings(tmp_path))
    replica.start()
    try:
        until(lambda: replica.holder.get() is not None)
        assert replica.group.members()[0].rank is None and replica.group.ranks == ()
        holder = SnapshotHolder()
        holder.set(export.read(tmp_path / str(export.latest(tmp_path)), CPU).snapshot)
        want = Recommender.from_settings(holder, replica.settings)
        with httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}",
                          timeout=10) as http:
            for user in [*users_of_snapshot(holder, shared, 1), "1"]:  # "1": rank 1's
                same(http.post("/v1/recommend", json={"user": user}).json(),
                     want.recommend(user))
            status = http.get("/v1/status").json()
        assert status["model_version"] == single and status["ranks"] == []
    finally:
        replica.stop()


def test_a_group_with_no_export_yet_is_not_ready(tmp_path: Path) -> None:
    for rank in (0, 1):
        (tmp_path / f"rank-{rank}").mkdir()
    replica = Replica(settings(tmp_path))
    replica.start()
    try:
        until(lambda: len(replica.group.ranks) == 2)
        with httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}",
                          timeout=10) as http:
            for body in ({"user": "1"}, {"items": ["1"]}):
                r = http.post("/v1/recommend", json=body)
                assert r.status_code == 503 and r.json()["error"] == "not_ready"
            assert http.post("/v1/recommend/batch", json={"users": ["1", "2"]}).status_code == 503
            assert http.get("/readyz").status_code == 503
            status = http.get("/v1/status").json()
        assert status["ingest"] == "degraded" and status["model_version"] == 0
        assert [(s["rank"], s["model_version"]) for s in status["ranks"]] == [(0, 0), (1, 0)]
        assert "rank 0: no snapshot" in status["ingest_reason"]
        assert "rank 1: no snapshot" in status["ingest_reason"]
    finally:
        replica.stop()


def test_a_rank_directory_removed_is_no_longer_served(
        group: tuple[Path, list[int], Replica], trained: tuple[list[Trained], str]) -> None:
    """A group that shrank removes the directories beyond its size: a user only the removed
    rank knew (deleted since by its new owner, say) must not be answered from it."""
    root, _, replica = group
    _, shared = trained
    gone = users_of(replica, 1, shared)
    http = httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}", timeout=10)
    with http:
        assert http.post("/v1/recommend", json={"user": gone[0]}).json()["cold_start"] is False
        shutil.rmtree(root / "rank-1")
        until(lambda: [m.rank for m in replica.group.ranks] == [0])
        for user in gone:  # rank 0 never knew them: its cold start
            same(http.post("/v1/recommend", json={"user": user}).json(),
                 direct(root, 0, replica).recommend(user))
        same(http.post("/v1/recommend", json={"user": shared}).json(),
             direct(root, 0, replica).recommend(shared))
        assert [r["rank"] for r in http.get("/v1/status").json()["ranks"]] == [0]
