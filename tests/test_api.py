"""HTTP and gRPC on real servers on loopback, over a daemon fed from memory.

The contract (ARCHITECTURE.md): the same answers on both protocols, a 4xx
with a JSON message for every bad request, and schemathesis holding the HTTP
server to its own OpenAPI document (no 5xx, every response as declared).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import schemathesis
from conftest import require_program, running  # tests/conftest.py
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings

from consumers.daemon import Daemon
from ncf_stream.proto import recommender_pb2 as pb
from ncf_stream.proto import recommender_pb2_grpc as pb_grpc
from ncf_stream.settings import Settings
from ncf_stream.source import MemorySource
from ncf_stream.synth import SynthConfig, generate

EVENTS = 6000


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    stream = generate(SynthConfig(users=200, items=150, events=EVENTS, seed=9, topics=5))
    s = Settings(http_port=0, grpc_port=0, batch_size=1024, factors=8, mlp_layers=[16, 8],
                 holdout_fraction=1.0,
                 publish_every_s=0.2, eval_interval_s=3600, eval_max_users=50, max_k=100,
                 device="cpu", shutdown_grace_s=1.0, replay=False)  # stable once consumed
    d = Daemon(s, source=MemorySource(stream.to_events(), batch_size=1500))
    thread = threading.Thread(target=d.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while d.engine.status().snapshot_events < EVENTS:
        assert time.monotonic() < deadline, d.engine.status()
        time.sleep(0.05)
    yield d
    d.stop()
    thread.join(10)


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.http_port}", timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{daemon.grpc.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(channel)


def test_http_and_grpc_agree_on_recommend_and_never_return_seen_items(
    daemon: Daemon, http: httpx.Client, stub: pb_grpc.RecommenderStub
) -> None:
    store, ids = daemon.engine.trainer.store, daemon.engine.trainer.item_ids
    for user in ("0", "17", "123"):
        h = http.post("/v1/recommend", json={"user": user, "k": 10}).json()
        g = stub.Recommend(pb.RecommendRequest(user=user, k=10))
        assert [i["item"] for i in h["items"]] == [i.item for i in g.items]
        assert h["model_version"] == g.model_version and not h["cold_start"]
        assert [i["score"] for i in h["items"]] == pytest.approx([i.score for i in g.items])
        row = daemon.engine.trainer.user_ids.rows([user], add=False)[0]
        seen = set(ids.ids(store.seen(int(row))).tolist())
        assert seen.isdisjoint(i["item"] for i in h["items"]) and len(h["items"]) == 10


def test_exclude_trained_keeps_the_hold_out_in_both_protocols(
    daemon: Daemon, http: httpx.Client, stub: pb_grpc.RecommenderStub
) -> None:
    snap = daemon.engine.holder.get()
    assert snap is not None
    ho = snap.store.holdout
    found = 0
    for row, held in list(zip(ho.users.tolist(), ho.items.tolist(), strict=True))[:40]:
        user = str(snap.user_ids.ids(np.array([row]))[0])
        item = str(snap.item_ids.ids(np.array([held]))[0])
        h = http.post("/v1/recommend", json={"user": user, "k": 20, "exclude": "trained"})
        g = stub.Recommend(pb.RecommendRequest(user=user, k=20, exclude="trained"))
        items = [i["item"] for i in h.json()["items"]]
        assert items == [i.item for i in g.items]
        found += item in items
        seen = http.post("/v1/recommend", json={"user": user, "k": 20}).json()["items"]
        assert item not in [i["item"] for i in seen]
    assert found > 0
    bad = http.post("/v1/recommend", json={"user": "1", "exclude": "everything"})
    assert bad.status_code == 422


def test_filters_on_both_protocols(http: httpx.Client, stub: pb_grpc.RecommenderStub) -> None:
    top = [i["item"] for i in http.post("/v1/recommend", json={"user": "3", "k": 20}).json()[
        "items"]]
    for body in ({"exclude_items": top[:5]}, {"include_only": [*top[3:9], "no-such-item"]},
                 {"exclude_items": [top[4], 12345], "include_only": top[3:9]}):
        h = http.post("/v1/recommend", json={"user": "3", "k": 4, **body})
        assert h.status_code == 200, h.text
        g = stub.Recommend(pb.RecommendRequest(user="3", k=4, **{
            key: [str(v) for v in value] for key, value in body.items()}))
        items = [i["item"] for i in h.json()["items"]]
        assert items == [i.item for i in g.items]
        assert not set(items) & set(map(str, body.get("exclude_items", [])))
        want = [i for i in top if i in body.get("include_only", top)
                and i not in body.get("exclude_items", [])]
        assert items == want[:4]  # the exact ranking, restricted
    hb = http.post("/v1/recommend/batch", json={"users": ["3", "x"], "k": 3,
                                                "include_only": top[:2]}).json()
    gb = stub.RecommendBatch(pb.RecommendBatchRequest(users=["3", "x"], k=3,
                                                      include_only=top[:2]))
    assert [len(r["items"]) for r in hb["results"]] == [len(r.items) for r in gb.results] == [
        2, 2]


def test_similar_on_both_protocols(http: httpx.Client, stub: pb_grpc.RecommenderStub) -> None:
    h = http.post("/v1/similar", json={"item": "7", "k": 5}).json()
    g = stub.Similar(pb.SimilarRequest(item="7", k=5))
    assert h["item"] == g.item == "7" and h["model_version"] == g.model_version
    assert [i["item"] for i in h["items"]] == [i.item for i in g.items]
    assert [i["score"] for i in h["items"]] == pytest.approx([i.score for i in g.items])
    assert len(h["items"]) == 5 and "7" not in [i["item"] for i in h["items"]]
    assert http.post("/v1/similar", json={"item": 7}).json()["items"] == http.post(
        "/v1/similar", json={"item": "7"}).json()["items"]


def test_popular_and_known_items_on_both_protocols(
    daemon: Daemon, http: httpx.Client, stub: pb_grpc.RecommenderStub
) -> None:
    h = http.get("/v1/popular", params={"k": 5}).json()
    g = stub.Popular(pb.PopularRequest(k=5))
    assert [(i["item"], i["count"]) for i in h["items"]] == [(i.item, i.count) for i in g.items]
    assert len(h["items"]) == 5 and h["window_seconds"] == g.window_seconds == 86_400.0
    counts = [i["count"] for i in h["items"]]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0
    assert len(http.get("/v1/popular").json()["items"]) == 10  # k defaults to 10
    store, ids = daemon.engine.trainer.store, daemon.engine.trainer.item_ids
    row = int(daemon.engine.trainer.user_ids.rows(["17"], add=False)[0])
    h = http.get("/v1/users/17/items", params={"limit": 1000}).json()
    assert h["total"] == len(h["items"]) == len(store.seen(row))
    assert {i["item"] for i in h["items"]} == set(ids.ids(store.seen(row)).tolist())
    ts = [i["ts"] for i in h["items"]]
    assert ts == sorted(ts, reverse=True)
    page = http.get("/v1/users/17/items", params={"offset": 2, "limit": 3}).json()
    assert page["items"] == h["items"][2:5] and page["offset"] == 2
    g = stub.UserItems(pb.UserItemsRequest(user="17", offset=2, limit=3))
    assert [(i.item, i.ts) for i in g.items] == [(i["item"], i["ts"]) for i in page["items"]]
    assert g.total == h["total"]


def test_integer_user_ids_mean_their_string(http: httpx.Client) -> None:
    a = http.post("/v1/recommend", json={"user": 17, "k": 3}).json()
    b = http.post("/v1/recommend", json={"user": "17", "k": 3}).json()
    assert a == b and a["user"] == "17"


def test_cold_start_on_both_protocols(http: httpx.Client, stub: pb_grpc.RecommenderStub) -> None:
    h = http.post("/v1/recommend", json={"user": "new-user", "k": 4}).json()
    g = stub.Recommend(pb.RecommendRequest(user="new-user", k=4))
    assert h["cold_start"] and g.cold_start
    assert [i["item"] for i in h["items"]] == [i.item for i in g.items]


def test_anonymous_on_both_protocols(daemon: Daemon, http: httpx.Client,
                                     stub: pb_grpc.RecommenderStub) -> None:
    """Items instead of a user: the same answer on both protocols, flagged, never the
    given items, and nothing stored (the daemon's users do not change)."""
    users = len(daemon.engine.trainer.user_ids)
    given = ["3", "17", 42, "no-such-item"]
    h = http.post("/v1/recommend", json={"items": given, "k": 10})
    assert h.status_code == 200, h.text
    body = h.json()
    g = stub.Recommend(pb.RecommendRequest(items=[str(i) for i in given], k=10))
    assert body["anonymous"] and g.anonymous and body["user"] == g.user == ""
    assert not body["cold_start"] and not g.cold_start
    assert [i["item"] for i in body["items"]] == [i.item for i in g.items]
    assert [i["score"] for i in body["items"]] == pytest.approx([i.score for i in g.items])
    assert len(body["items"]) == 10 and not {"3", "17", "42"} & {i["item"] for i in
                                                                 body["items"]}
    kept = http.post("/v1/recommend", json={"items": given, "k": 5, "exclude": "none",
                                            "include_only": given})
    assert {i["item"] for i in kept.json()["items"]} == {"3", "17", "42"}
    top = [i["item"] for i in body["items"]]
    f = http.post("/v1/recommend", json={"items": given, "k": 3, "exclude_items": top[:2],
                                         "include_only": top[:6]}).json()
    fg = stub.Recommend(pb.RecommendRequest(items=[str(i) for i in given], k=3,
                                            exclude_items=top[:2], include_only=top[:6]))
    assert [i["item"] for i in f["items"]] == [i.item for i in fg.items] == top[2:5]
    cold = http.post("/v1/recommend", json={"items": ["nothing-known"], "k": 4}).json()
    cg = stub.Recommend(pb.RecommendRequest(items=["nothing-known"], k=4))
    assert cold["cold_start"] and cold["anonymous"] and cg.cold_start and cg.anonymous
    assert [i["item"] for i in cold["items"]] == [i.item for i in cg.items]
    assert len(daemon.engine.trainer.user_ids) == users
    known = http.post("/v1/recommend", json={"user": "3"}).json()
    assert known["anonymous"] is False and known["user"] == "3"
    # The contract test below generates both shapes from the document.
    schema = http.get("/openapi.json").json()["components"]["schemas"]["RecommendRequest"]
    assert "items" in schema["properties"] and schema["oneOf"] == [
        {"required": ["user"]}, {"required": ["items"]}]


def test_batch(http: httpx.Client, stub: pb_grpc.RecommenderStub) -> None:
    h = http.post("/v1/recommend/batch", json={"users": ["1", "x"], "k": 3}).json()
    g = stub.RecommendBatch(pb.RecommendBatchRequest(users=["1", "x"], k=3))
    assert [r["cold_start"] for r in h["results"]] == [False, True]
    assert [[i["item"] for i in r["items"]] for r in h["results"]] == [
        [i.item for i in r.items] for r in g.results]


def test_score(http: httpx.Client, stub: pb_grpc.RecommenderStub) -> None:
    top = http.post("/v1/recommend", json={"user": "5", "k": 2}).json()["items"]
    items = [top[0]["item"], "no-such-item", top[1]["item"]]
    h = http.post("/v1/score", json={"user": "5", "items": items}).json()
    assert h["scores"][1] is None
    assert h["scores"][0] == pytest.approx(top[0]["score"], rel=1e-5)
    assert h["scores"][0] >= h["scores"][2]
    g = stub.Score(pb.ScoreRequest(user="5", items=items))
    assert [s.known for s in g.scores] == [True, False, True]
    assert g.scores[0].score == pytest.approx(h["scores"][0])


def test_status_and_eval(daemon: Daemon, http: httpx.Client,
                         stub: pb_grpc.RecommenderStub) -> None:
    s = http.get("/v1/status").json()
    assert s["events_consumed"] == s["snapshot_events"] == EVENTS
    assert s["users"] == len(daemon.engine.trainer.user_ids) and s["interactions"] > 0
    g = stub.Status(pb.StatusRequest())
    assert g.events_consumed == EVENTS and g.users == s["users"]
    assert http.post("/v1/eval").status_code == 202
    deadline = time.monotonic() + 30
    # The quick first evaluation may come first (on an early snapshot); then the one asked for.
    while (latest := http.get("/v1/eval").json()["latest"]) is None or latest["quick"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert 0 <= latest["sampled"]["hr10"] <= 1 and latest["users"] == 50
    assert 0 <= latest["candidate_recall"] <= 1 and latest["recall_users"] == 50
    first = http.get("/v1/eval").json()["history"][0]
    assert first["quick"] and 1 <= first["users"] <= 50  # min(200, hold-outs, eval_max_users)


def test_health_readiness_metrics(http: httpx.Client, channel: grpc.Channel) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["status"] == "ready"
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ncf_stream.v1.Recommender"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    text = http.get("/metrics").text
    for name in ("ncf_stream_request_duration_seconds_bucket", "ncf_stream_snapshot_version",
                 "ncf_stream_events_trained_total", 'protocol="grpc"'):
        assert name in text


def test_grpc_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"ncf_stream.v1.Recommender", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize(("path", "body", "status", "kind"), [
    ("/v1/recommend", {"user": "1", "k": 0}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "k": 101}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "k": "ten"}, 422, "invalid_request"),
    ("/v1/recommend", {"k": 3}, 422, "invalid_request"),
    ("/v1/recommend", {"user": ""}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "u" * 300}, 422, "invalid_request"),
    ("/v1/recommend", {"user": 10**30}, 422, "invalid_request"),
    ("/v1/recommend", {"user": True}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "surprise": 1}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "items": ["1"]}, 422, "invalid_request"),
    ("/v1/recommend", {"items": []}, 422, "invalid_request"),
    ("/v1/recommend", {"items": ["1"] * 1001}, 422, "invalid_request"),
    ("/v1/recommend", {"items": "1"}, 422, "invalid_request"),
    ("/v1/recommend", {"items": [True]}, 422, "invalid_request"),
    ("/v1/recommend", {"items": [""]}, 422, "invalid_request"),
    ("/v1/recommend", {"items": [None]}, 422, "invalid_request"),
    ("/v1/recommend", {"items": ["1"], "k": 0}, 422, "invalid_request"),
    ("/v1/recommend", {"items": ["1"], "exclude": "everything"}, 422, "invalid_request"),
    ("/v1/recommend", {"user": None, "items": None}, 422, "invalid_request"),
    ("/v1/recommend/batch", {"users": ["1"], "items": ["1"]}, 422, "invalid_request"),
    ("/v1/recommend", [1, 2], 422, "invalid_request"),
    ("/v1/score", {"user": "no-such-user", "items": ["1"]}, 404, "unknown_user"),
    ("/v1/score", {"user": "1", "items": []}, 422, "invalid_request"),
    ("/v1/recommend/batch", {"users": []}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "include_only": []}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "include_only": [""]}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "include_only": "1"}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "exclude_items": [True]}, 422, "invalid_request"),
    ("/v1/recommend", {"user": "1", "exclude_items": ["1"] * 10_001}, 422, "invalid_request"),
    ("/v1/recommend/batch", {"users": ["1"], "include_only": [None]}, 422, "invalid_request"),
    ("/v1/similar", {"item": "no-such-item"}, 404, "unknown_item"),
    ("/v1/similar", {"item": "1", "k": 0}, 422, "invalid_request"),
    ("/v1/similar", {"item": "1", "k": 101}, 422, "invalid_request"),
    ("/v1/similar", {"item": ""}, 422, "invalid_request"),
    ("/v1/similar", {"k": 3}, 422, "invalid_request"),
    ("/v1/similar", {"item": "1", "user": "1"}, 422, "invalid_request"),
])
def test_bad_requests_get_a_4xx_with_a_message(http: httpx.Client, path: str, body: object,
                                               status: int, kind: str) -> None:
    r = http.post(path, json=body)
    assert r.status_code == status
    assert r.json()["error"] == kind and r.json()["detail"]


@pytest.mark.parametrize(("path", "status", "kind"), [
    ("/v1/popular?k=0", 422, "invalid_request"),
    ("/v1/popular?k=101", 422, "invalid_request"),
    ("/v1/popular?k=ten", 422, "invalid_request"),
    ("/v1/users/no-such-user/items", 404, "unknown_user"),
    ("/v1/users/1/items?limit=0", 422, "invalid_request"),
    ("/v1/users/1/items?limit=1001", 422, "invalid_request"),
    ("/v1/users/1/items?offset=-1", 422, "invalid_request"),
    ("/v1/users/1/items?offset=99999999999999999999", 422, "invalid_request"),
    ("/v1/users/" + "u" * 300 + "/items", 422, "invalid_request"),
])
def test_bad_queries_get_a_4xx_with_a_message(http: httpx.Client, path: str, status: int,
                                              kind: str) -> None:
    r = http.get(path)
    assert r.status_code == status
    assert r.json()["error"] == kind and r.json()["detail"]


def test_malformed_json_oversize_and_unknown_routes(http: httpx.Client) -> None:
    r = http.post("/v1/recommend", content=b"{not json", headers={"content-type":
                                                                  "application/json"})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = http.post("/v1/recommend", content=b"x" * (2 << 20),
                  headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b" " * 65536

    r = http.post("/v1/recommend", content=chunks(), headers={"content-type":
                                                              "application/json"})
    assert r.status_code == 413
    assert http.get("/nope").json()["error"] == "not_found"
    assert http.get("/v1/recommend").status_code == 405


# How quick clients label a JSON body: curl -d (the demo's hint), none at all, a bare fetch.
LOOSE_TYPES = [{"content-type": "application/x-www-form-urlencoded"}, {},
               {"content-type": "text/plain;charset=UTF-8"}]


@pytest.mark.parametrize("headers", LOOSE_TYPES)
def test_json_bodies_are_read_whatever_the_content_type(http: httpx.Client,
                                                        headers: dict[str, str]) -> None:
    for path, body, key in (("/v1/recommend", b'{"user": "1", "k": 5}', "items"),
                            ("/v1/similar", b'{"item": "1", "k": 5}', "items"),
                            ("/v1/recommend/batch", b'{"users": ["1", "x"], "k": 2}', "results"),
                            ("/v1/score", b'{"user": "1", "items": ["1"]}', "scores")):
        r = http.post(path, content=body, headers=headers)
        assert r.request.headers.get("content-type") == headers.get("content-type")
        assert r.status_code == 200 and r.json()[key], (path, r.text)
    assert len(http.post("/v1/recommend", content=b'{"user": "1", "k": 5}',
                         headers=headers).json()["items"]) == 5
    # Still 4xx with a message for what is not JSON, or too large.
    r = http.post("/v1/recommend", content=b"user=1&k=5", headers=headers)
    assert r.status_code == 422 and r.json() == {
        "error": "invalid_request", "detail": "body is not JSON: Expecting value at character 0"}
    r = http.post("/v1/recommend", content=b"x" * (2 << 20), headers=headers)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_the_demo_curl_hint_works(daemon: Daemon) -> None:
    """The command consumers/demo.py prints, run by curl itself."""
    curl = require_program("curl")
    run = subprocess.run([curl, "-s", "-v", "-w", "\\n%{http_code}",
                          f"localhost:{daemon.http_port}/v1/recommend",
                          "-d", '{"user": "1", "k": 5}'],
                         capture_output=True, text=True, timeout=30, check=True)
    assert "content-type: application/x-www-form-urlencoded" in run.stderr.lower()
    body, code = run.stdout.rsplit("\n", 1)
    assert code == "200", body
    assert len(json.loads(body)["items"]) == 5


@pytest.mark.parametrize(("request_", "code"), [
    (pb.RecommendRequest(user="1", k=0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(user="1", items=["1"]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(k=5), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(items=["1"] * 1001), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(items=["1", ""]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(items=["u" * 300]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(items=["1"], k=0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(items=["1"], exclude="everything"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(user="", k=5), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(user="1", k=100_000), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.ScoreRequest(user="nobody", items=["1"]), grpc.StatusCode.NOT_FOUND),
    (pb.ScoreRequest(user="1"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendBatchRequest(users=[]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(user="1", exclude="everything"), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(user="1", include_only=[""]), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendRequest(user="1", exclude_items=["1"] * 10_001),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.RecommendBatchRequest(users=["1"], exclude_items=["u" * 300]),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.SimilarRequest(item="no-such-item"), grpc.StatusCode.NOT_FOUND),
    (pb.SimilarRequest(item=""), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.SimilarRequest(item="1", k=0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.PopularRequest(k=0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.PopularRequest(k=101), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UserItemsRequest(user="nobody"), grpc.StatusCode.NOT_FOUND),
    (pb.UserItemsRequest(user=""), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UserItemsRequest(user="1", offset=-1), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UserItemsRequest(user="1", limit=0), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.UserItemsRequest(user="1", limit=5000), grpc.StatusCode.INVALID_ARGUMENT),
])
def test_grpc_errors(stub: pb_grpc.RecommenderStub, request_: object,
                     code: grpc.StatusCode) -> None:
    method = {pb.RecommendRequest: stub.Recommend, pb.ScoreRequest: stub.Score,
              pb.RecommendBatchRequest: stub.RecommendBatch, pb.PopularRequest: stub.Popular,
              pb.SimilarRequest: stub.Similar,
              pb.UserItemsRequest: stub.UserItems}[type(request_)]
    with pytest.raises(grpc.RpcError) as e:
        method(request_)
    assert e.value.code() == code and e.value.details()


def test_openapi_contract(daemon: Daemon) -> None:
    """No 5xx for any input, every response as the OpenAPI document declares.

    Strategies per operation rather than schemathesis' pytest plugin, whose
    fixture support does not work with pytest 9.
    """
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{daemon.http_port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate()

        check()


def test_daemon_on_an_empty_stream_is_alive_but_not_ready() -> None:
    from ncf_stream.events import Events

    s = Settings(http_port=0, grpc_port=0, device="cpu", shutdown_grace_s=0.5)
    with running(s, source=MemorySource(Events.from_rows([]))) as (d, thread), \
            httpx.Client(base_url=f"http://127.0.0.1:{d.http_port}", timeout=5) as c:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert c.get("/healthz").status_code == 200
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(0.5)  # several idle loop turns
        assert thread.is_alive()
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not_ready"
        r = c.post("/v1/recommend", json={"user": "1"})
        assert r.status_code == 503


# ---- the admin API: deleting users and items ------------------------------------------------

TOKEN = "test-admin-token-0123456789"


def test_admin_endpoints_are_off_without_a_token(http: httpx.Client,
                                                 stub: pb_grpc.RecommenderStub) -> None:
    for path in ("/v1/admin/users/1", "/v1/admin/items/1"):
        r = http.delete(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404 and r.json()["error"] == "not_found"
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteUser(pb.DeleteRequest(id="1"),
                        metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture(scope="module")
def admin_daemon() -> Iterator[Daemon]:
    stream = generate(SynthConfig(users=50, items=40, events=1500, seed=4, topics=3))
    s = Settings(http_port=0, grpc_port=0, batch_size=512, factors=8, mlp_layers=(16, 8),
                 publish_every_s=0.05, eval_interval_s=3600, device="cpu",
                 shutdown_grace_s=1.0, replay=False, admin_token=TOKEN)  # type: ignore[arg-type]
    with running(s, source=MemorySource(stream.to_events(), batch_size=500)) as (d, _):
        deadline = time.monotonic() + 60
        while d.engine.status().snapshot_events < 1500:
            assert time.monotonic() < deadline, d.engine.status()
            time.sleep(0.05)
        yield d


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.mark.parametrize(("headers", "status", "kind"), [
    ({}, 401, "unauthenticated"),
    ({"Authorization": f"Basic {TOKEN}"}, 401, "unauthenticated"),
    ({"Authorization": "Bearer"}, 401, "unauthenticated"),
    ({"Authorization": "Bearer wrong-token-but-long-enough"}, 403, "forbidden"),
    ({"Authorization": f"Bearer {TOKEN}x"}, 403, "forbidden"),
])
def test_admin_auth_failures(admin_daemon: Daemon, headers: dict[str, str], status: int,
                             kind: str) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{admin_daemon.http_port}") as c:
        r = c.delete("/v1/admin/users/3", headers=headers)
        assert r.status_code == status and r.json()["error"] == kind and r.json()["detail"]
        if status == 401:
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert admin_daemon.engine.holder.get().user_row("3") is not None  # type: ignore[union-attr]


def test_admin_bad_ids_are_4xx(admin_daemon: Daemon) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{admin_daemon.http_port}") as c:
        r = c.delete("/v1/admin/users/" + "u" * 300, headers=auth)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request"
        r = c.delete("/v1/admin/items/", headers=auth)
        assert r.status_code in (404, 405) and r.json()["detail"]
    with grpc.insecure_channel(f"127.0.0.1:{admin_daemon.grpc.port}") as ch:
        stub = pb_grpc.RecommenderStub(ch)
        for request, metadata, code in [
            (pb.DeleteRequest(id=""), (("authorization", f"Bearer {TOKEN}"),),
             grpc.StatusCode.INVALID_ARGUMENT),
            (pb.DeleteRequest(id="u" * 300), (("authorization", f"Bearer {TOKEN}"),),
             grpc.StatusCode.INVALID_ARGUMENT),
            (pb.DeleteRequest(id="3"), (), grpc.StatusCode.UNAUTHENTICATED),
            (pb.DeleteRequest(id="3"), (("authorization", "Bearer nope-nope-nope-nope"),),
             grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                stub.DeleteItem(request, metadata=metadata)
            assert e.value.code() == code and e.value.details()


def test_admin_deletes_over_http_and_grpc_within_one_publish(admin_daemon: Daemon) -> None:
    engine = admin_daemon.engine
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{admin_daemon.http_port}") as c:
        r = c.delete("/v1/admin/users/7", headers=auth)
        assert r.status_code == 202
        assert r.json() | {"detail": ""} == {"kind": "user", "id": "7", "known": True,
                                              "status": "accepted", "detail": ""}
        wait_for(lambda: engine.holder.get().user_row("7") is None)  # type: ignore[union-attr]
        assert c.post("/v1/score", json={"user": "7", "items": ["1"]}).status_code == 404
        assert c.get("/v1/users/7/items").status_code == 404
        r = c.delete("/v1/admin/users/never-seen", headers=auth)
        assert r.status_code == 202 and r.json()["known"] is False
    with grpc.insecure_channel(f"127.0.0.1:{admin_daemon.grpc.port}") as ch:
        stub = pb_grpc.RecommenderStub(ch)
        item = str(engine.holder.get().popular[0])  # type: ignore[union-attr]
        item = engine.trainer.item_ids.ids([int(item)])[0]
        got = stub.DeleteItem(pb.DeleteRequest(id=item),
                              metadata=(("authorization", f"Bearer {TOKEN}"),))
        assert (got.kind, got.id, got.known) == ("item", item, True)
        wait_for(lambda: engine.holder.get().item_rows([item])[0] < 0)  # type: ignore[union-attr]
        r = stub.Recommend(pb.RecommendRequest(user="1", k=30))
        assert item not in [i.item for i in r.items]
        assert item not in [i.item for i in stub.Popular(pb.PopularRequest(k=30)).items]


def contract(operation: Any, headers: dict[str, str] | None) -> None:
    @given(case=operation.as_strategy())
    @hsettings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers)

    check()


def test_admin_openapi_contract(admin_daemon: Daemon) -> None:
    """The admin operations with the token configured: authorized and not, never a 5xx,
    every response as declared."""
    schema = schemathesis.openapi.from_url(
        f"http://127.0.0.1:{admin_daemon.http_port}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()
                  if "/admin/" in result.ok().path]
    assert len(operations) == 2
    for operation in operations:
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, None):
            contract(operation, headers)
    registry = admin_daemon.engine.metrics.registry
    # The authorized cases reached the engine: each was a deletion, applied or a no-op.
    wait_for(lambda: sum(registry.get_sample_value(
        "ncf_stream_deletions_total", {"kind": kind, "outcome": outcome}) or 0
        for kind in ("user", "item") for outcome in ("deleted", "unknown")) >= 20)
