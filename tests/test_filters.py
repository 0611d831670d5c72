"""Request filters (exclude_items, include_only) and item availability, checked against
brute force on a small trained model: every branch (exact, candidates, the exact
fallback, cold start and its fallback) and the engine's side of availability."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import drain_engine, small_engine_settings  # tests/conftest.py

import ncf_stream.recommend as recommend
from ncf_stream.catalogue import Catalogue, ItemAvailability
from ncf_stream.engine import Engine
from ncf_stream.events import Availability, Events
from ncf_stream.recommend import Filters, Recommender, exact_top_k
from ncf_stream.retrieval import CandidateIndex
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Publisher, Snapshot, SnapshotHolder
from ncf_stream.source import MemorySource
from ncf_stream.synth import SynthConfig, generate


def probs_of(snap: Snapshot, row: int) -> np.ndarray:
    return torch.sigmoid(snap.model.user_logits(row)).float().cpu().numpy()


def brute_top(snap: Snapshot, row: int, k: int, eligible: np.ndarray) -> list[str]:
    """The full model's ranking over ``eligible`` rows, ties by row: the reference."""
    p = probs_of(snap, row)
    rows = np.sort(eligible)
    order = np.argsort(-p[rows], kind="stable")[:k]
    return snap.item_ids.ids(rows[order]).tolist()


def holder_with(snap: Snapshot, **changes: object) -> SnapshotHolder:
    h = SnapshotHolder()
    h.set(dataclasses.replace(snap, **changes))  # type: ignore[arg-type]
    return h


def users_of(snap: Snapshot, n: int = 8) -> list[tuple[str, int]]:
    out = []
    for user in map(str, range(0, 300, 17)):
        row = snap.user_row(user)
        if row is not None:
            out.append((user, row))
    return out[:n]


def test_include_only_is_the_exact_ranking_restricted_to_the_list(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    rec = Recommender(holder, candidates=10, exact_items=0)  # a plain request uses the index
    rng = np.random.default_rng(3)
    for user, row in users_of(snap):
        pick = rng.choice(snap.n_items, 60, replace=False)
        ids = [*snap.item_ids.ids(pick).tolist(), "no-such-item"]  # unknown: ignored
        got = rec.recommend(user, 10, filters=Filters(include_only=tuple(ids)))
        eligible = np.setdiff1d(pick, snap.store.seen(row))
        assert got.items == brute_top(snap, row, 10, eligible)
        assert got.scores == pytest.approx(np.sort(probs_of(snap, row)[
            snap.item_rows(got.items)])[::-1].tolist(), rel=1e-6)


def test_include_only_drops_excluded_and_unavailable_and_may_return_fewer(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    user, row = users_of(snap)[0]
    unseen = np.setdiff1d(np.arange(snap.n_items), snap.store.seen(row))[:6]
    h = holder_with(snap, unavailable=unseen[:2])
    ids = tuple(snap.item_ids.ids(unseen).tolist())
    got = Recommender(h).recommend(user, 10, filters=Filters(
        exclude_items=ids[2:3], include_only=ids))
    assert got.items == brute_top(snap, row, 10, unseen[3:])  # 3 left: fewer than k


@pytest.mark.parametrize("exact_items", [10_000, 0], ids=["exact", "candidates"])
def test_hidden_items_never_cost_k(trained, exact_items: int) -> None:
    """The user's own top 40 excluded or unavailable: still k answers, none hidden; the
    exact path is the brute-force ranking over what is left."""
    _, holder, _ = trained
    snap = holder.get()
    for user, row in users_of(snap, 4):
        seen = snap.store.seen(row)
        top = exact_top_k(snap, row, 40)[0]  # best first
        h = holder_with(snap, unavailable=np.sort(top[:20]))
        banned = tuple(snap.item_ids.ids(top[20:]).tolist())
        rec = Recommender(h, candidates=10, exact_items=exact_items)
        got = rec.recommend(user, 10, filters=Filters(exclude_items=banned))
        assert len(got.items) == 10
        assert not set(got.items) & set(snap.item_ids.ids(top).tolist())
        if exact_items:
            eligible = np.setdiff1d(np.arange(snap.n_items), np.union1d(seen, top))
            assert got.items == brute_top(snap, row, 10, eligible)


class FewIndex:
    """An index that finds only its first few items (an IVF probing too few lists)."""

    def __init__(self, index: CandidateIndex, found: int) -> None:
        self.index, self.found, self.size = index, found, index.size

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(queries, k)
        rows = rows.copy()
        rows[:, self.found:] = -1
        return scores, rows


def test_an_index_that_finds_too_few_falls_back_to_the_exact_ranking(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    user, row = users_of(snap)[1]
    unavailable = np.arange(0, snap.n_items, 7)
    h = holder_with(snap, index=FewIndex(snap.index, 4), unavailable=unavailable)
    got = Recommender(h, candidates=10, exact_items=0).recommend(user, 10)
    eligible = np.setdiff1d(np.arange(snap.n_items), np.union1d(snap.store.seen(row),
                                                                unavailable))
    assert got.items == brute_top(snap, row, 10, eligible)


def test_a_plain_request_is_unchanged_by_the_filters_code(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    for exact_items in (10_000, 0):
        rec = Recommender(holder, candidates=30, exact_items=exact_items)
        for user, row in users_of(snap, 4):
            got = rec.recommend(user, 10)
            want = recommend.top_k(snap, row, 10, 30 if not exact_items else snap.n_items)
            assert got.items == snap.item_ids.ids(want[0]).tolist()


def counts_top(snap: Snapshot, k: int, eligible: np.ndarray) -> list[str]:
    counts = snap.store.item_counts
    rows = np.sort(eligible)
    return snap.item_ids.ids(rows[np.argsort(-counts[rows], kind="stable")[:k]]).tolist()


def test_cold_start_filters_and_their_fallback(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer, _, _ = trained
    h = SnapshotHolder()
    catalogue = Catalogue(ItemAvailability(trainer.item_ids.ids(np.arange(0, 40, 3)).tolist()))
    publisher = Publisher(trainer, h, catalogue=catalogue)
    publisher.publish(1)
    publisher.close()
    snap = h.get()
    assert snap is not None
    every = np.arange(snap.n_items)
    available = np.setdiff1d(every, snap.unavailable)
    assert len(snap.unavailable) == 14 and not np.isin(snap.popular, snap.unavailable).any()
    rec = Recommender(h)
    assert rec.recommend("nobody", 10).items == counts_top(snap, 10, available)
    banned = snap.popular[:15]
    f = Filters(exclude_items=tuple(snap.item_ids.ids(banned).tolist()))
    want = counts_top(snap, 10, np.setdiff1d(available, banned))
    assert rec.recommend("nobody", 10, filters=f).items == want
    # The snapshot keeps only the most popular few: excluding them falls back to counts.
    monkeypatch.setattr(recommend, "POPULAR_KEPT", 20)
    short = holder_with(snap, popular=snap.popular[:20], popularity=snap.popularity[:20])
    got = Recommender(short).recommend("nobody", 10, filters=f)
    assert got.items == want and got.cold_start
    total = snap.store.item_counts.sum()
    assert got.scores == pytest.approx((snap.store.item_counts[snap.item_rows(want)]
                                        / total).tolist())
    only = tuple(snap.item_ids.ids(every[::5]).tolist())
    got = rec.recommend("nobody", 5, filters=Filters(include_only=only))
    assert got.items == counts_top(snap, 5, np.setdiff1d(every[::5], snap.unavailable))


def test_availability_is_applied_in_order_and_remembered_for_unknown_items() -> None:
    a = ItemAvailability()
    a.apply(Availability.from_rows([("x", False), ("y", False), ("x", True), ("z", False)]))
    assert a.ids() == ["y", "z"]
    from ncf_stream.ids import IdMap
    ids = IdMap()
    ids.rows(["z", "q", "y"])
    assert a.rows(ids, 3).tolist() == [0, 2]
    assert a.rows(ids, 1).tolist() == [0]  # "y" is beyond the snapshot's rows
    a.apply(Availability.from_rows([("z", True)]))
    assert a.rows(ids, 3).tolist() == [2]  # the cache follows changes


def engine_settings(tmp_path: Path | None = None) -> Settings:
    return small_engine_settings(tmp_path)


def test_engine_applies_availability_without_training_or_storing_it(tmp_path: Path) -> None:
    events = generate(SynthConfig(users=60, items=40, events=1500, seed=4, topics=3)).to_events()
    source = MemorySource(events.take(np.arange(1000)), batch_size=500)
    source.push(Availability.from_rows([(str(events.items[0]), False), ("later", False),
                                        ("never", False), ("never", True)]))
    later = Events.from_rows([("u-late", "later", 2e9, "interaction", 1.0)])
    engine = Engine(engine_settings(tmp_path), source)
    drain_engine(engine)
    interactions, trained = len(engine.trainer.store), engine.counters.trained
    n_items = len(engine.trainer.item_ids)
    assert "later" not in engine.trainer.item_ids and "never" not in engine.trainer.item_ids
    assert engine.counters.consumed == 1004
    snap = engine.holder.get()
    assert snap is not None and snap.events == 1004
    first = int(snap.item_rows([str(events.items[0])])[0])
    assert snap.unavailable.tolist() == [first]
    assert snap.store.item_counts[first] > 0  # it keeps its history
    assert engine.catalogue.availability.ids() == sorted([str(events.items[0]), "later"])
    source.push(Availability.from_rows([(str(events.items[0]), True)]))
    drain_engine(engine)
    assert (len(engine.trainer.store), engine.counters.trained) == (interactions, trained)
    assert len(engine.trainer.item_ids) == n_items
    assert engine.holder.get().unavailable.tolist() == []  # type: ignore[union-attr]
    source.push(later)  # the item remembered by id is unavailable once it appears
    drain_engine(engine)
    snap = engine.holder.get()
    assert snap is not None
    assert snap.unavailable.tolist() == snap.item_rows(["later"]).tolist()
    assert "later" not in Recommender(engine.holder).recommend("nobody", 100).items
    engine.close()

    again = Engine(engine_settings(tmp_path), MemorySource(offset=1006))
    assert again.catalogue.availability.ids() == ["later"]
    assert again.positions == engine.positions
    again.publisher.publish(again.counters.consumed)
    assert again.holder.get().unavailable.tolist() == snap.unavailable.tolist()  # type: ignore[union-attr]
    again.close(final_checkpoint=False)


def test_the_online_hit_rate_probes_what_is_served_so_never_an_unavailable_item(
        trained) -> None:
    from ncf_stream.evaluator import OnlineHitRate

    _, holder, _ = trained
    snap = holder.get()
    user, row = users_of(snap)[0]
    top = Recommender(holder).recommend(user, 5).items
    rows = snap.item_rows(top)
    off = dataclasses.replace(snap, unavailable=np.sort(rows[:1]))
    online = OnlineHitRate(fraction=1.0, max_per_second=1e9)
    online.observe(off, np.array([row, row]), rows[:2])
    assert online.probes == 2 and online.hits[5] == 1  # the unavailable one is no hit
