"""Serving replicas: the trainer's snapshot export and ``ncf-stream serve-replica``.

A replica must answer exactly as the trainer does from the same snapshot version,
pick up newer exports, reject broken ones while the last good snapshot serves on,
and the export must never hold training up.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from conftest import drain_engine, small_engine_settings  # tests/conftest.py
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from ncf_stream import export
from ncf_stream.engine import Engine
from ncf_stream.errors import ConfigError
from ncf_stream.metrics import ReplicaMetrics
from ncf_stream.proto import recommender_pb2 as pb
from ncf_stream.proto import recommender_pb2_grpc as pb_grpc
from ncf_stream.recommend import Filters, Recommender
from ncf_stream.replica import Replica, SnapshotWatcher
from ncf_stream.retrieval import CandidateIndex
from ncf_stream.snapshot import Snapshot, SnapshotHolder
from ncf_stream.source import MemorySource
from ncf_stream.synth import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def stream(n: int, seed: int = 0) -> Any:
    return generate(SynthConfig(users=80, items=60, events=n, seed=seed, topics=4)).to_events()


def settings(snapshot_dir: Path, **overrides: Any) -> Any:
    return small_engine_settings(snapshot_dir=str(snapshot_dir), snapshot_export_every_s=0.01,
                                 http_port=0, grpc_port=0, holdout_fraction=1.0, **overrides)


def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def exported_version(directory: Path) -> int | None:
    name = export.latest(directory)
    if name is None:
        return None
    return int(json.loads((directory / name / "meta.json").read_text())["version"])


def trained_engine(directory: Path, events: int = 2500, **overrides: Any) -> Engine:
    """An engine trained on a planted stream, its newest snapshot exported."""
    engine = Engine(settings(directory, **overrides), MemorySource(stream(events)))
    drain_engine(engine)
    version = engine.holder.get().version  # type: ignore[union-attr]
    until(lambda: exported_version(directory) == version)
    return engine


def watcher(directory: Path) -> tuple[SnapshotWatcher, CollectorRegistry]:
    registry = CollectorRegistry()
    return SnapshotWatcher(directory, SnapshotHolder(), ReplicaMetrics(registry)), registry


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, Replica]]:
    """A trained engine with its snapshot exported, and a replica serving that export."""
    directory = tmp_path_factory.mktemp("snapshots")
    engine = trained_engine(directory)
    replica = Replica(settings(directory))
    replica.start()
    try:
        until(lambda: replica.holder.get() is not None)
        yield engine, replica
    finally:
        replica.stop()
        engine.close()


def test_replica_answers_exactly_as_the_trainer_over_http_and_grpc(
        pair: tuple[Engine, Replica]) -> None:
    engine, replica = pair
    want: Recommender = engine.recommender
    snap = engine.holder.get()
    assert snap is not None and replica.holder.get().version == snap.version  # type: ignore[union-attr]
    users = snap.user_ids.ids(np.arange(6)).tolist()
    items = snap.item_ids.ids(np.arange(12)).tolist()
    with httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}", timeout=10) as http, \
            grpc.insecure_channel(f"127.0.0.1:{replica.grpc_port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for user in [*users, "nobody"]:  # "nobody": a cold start
            for exclude in ("seen", "trained", "none"):
                r = want.recommend(user, 10, exclude)
                got = http.post("/v1/recommend", json={"user": user, "k": 10,
                                                       "exclude": exclude}).json()
                assert [i["item"] for i in got["items"]] == r.items
                assert [i["score"] for i in got["items"]] == r.scores
                assert got["model_version"] == r.model_version
                assert got["cold_start"] == r.cold_start
                g = stub.Recommend(pb.RecommendRequest(user=user, k=10, exclude=exclude))
                assert [i.item for i in g.items] == r.items
                assert [i.score for i in g.items] == r.scores
        user = users[0]
        filtered = want.recommend(user, 5, filters=Filters(tuple(items[:3]), None))
        got = http.post("/v1/recommend", json={"user": user, "k": 5,
                                               "exclude_items": items[:3]}).json()
        assert [(i["item"], i["score"]) for i in got["items"]] == list(
            zip(filtered.items, filtered.scores, strict=True))
        within = want.recommend(user, 5, "none", Filters((), tuple(items)))
        g = stub.Recommend(pb.RecommendRequest(user=user, k=5, exclude="none",
                                               include_only=items))
        assert [(i.item, i.score) for i in g.items] == list(
            zip(within.items, within.scores, strict=True))
        anonymous = want.recommend_items(items[:4], 8)
        got = http.post("/v1/recommend", json={"items": items[:4], "k": 8}).json()
        assert [(i["item"], i["score"]) for i in got["items"]] == list(
            zip(anonymous.items, anonymous.scores, strict=True))
        batch = want.recommend_many(users[:3], 4)
        got = http.post("/v1/recommend/batch", json={"users": users[:3], "k": 4}).json()
        assert [[i["item"] for i in r["items"]] for r in got["results"]] == [
            r.items for r in batch]
        assert http.post("/v1/score", json={"user": user, "items": items[:5]}).json()[
            "scores"] == want.score(user, items[:5]).scores
        similar = want.similar(items[0], 6)
        got = http.post("/v1/similar", json={"item": items[0], "k": 6}).json()
        assert [(i["item"], i["score"]) for i in got["items"]] == list(
            zip(similar.items, similar.scores, strict=True))
        popular = want.popular(7)
        got = http.get("/v1/popular", params={"k": 7}).json()
        assert [(i["item"], i["count"]) for i in got["items"]] == list(
            zip(popular.items, popular.counts, strict=True))
        assert got["window_seconds"] == popular.window_s
        known = want.known_items(user, 1, 5)
        got = http.get(f"/v1/users/{user}/items", params={"offset": 1, "limit": 5}).json()
        assert [(i["item"], i["ts"]) for i in got["items"]] == list(
            zip(known.items, known.ts, strict=True))
        assert got["total"] == known.total
        g = stub.UserItems(pb.UserItemsRequest(user=user, offset=1, limit=5))
        assert [i.item for i in g.items] == known.items


def test_replica_reports_itself_and_refuses_what_needs_the_trainer(
        pair: tuple[Engine, Replica]) -> None:
    engine, replica = pair
    snap = engine.holder.get()
    assert snap is not None
    with httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}", timeout=10) as http, \
            grpc.insecure_channel(f"127.0.0.1:{replica.grpc_port}") as channel:
        status = http.get("/v1/status").json()
        assert status["role"] == "replica" and status["ingest"] == "ok"
        assert status["model_version"] == snap.version
        assert status["snapshot_events"] == snap.events
        assert status["events_consumed"] == engine.counters.consumed  # the trainer's, as of it
        assert 0 <= status["snapshot_age_seconds"] < 60
        assert engine.status().role == "trainer"
        stub = pb_grpc.RecommenderStub(channel)
        g = stub.Status(pb.StatusRequest())
        assert g.role == "replica" and g.model_version == snap.version
        assert http.get("/readyz").json() == {"status": "ready", "model_version": snap.version}
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        for path in ("/v1/eval", "/v1/history", "/"):
            r = http.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_served", path
            assert "trainer" in r.json()["detail"]
        r = http.delete("/v1/admin/users/1", headers={"Authorization": "Bearer " + "x" * 16})
        assert r.status_code == 404 and "replica" in r.json()["detail"]
        with pytest.raises(grpc.RpcError) as e:
            stub.DeleteUser(pb.DeleteRequest(id="1"))
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        metrics = http.get("/metrics").text
        assert f"ncf_stream_replica_snapshot_version {float(snap.version)}" in metrics
        assert 'ncf_stream_request_duration_seconds_count{endpoint="/v1/status"' in metrics


def test_replica_is_not_ready_until_a_snapshot_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="snapshot_dir"):
        Replica(settings(tmp_path).model_copy(update={"snapshot_dir": None}))
    replica = Replica(settings(tmp_path))
    replica.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{replica.http_port}", timeout=10) as http:
            r = http.get("/readyz")
            assert r.status_code == 503 and r.json()["error"] == "not_ready"
            assert http.post("/v1/recommend", json={"user": "1"}).status_code == 503
            status = http.get("/v1/status").json()
            assert status["ingest"] == "degraded"
            assert "no snapshot loaded yet" in status["ingest_reason"]
    finally:
        replica.stop()


def test_replica_picks_up_newer_versions_and_reports_them(tmp_path: Path) -> None:
    source = MemorySource(stream(1500))
    engine = Engine(settings(tmp_path), source)
    try:
        drain_engine(engine)
        first = engine.holder.get().version  # type: ignore[union-attr]
        until(lambda: exported_version(tmp_path) == first)
        w, registry = watcher(tmp_path)
        assert w.poll() and w.holder.get().version == first  # type: ignore[union-attr]
        assert not w.poll()  # nothing new: LATEST is only stat()ed
        source.push(stream(1500, seed=1))
        drain_engine(engine)
        second = engine.holder.get().version  # type: ignore[union-attr]
        assert second > first
        until(lambda: exported_version(tmp_path) == second)
        assert w.poll()
        served = w.holder.get()
        assert served is not None and served.version == second
        assert served.events == engine.holder.get().events == 3000  # type: ignore[union-attr]
        status = w.status()
        assert (status.model_version, status.role, status.ingest) == (second, "replica", "ok")
        assert registry.get_sample_value("ncf_stream_replica_snapshot_version") == second
        assert registry.get_sample_value("ncf_stream_replica_snapshot_loads_total") == 2
        age = registry.get_sample_value("ncf_stream_replica_snapshot_age_seconds")
        assert age is not None and 0 <= age < 60
        # Only the newest exports are kept (once the one being written has pruned the
        # oldest: the exporter thread may be between its rename and its prune now).
        until(lambda: len(list(tmp_path.glob("snap-*"))) <= export.KEEP)
        w.stale_s = 1e-3
        assert "old" in w.status().ingest_reason and w.status().ingest == "degraded"
    finally:
        engine.close()


def test_a_broken_export_is_rejected_and_the_last_good_one_serves_on(tmp_path: Path) -> None:
    engine = trained_engine(tmp_path, events=1200)
    try:
        w, registry = watcher(tmp_path)
        assert w.poll()
        good = w.holder.get()
        assert good is not None

        def publish_and_export() -> Path:
            engine.publisher.publish(engine.watermark.value)
            return export.write(tmp_path, engine.holder.get(), engine.status())  # type: ignore[arg-type]

        def failures(reason: str) -> float | None:
            return registry.get_sample_value(
                "ncf_stream_replica_snapshot_load_failures_total", {"reason": reason})

        truncated = publish_and_export() / "arrays.npz"
        truncated.write_bytes(truncated.read_bytes()[:100])
        assert not w.poll()
        assert failures("corrupt") == 1 and w.holder.get() is good
        assert "does not match its checksum" in w.status().ingest_reason
        assert w.status().ingest == "degraded"
        assert not w.poll()  # rejected once, not again at every poll
        assert failures("corrupt") == 1

        newer = publish_and_export() / "meta.json"
        meta = json.loads(newer.read_text())
        newer.write_text(json.dumps(meta | {"format": export.EXPORT_FORMAT + 1}))
        assert not w.poll()
        assert failures("format") == 1 and w.holder.get() is good
        assert f"format {export.EXPORT_FORMAT + 1}" in w.failure

        (tmp_path / export.LATEST).write_text("snap-99999999\n")  # gone (deleted meanwhile)
        assert not w.poll() and w.holder.get() is good
        assert failures("corrupt") == 1 and failures("error") == 0

        publish_and_export()
        assert w.poll()
        assert w.holder.get().version == engine.holder.get().version  # type: ignore[union-attr]
        assert w.status().ingest == "ok" and w.failure == ""
    finally:
        engine.close()


def test_an_unreadable_directory_degrades_and_recovers(tmp_path: Path) -> None:
    w, _ = watcher(tmp_path)
    (tmp_path / export.LATEST).mkdir()  # reading it fails as a lost mount would
    w.check()
    assert w.status().ingest == "degraded" and "cannot read" in w.status().ingest_reason
    (tmp_path / export.LATEST).rmdir()
    w.check()
    assert w.unreadable == "" and "cannot read" not in w.status().ingest_reason


def answers_alike(engine: Engine, snap: Snapshot, got: Snapshot, w: SnapshotWatcher) -> None:
    """The replica's index finds what the trainer's does, and its recommendations are the
    trainer's, for the first users."""
    queries = np.random.default_rng(0).standard_normal((5, snap.index.dim))
    assert all(np.array_equal(a, b) for a, b in zip(
        snap.index.search(queries, 5), got.index.search(queries, 5), strict=True))
    replica = Recommender.from_settings(w.holder, engine.settings)
    for user in snap.user_ids.ids(np.arange(8)).tolist():
        assert replica.recommend(user, 10) == engine.recommender.recommend(user, 10)


def test_an_ivf_index_and_the_history_input_come_back_identical(tmp_path: Path) -> None:
    """The IVF quantizer travels with the export (a retrained one would find other
    candidates), and the history input's context rows and recent items too."""
    engine = trained_engine(tmp_path, events=1500, ivf_threshold=30, exact_items=0,
                            candidates=20, nprobe=8, history_length=3, index_refresh_s=1e-6,
                            replay=True, retrieval_backend="faiss")
    try:
        def refreshed() -> bool:
            # Replay moves the weights on; a refreshed index holds newer vectors than
            # the ones its quantizer was trained on.
            engine.cycle()
            return engine.holder.get().index_version > 1  # type: ignore[union-attr]

        until(refreshed)
        snap = engine.holder.get()
        assert snap is not None and snap.index.kind == "ivf"
        until(lambda: exported_version(tmp_path) == snap.version)
        assert snap.model.recent is not None
        w, _ = watcher(tmp_path)
        assert w.poll()
        got = w.holder.get()
        assert got is not None and got.index.kind == "ivf"
        answers_alike(engine, snap, got, w)
        assert torch.equal(got.model.user_rows(torch.arange(8)),
                           snap.model.user_rows(torch.arange(8)))
    finally:
        engine.close()


def test_a_torch_index_comes_back_as_one(tmp_path: Path) -> None:
    """retrieval_backend travels in the export's index config; the replica resolves it
    on its own machine (here the CPU) and answers as the trainer does."""
    engine = trained_engine(tmp_path, events=600, exact_items=0, candidates=20,
                            retrieval_backend="torch")
    try:
        snap = engine.holder.get()
        assert snap is not None and snap.index.kind == "torch"
        w, _ = watcher(tmp_path)
        assert w.poll()
        got = w.holder.get()
        assert got is not None and got.index.kind == "torch"
        assert got.index.config == snap.index.config
        answers_alike(engine, snap, got, w)
    finally:
        engine.close()


def test_a_replica_reuses_its_index_while_the_trainer_does(tmp_path: Path) -> None:
    """An IVF index is refreshed every index_refresh_s, not per snapshot: the replica
    keeps its copy while the exported index files stay the same."""
    engine = trained_engine(tmp_path, events=1200, ivf_threshold=30, exact_items=0,
                            candidates=20, index_refresh_s=3600.0, replay=True,
                            retrieval_backend="faiss")
    try:
        w, _ = watcher(tmp_path)
        assert w.poll()
        first = w.holder.get()
        assert first is not None and first.index.kind == "ivf"
        engine.trainer.step()  # new weights, the same (not yet refreshed) index
        engine.publisher.publish(engine.watermark.value)
        export.write(tmp_path, engine.holder.get(), engine.status())  # type: ignore[arg-type]
        assert w.poll()
        second = w.holder.get()
        assert second is not None and second.version > first.version
        assert second.index is first.index
        assert not torch.equal(second.model.users.weight, first.model.users.weight)
        engine.publisher.touch(items_removed=True)  # rebuilds it in the background

        def rebuilt() -> bool:
            engine.publisher.publish(engine.watermark.value)
            return engine.holder.get().index_version != first.index_version  # type: ignore[union-attr]

        until(rebuilt)
        export.write(tmp_path, engine.holder.get(), engine.status())  # type: ignore[arg-type]
        assert w.poll()
        assert w.holder.get().index is not first.index  # type: ignore[union-attr]
    finally:
        engine.close()


def test_an_unchanged_index_is_linked_not_rewritten_nor_checked_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 1M items an IVF index's files are over 100 MB: an export of the same index
    object links the previous export's files, and a replica does not hash them again."""
    engine = trained_engine(tmp_path, events=1200, ivf_threshold=30, exact_items=0,
                            candidates=20, index_refresh_s=3600.0, replay=True,
                            retrieval_backend="faiss")
    try:
        assert engine.exporter is not None
        engine.exporter.close()  # this test writes the exports itself
        snap = engine.holder.get()
        assert snap is not None and snap.index.kind == "ivf"
        out = tmp_path / "out"
        first = export.write(out, snap, engine.status())
        engine.trainer.step()  # new weights, the same (not yet refreshed) index
        engine.publisher.publish(engine.watermark.value)
        later = engine.holder.get()
        assert later is not None and later.index is snap.index
        second = export.write(out, later, engine.status(), same_index_as=first)
        for name in export.INDEX_FILES:
            assert (first / name).stat().st_ino == (second / name).stat().st_ino
        assert (first / "model.pt").stat().st_ino != (second / "model.pt").stat().st_ino

        hashed: list[str] = []
        digest = export.checkpoint._digest

        def recorded(path: Path) -> str:
            hashed.append(path.name)
            return digest(path)

        monkeypatch.setattr(export.checkpoint, "_digest", recorded)
        cpu = torch.device("cpu")
        loaded = export.read(first, cpu)
        hashed.clear()
        again = export.read(second, cpu, previous=loaded)
        assert "model.pt" in hashed and not set(hashed) & set(export.INDEX_FILES)
        assert again.snapshot.index is loaded.snapshot.index
        hashed.clear()
        fresh = export.read(second, cpu)  # alone, every file is checked: the links hold
        assert set(export.INDEX_FILES) <= set(hashed)
        assert np.array_equal(fresh.snapshot.index.vectors, snap.index.vectors)

        (first / "meta.json").unlink()  # the source gone: the index is written again
        third = export.write(out, later, engine.status(), same_index_as=first)
        assert (third / "index.npz").stat().st_ino != (second / "index.npz").stat().st_ino
        export.read(third, cpu)
    finally:
        engine.close()


def test_the_exporter_links_only_the_index_it_exported(tmp_path: Path) -> None:
    calls: list[tuple[int, Path | None]] = []

    def writer(directory: Any, snapshot: Snapshot, status: Any,
               same_index_as: Path | None) -> Path:
        calls.append((snapshot.version, same_index_as))
        return Path(directory) / f"export-{snapshot.version}"

    engine = trained_engine(tmp_path, events=600)
    exporter = export.Exporter(tmp_path / "x", 0.0, engine.metrics.engine, writer=writer)
    try:
        snap = engine.holder.get()
        assert snap is not None
        newer = dataclasses.replace(snap, version=snap.version + 1)
        rebuilt = dataclasses.replace(  # a refreshed index: another object
            snap, version=snap.version + 2,
            index=CandidateIndex(snap.index.vectors, snap.index.config))
        for s in (snap, newer, rebuilt):
            exporter.offer(s, engine.status())
            until(lambda: len(calls) > 0 and calls[-1][0] == s.version)  # noqa: B023 - now
        assert calls == [(snap.version, None),
                         (newer.version, tmp_path / "x" / f"export-{snap.version}"),
                         (rebuilt.version, None)]
    finally:
        exporter.close()
        engine.close()


def test_export_never_blocks_training_and_failures_are_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    release = threading.Event()

    def full_disk(directory: Any, snapshot: Snapshot, status: Any, same_index_as: Any) -> Path:
        calls.append(snapshot.version)
        release.wait(30)  # a stuck disk, until the test lets go
        raise OSError(errno.ENOSPC, "No space left on device")

    source = MemorySource(stream(2000), batch_size=200)
    engine = Engine(settings(tmp_path), source)
    assert engine.exporter is not None
    engine.exporter.writer = full_disk
    try:
        with caplog.at_level(logging.ERROR, logger="ncf_stream.export"):
            while engine.holder.get() is None:
                engine.cycle()
            until(lambda: len(calls) == 1)  # the first export is stuck from here on
            steps = engine.trainer.steps
            drain_engine(engine)
            assert engine.trainer.steps > steps and engine.counters.trained > 0
            newest = engine.holder.get().version  # type: ignore[union-attr]
            assert newest > calls[0] + 1  # published on meanwhile
            assert len(calls) == 1
            release.set()

            def failed() -> float:
                return engine.metrics.registry.get_sample_value(
                    "ncf_stream_snapshot_export_failures_total", {"reason": "ENOSPC"}) or 0

            until(lambda: failed() == 2)  # the stuck one, then the newest: none between
            assert calls == [calls[0], newest]
        assert len([r for r in caplog.records if "export" in r.getMessage()]) == 1
        assert export.latest(tmp_path) is None
        assert engine.metrics.registry.get_sample_value(
            "ncf_stream_snapshot_exports_total") == 0
    finally:
        release.set()
        engine.close()


def test_serve_replica_command(tmp_path: Path) -> None:
    """The real command in a process of its own, against an exported directory."""
    engine = trained_engine(tmp_path, events=1000)
    user = engine.holder.get().user_ids.ids([0]).tolist()[0]  # type: ignore[union-attr]
    want = engine.recommender.recommend(user, 5)
    engine.close()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve-replica", "--snapshot-dir",
         str(tmp_path), "--http-port", "0", "--grpc-port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "replica serving on http://" in line, line + proc.stderr.read()  # type: ignore[union-attr]
        base = line.split("http://")[1].split(" ")[0]
        with httpx.Client(base_url=f"http://{base}", timeout=10) as http:
            until(lambda: http.get("/readyz").status_code == 200, timeout=60)
            got = http.post("/v1/recommend", json={"user": user, "k": 5}).json()
        assert [i["item"] for i in got["items"]] == want.items
        proc.terminate()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_index_setting_the_replica_does_not_know_is_left_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A trainer one version ahead adds an index setting: the replica serves the export
    without it (a serving hint it resolves itself) and says so once; a newer export
    format is still refused (test above)."""
    engine = trained_engine(tmp_path, events=600)
    try:
        path = export.write(tmp_path, engine.holder.get(), engine.status())  # type: ignore[arg-type]
        meta_path = path / "meta.json"
        meta = json.loads(meta_path.read_text())
        meta["index"] |= {"future_knob": 3}
        meta_path.write_text(json.dumps(meta))
        w, registry = watcher(tmp_path)
        with caplog.at_level(logging.WARNING, logger="ncf_stream.export"):
            assert w.poll()
            export.write(tmp_path, engine.holder.get(), engine.status())  # type: ignore[arg-type]
            newest = sorted(tmp_path.glob("snap-*"))[-1] / "meta.json"
            newest.write_text(json.dumps(json.loads(newest.read_text())
                                         | {"index": meta["index"]}))
            assert w.poll()  # the next one too, without a second warning
        got = w.holder.get()
        assert got is not None and got.index.config == engine.holder.get().index.config  # type: ignore[union-attr]
        assert [r.message for r in caplog.records].count(
            next(r.message for r in caplog.records if "future_knob" in r.message)) == 1
        assert registry.get_sample_value("ncf_stream_replica_snapshot_load_failures_total",
                                         {"reason": "error"}) in (None, 0.0)
    finally:
        engine.close()
