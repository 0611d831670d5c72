"""Snapshots, retrieval and the recommender, evaluation on snapshots, the online hit rate."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import SMALL  # tests/conftest.py; the `trained` fixture is there too

import ncf_stream.retrieval as retrieval
from ncf_stream.errors import BadInput
from ncf_stream.evaluate import evaluate
from ncf_stream.evaluator import (
    EvalConfig,
    Evaluator,
    OnlineHitRate,
    Throttle,
    catalogue_scorer,
    snapshot_scorer,
)
from ncf_stream.recommend import (
    NotReady,
    Recommender,
    UnknownUser,
    best,
    exact_top_k,
    top_k,
)
from ncf_stream.retrieval import CandidateIndex, IndexConfig
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer


def test_candidate_path_equals_exact_when_c_covers_the_catalogue(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    for user in range(0, 300, 37):
        row = snap.user_row(str(user))
        if row is None:
            continue
        got = top_k(snap, row, 20, candidates=snap.n_items)
        want = exact_top_k(snap, row, 20)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_a_small_catalogue_is_ranked_exactly_whatever_the_index_finds(trained) -> None:
    """Up to exact_items the served top k is the full model's, even from an index whose
    vectors are noise; with exact_items=0 the same request is served from that index."""
    _, holder, _ = trained
    snap = holder.get()
    vectors, _ = snap.model.retrieval_items()
    noise = np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
    noisy = SnapshotHolder()
    noisy.set(dataclasses.replace(snap, index=CandidateIndex(noise)))
    exact = Recommender(noisy, candidates=10, exact_items=snap.n_items)
    from_index = Recommender(noisy, candidates=10, exact_items=snap.n_items - 1)
    differs = 0
    for user in map(str, range(0, 300, 13)):
        row = snap.user_row(user)
        if row is None:
            continue
        want = snap.item_ids.ids(exact_top_k(snap, row, 10)[0]).tolist()
        assert exact.recommend(user, 10).items == want
        differs += from_index.recommend(user, 10).items != want
    assert differs > 0


def test_only_exactly_ranked_catalogues_pay_for_the_item_cache(trained) -> None:
    """A snapshot caches the items' first-layer halves while the catalogue is at most
    exact_items (it is scored whole per query); above, none, and answers are the same."""
    trainer, _, _ = trained
    n = trainer.model.n_items
    snaps = []
    for exact_items in (n, n - 1):
        h = SnapshotHolder()
        publisher = Publisher(trainer, h, IndexConfig(exact_items=exact_items))
        publisher.publish(0)
        publisher.close()
        snaps.append(h.get())
    cached, uncached = snaps
    assert cached.model.item_hidden is not None and uncached.model.item_hidden is None
    for row in range(0, cached.n_users, 29):
        torch.testing.assert_close(cached.model.user_logits(row), uncached.model.user_logits(row),
                                   rtol=1e-5, atol=1e-5)


def test_best_k_breaks_ties_by_row_and_ranks_nan_last() -> None:
    """recommend.best against a full stable sort, on scores with many ties and NaNs."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 60))
        probs = rng.integers(0, 5, n).astype(np.float32) / 4
        probs[rng.random(n) < (0.5 if trial % 2 else 0.1)] = np.nan
        items = np.sort(rng.choice(1000, n, replace=False))
        k = int(rng.integers(1, 70))
        order = np.argsort(-probs, kind="stable")[:k]  # NaN sorts last
        got = best(items, probs, k)
        assert np.array_equal(got[0], items[order])
        np.testing.assert_array_equal(got[1], probs[order])


def test_excluding_trained_items_keeps_the_hold_out_as_the_full_ranking_does(trained) -> None:
    """exclude="trained" ranks the hold-out among every item the user has not trained on:
    the full-catalogue protocol, here through the served path, against brute force."""
    trainer, holder, _ = trained
    snap = holder.get()
    ho = snap.store.holdout
    rec = Recommender(holder, candidates=snap.n_items)
    found = 0
    for user_row, held in list(zip(ho.users.tolist(), ho.items.tolist(), strict=True))[:60]:
        scores = snap_scores(snap, user_row)
        trained_on = np.setdiff1d(trainer.store.seen(user_row), [held])
        scores[trained_on] = -np.inf
        want = np.argsort(-scores, kind="stable")[:10]
        user = str(snap.user_ids.ids(np.array([user_row]))[0])
        got = snap.item_rows(rec.recommend(user, 10, exclude="trained").items)
        assert np.array_equal(got, want)
        found += held in got.tolist()
        seen = snap.item_rows(rec.recommend(user, 10).items)
        assert held not in seen.tolist()  # the default drops it as seen
    assert found > 0  # the hold-out does come back where the model ranks it in the top 10
    with pytest.raises(BadInput, match="exclude must be one of"):
        rec.recommend("0", 10, exclude="everything")  # type: ignore[arg-type]


def snap_scores(snap, user_row: int) -> np.ndarray:
    items = torch.arange(snap.n_items)
    with torch.no_grad():
        return snap.model(torch.full_like(items, user_row), items).double().numpy()


def test_seen_items_never_come_back_when_excluded(trained) -> None:
    trainer, holder, _ = trained
    snap = holder.get()
    rec = Recommender(holder, candidates=50)
    for user in map(str, range(0, 300, 11)):
        row = snap.user_row(user)
        if row is None:
            continue
        items = rec.recommend(user, 30).items
        rows = snap.item_ids.rows(items, add=False)
        assert not trainer.store.contains(np.full(len(rows), row), rows).any()
        assert len(items) == 30
    with_seen = rec.recommend("0", 30, exclude="none").items
    seen = set(snap.item_ids.ids(trainer.store.seen(snap.user_row("0"))).tolist())
    assert seen & set(with_seen)  # a well-trained model ranks what the user liked


def test_cold_start_gets_popular_items_flagged(trained) -> None:
    trainer, holder, _ = trained
    r = Recommender(holder).recommend("never-seen-user", 5)
    counts = trainer.store.item_counts()
    assert r.cold_start
    assert r.items == trainer.item_ids.ids(np.argsort(-counts, kind="stable")[:5]).tolist()
    assert r.scores == sorted(r.scores, reverse=True)


def test_score_unknown_item_is_none_unknown_user_raises(trained) -> None:
    _, holder, _ = trained
    rec = Recommender(holder)
    s = rec.score("0", ["1", "no-such-item"])
    assert s.scores[1] is None and 0.0 < s.scores[0] < 1.0
    with pytest.raises(UnknownUser):
        rec.score("no-such-user", ["1"])


def test_not_ready_before_the_first_snapshot() -> None:
    with pytest.raises(NotReady):
        Recommender(SnapshotHolder()).recommend("0", 1)


def test_readers_never_see_a_torn_snapshot() -> None:
    """Publish while readers check that every answer is consistent with one snapshot."""
    stream = generate(SynthConfig(users=100, items=80, events=4000, seed=3, topics=4))
    trainer = Trainer(SMALL)
    holder = SnapshotHolder()
    publisher = Publisher(trainer, holder)
    events = stream.to_events()
    trainer.ingest(events.take(np.arange(1000)))
    publisher.publish(1000)
    stop = threading.Event()
    failures: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            snap = holder.get()
            assert snap is not None
            if not (snap.model.n_items == snap.index.size == snap.store.n_items):
                failures.append(f"v{snap.version}: sizes differ")
            weights = snap.model.items.weight.clone()
            top_k(snap, 0, 5, 20)
            if not torch.equal(weights, snap.model.items.weight):
                failures.append(f"v{snap.version}: weights changed under a reader")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for lo in range(1000, 4000, 250):
        trainer.ingest(events.take(np.arange(lo, lo + 250)))
        for _ in range(3):
            trainer.step()
        publisher.publish(lo + 250)
    stop.set()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert holder.get().version == publisher.version


def test_flat_and_ivf_indexes_find_the_true_top(trained) -> None:
    _, holder, _ = trained
    vectors = holder.get().model.retrieval_items()[0].numpy()
    q = np.random.default_rng(0).normal(size=(20, vectors.shape[1])).astype(np.float32)
    truth = np.argsort(-(q @ vectors.T), axis=1)[:, :10]
    # FAISS's kinds, on any machine ("auto" is the torch search on CUDA without faiss-gpu).
    flat = CandidateIndex(vectors, IndexConfig(ivf_threshold=10**9, retrieval_backend="faiss"))
    ivf = CandidateIndex(vectors, IndexConfig(ivf_threshold=1, nlist=8, nprobe=8,
                                              retrieval_backend="faiss"))
    assert (flat.kind, ivf.kind) == ("flat", "ivf")
    assert np.array_equal(flat.search(q, 10)[1], truth)
    scores, rows = ivf.search(q, 10)  # nprobe = nlist: exhaustive
    assert np.array_equal(rows, truth)
    # Searched by L2 over the norm-equalised vectors, answered as inner products.
    want = np.take_along_axis(q @ vectors.T, truth, axis=1)
    assert np.allclose(scores, want, rtol=1e-4, atol=1e-3)
    assert np.allclose(flat.search(q, 10)[0], want, rtol=1e-5, atol=1e-4)
    reused = CandidateIndex(vectors * 2, ivf.config, ivf.quantizer)
    assert reused.quantizer is ivf.quantizer
    assert np.array_equal(reused.search(q, 10)[1], truth)


def test_a_torch_index_serves_what_the_flat_faiss_one_does(trained) -> None:
    """Both are exact: the candidates, and so the rescored answers, are the same."""
    _, holder, _ = trained
    snap = holder.get()
    flat, by_torch = (SnapshotHolder(), SnapshotHolder())
    for h, backend in ((flat, "faiss"), (by_torch, "torch")):
        index = CandidateIndex(snap.index.vectors, IndexConfig(retrieval_backend=backend))
        h.set(dataclasses.replace(snap, index=index))
    assert by_torch.get().index.kind == "torch"  # type: ignore[union-attr]
    users = [str(u) for u in range(0, 300, 23) if snap.user_row(str(u)) is not None]
    want = Recommender(flat, candidates=20, exact_items=0).recommend_many(users, 10)
    assert Recommender(by_torch, candidates=20, exact_items=0).recommend_many(users, 10) == want


def test_gpu_request_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "gpu_available", lambda: True)
    monkeypatch.delattr(retrieval.faiss, "StandardGpuResources", raising=False)
    vectors = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32)
    index = CandidateIndex(vectors, IndexConfig(use_gpu=True))
    assert index.device == "cpu"
    assert index.search(vectors[:1], 3)[1][0, 0] >= 0


def test_snapshot_scorers_agree_with_the_model_on_both_protocols(trained) -> None:
    trainer, holder, _ = trained
    snap = holder.get()
    direct = evaluate(trainer.scorer(), snap.store)
    via_snapshot = evaluate(snapshot_scorer(snap), snap.store)
    assert direct["sampled"].hr == via_snapshot["sampled"].hr
    fast = catalogue_scorer(snap)(snap.store.holdout.users[:5])
    slow = snapshot_scorer(snap)(snap.store.holdout.users[:5],
                                 np.broadcast_to(np.arange(snap.n_items), (5, snap.n_items)))
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4)


def test_evaluator_reports_and_keeps_history(trained) -> None:
    _, holder, _ = trained
    reports = []
    ev = Evaluator(holder, EvalConfig(max_users=100, history=2), on_report=reports.append)
    for _ in range(3):
        ev.evaluate()
    assert len(ev.history) == 2 and len(reports) == 3
    r = ev.latest
    assert r is not None and r.users == 100 and r.full is not None
    assert 0 < r.full.hr[10] <= r.sampled.hr[10] <= 1


def test_throttle_caps_the_duty_cycle() -> None:
    import time

    throttle = Throttle(duty=0.5)
    start = time.perf_counter()
    for _ in range(3):
        deadline = time.perf_counter() + 0.02
        while time.perf_counter() < deadline:
            pass
        throttle()
    assert time.perf_counter() - start >= 0.11  # 60 ms of work, 60 ms of rest


def test_online_hit_rate_counts_served_hits(trained) -> None:
    _trainer, holder, _ = trained
    snap = holder.get()
    online = OnlineHitRate(fraction=1.0, max_per_second=1e9)
    row = snap.user_row("0")
    served, _ = top_k(snap, row, 20, 400)
    online.observe(snap, np.array([row] * 3), served[[0, 7, 15]])
    assert online.probes == 3
    assert online.hits == {5: 1, 10: 2, 20: 3}
    # Rows new since the snapshot: the user is served the popular list; the item is a miss.
    online.observe(snap, np.array([snap.n_users] * 2), np.array([snap.popular[0], snap.n_items]))
    assert online.probes == 5
    assert online.hits == {5: 2, 10: 3, 20: 4}
