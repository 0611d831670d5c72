"""End to end through the real broker: producer tool -> Kafka -> daemon -> HTTP and gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from consumers.daemon import Daemon
from consumers.produce import produce_file
from ncf_stream.proto import recommender_pb2 as pb
from ncf_stream.proto import recommender_pb2_grpc as pb_grpc
from ncf_stream.recommend import score_rows
from ncf_stream.settings import Settings
from ncf_stream.synth import SynthConfig, generate, write

EVENTS = 8000


@pytest.fixture(scope="module")
def served(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    from consumers.broker import create_topics

    topic = f"e2e-{time.time_ns()}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=3)
    path = tmp_path_factory.mktemp("e2e") / "stream.csv"
    write(generate(SynthConfig(users=300, items=200, events=EVENTS, seed=11, topics=6)), path)
    s = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=topic,
                 kafka_dlq_topic=f"{topic}.dlq", kafka_group_id=f"{topic}-g", http_port=0,
                 grpc_port=0, batch_size=2048, factors=8, mlp_layers=[16, 8],
                 publish_every_s=0.3, eval_interval_s=3600, replay=False, device="cpu",
                 shutdown_grace_s=1.0)
    summary = produce_file(path, s, show_progress=False)
    assert summary.sent == EVENTS
    daemon = Daemon(s)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    yield daemon
    daemon.stop()
    thread.join(15)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def http(served: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{served.http_port}", timeout=10) as client:
        deadline = time.monotonic() + 90
        while client.get("/v1/status").json()["snapshot_events"] < EVENTS:
            assert time.monotonic() < deadline, client.get("/v1/status").json()
            time.sleep(0.2)
        yield client


def test_everything_published_is_served(http: httpx.Client) -> None:
    status = http.get("/v1/status").json()
    assert status["events_consumed"] == status["snapshot_events"] == EVENTS
    assert status["events_rejected"] == 0 and status["consumer_lag"] >= 0
    assert http.get("/readyz").status_code == 200


def test_http_and_grpc_same_items_never_touched(served: Daemon, http: httpx.Client) -> None:
    stub = pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{served.grpc.port}"))
    trainer = served.engine.trainer
    for user in ("3", "42", "199"):
        h = http.post("/v1/recommend", json={"user": user, "k": 10}).json()
        g = stub.Recommend(pb.RecommendRequest(user=user, k=10))
        assert h["model_version"] == g.model_version
        assert [i["item"] for i in h["items"]] == [i.item for i in g.items]
        row = int(trainer.user_ids.rows([user], add=False)[0])
        touched = set(trainer.item_ids.ids(trainer.store.seen(row)).tolist())
        assert touched.isdisjoint(i["item"] for i in h["items"])


def test_score_ranks_the_holdout_as_the_model_does(served: Daemon, http: httpx.Client) -> None:
    snap = served.engine.holder.get()
    assert snap is not None
    ho = snap.store.holdout
    rng = np.random.default_rng(0)
    for j in rng.choice(len(ho.users), 5, replace=False):
        user, held = int(ho.users[j]), int(ho.items[j])
        others = rng.choice(snap.n_items, 9, replace=False)
        rows = np.r_[held, others]
        body = {"user": snap.user_ids.ids([user])[0],
                "items": snap.item_ids.ids(rows).tolist()}
        got = http.post("/v1/score", json=body).json()["scores"]
        want = score_rows(snap, user, rows)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert np.array_equal(np.argsort(got, kind="stable"), np.argsort(want, kind="stable"))


def test_grpc_health_reports_serving(served: Daemon) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{served.grpc.port}"))
    resp = health.Check(health_pb2.HealthCheckRequest(service="ncf_stream.v1.Recommender"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_sigterm_stops_the_daemon_cleanly(kafka_bootstrap: str, tmp_path: Path) -> None:
    """`ncf-stream serve` as users run it: ready, then SIGTERM, then exit 0 within the grace."""
    from consumers.broker import free_port

    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, "NCF_STREAM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "NCF_STREAM_KAFKA_TOPIC": f"sigterm-{time.time_ns()}", "NCF_STREAM_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve", "--http-port", str(http_port),
         "--grpc-port", str(grpc_port)], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"http://127.0.0.1:{http_port}" in (proc.stdout.read() if proc.stdout else "")
