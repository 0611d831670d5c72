"""The interaction store and its rolling hold-out against a brute-force reference on sets."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from conftest import swapped_stream  # tests/conftest.py
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ncf_stream.events import Events
from ncf_stream.ids import IdMap, IdMapMismatch, RowMapper
from ncf_stream.keyset import KeySet
from ncf_stream.store import InteractionStore, evaluated_users, pair_keys

Event = tuple[int, int, float]  # (user, item, ts)

events = st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, 6).map(float))
streams = st.lists(st.lists(events, min_size=1, max_size=12), min_size=1, max_size=10)


class Reference:
    """The store's contract, written the slow and obvious way."""

    def __init__(self, min_history: int) -> None:
        self.min_history = min_history
        self.latest: dict[tuple[int, int], float] = {}
        self.history: dict[int, list[tuple[float, int, int]]] = defaultdict(list)  # (ts, seq, item)
        self.seq = 0

    def append(self, batch: list[Event]) -> None:
        for u, i, t in batch:
            self.latest[(u, i)] = max(t, self.latest.get((u, i), -np.inf))
            self.history[u].append((t, self.seq, i))
            self.seq += 1

    def items_of(self, u: int) -> set[int]:
        return {i for (uu, i) in self.latest if uu == u}

    def holdout(self) -> dict[int, int]:
        return {u: max(h)[2] for u, h in self.history.items()
                if len(self.items_of(u)) >= self.min_history}


def run(batches: list[list[Event]], min_history: int) -> tuple[InteractionStore, Reference,
                                                               list[dict[int, set[int]]]]:
    store, ref = InteractionStore(min_history=min_history), Reference(min_history)
    trained: list[dict[int, set[int]]] = []
    for batch in batches:
        u, i, t = (np.array(c) for c in zip(*batch, strict=True))
        result = store.append(u, i, t)
        ref.append(batch)
        per_user: dict[int, set[int]] = defaultdict(set)
        for uu, ii in zip(result.train_users.tolist(), result.train_items.tolist(), strict=True):
            per_user[uu].add(ii)
        trained.append(per_user)
    return store, ref, trained


@given(streams, st.integers(1, 3))
@settings(max_examples=200, deadline=None)
def test_store_matches_reference(batches: list[list[Event]], min_history: int) -> None:
    store, ref, _ = run(batches, min_history)
    assert len(store) == len(ref.latest)
    users = np.repeat(np.arange(7), 9)
    items = np.tile(np.arange(9), 7)
    expected = np.array([(u, i) in ref.latest for u, i in zip(users, items, strict=True)])
    assert np.array_equal(store.contains(users, items), expected)
    view = store.view()
    for u in range(7):
        assert store.seen(u).tolist() == sorted(ref.items_of(u))
        assert view.seen(u).tolist() == sorted(ref.items_of(u))
    indptr, flat = store.seen_csr(np.arange(7))
    assert [flat[a:b].tolist() for a, b in itertools.pairwise(indptr)] == [
        sorted(ref.items_of(u)) for u in range(7)]
    pairs = list(ref.latest)
    pu, pi = (np.array(c) for c in zip(*pairs, strict=True))
    assert store.last_ts(pu, pi).tolist() == [ref.latest[p] for p in pairs]
    assert store.item_counts().tolist() == [
        sum(1 for (_, i) in ref.latest if i == item) for item in range(store.n_items)]
    ho = store.holdout()
    assert dict(zip(ho.users.tolist(), ho.items.tolist(), strict=True)) == ref.holdout()
    assert store.repeats == sum(len(b) for b in batches) - len(ref.latest)


@given(streams, st.integers(1, 3))
@settings(max_examples=200, deadline=None)
def test_holdout_is_never_trained_and_nothing_is_lost(
    batches: list[list[Event]], min_history: int
) -> None:
    _store, ref, trained = run(batches, min_history)
    # Replaying the batches one by one: what a batch trains is never the hold-out after it.
    partial = InteractionStore(min_history=min_history)
    for batch, per_user in zip(batches, trained, strict=True):
        u, i, t = (np.array(c) for c in zip(*batch, strict=True))
        partial.append(u, i, t)
        ho = dict(zip(partial.holdout().users.tolist(), partial.holdout().items.tolist(),
                      strict=True))
        for user, items in per_user.items():
            assert ho.get(user) not in items
    # Every interaction is either trained at some point or is the current hold-out.
    final = ref.holdout()
    for user in ref.history:
        ever = set().union(*(t.get(user, set()) for t in trained))
        assert ref.items_of(user) <= ever | {final.get(user, -1)}


def test_holdout_rolls_forward_and_late_events_train_directly() -> None:
    s = InteractionStore(min_history=2)
    r = s.append(np.array([0]), np.array([10]), np.array([100.0]))
    assert r.train_items.tolist() == [10]  # one interaction: too little history to hold out
    r = s.append(np.array([0]), np.array([11]), np.array([200.0]))
    assert r.train_items.tolist() == [] and s.holdout().items.tolist() == [11]
    r = s.append(np.array([0]), np.array([12]), np.array([150.0]))  # late: trains at once
    assert r.train_items.tolist() == [12] and s.holdout().items.tolist() == [11]
    r = s.append(np.array([0]), np.array([13]), np.array([300.0]))  # newer: 11 is released
    assert r.train_items.tolist() == [11] and r.released == 1
    assert s.holdout().items.tolist() == [13]
    r = s.append(np.array([0, 0]), np.array([14, 15]), np.array([400.0, 400.0]))  # tie: arrival
    assert sorted(r.train_items.tolist()) == [13, 14] and s.holdout().items.tolist() == [15]


def test_repeat_keeps_latest_ts_and_counts_once() -> None:
    s = InteractionStore()
    s.append(np.array([1, 1, 1]), np.array([5, 5, 6]), np.array([10.0, 30.0, 20.0]))
    r = s.append(np.array([1]), np.array([5]), np.array([25.0]))
    assert len(s) == 2 and s.repeats == 2 and r.repeats == 1 and r.new == 0
    assert s.last_ts(np.array([1]), np.array([5])).tolist() == [30.0]
    assert s.item_counts().tolist() == [0, 0, 0, 0, 0, 1, 1]


def test_replay_never_samples_a_holdout() -> None:
    s = InteractionStore(min_history=2)
    rng = np.random.default_rng(0)
    u = rng.integers(0, 50, 2000)
    s.append(u, rng.integers(0, 100, 2000), rng.random(2000))
    users, items = s.sample_positives(np.random.default_rng(1), 20_000)
    assert len(users) > 15_000
    assert not s.is_holdout(users, items).any()
    assert s.contains(users, items).all()


def test_replay_is_uniform_over_trained_pairs_and_blind_to_the_hold_out() -> None:
    """Drawn from many levels, uniform over every pair but the hold-outs, and the same
    draws when each user holds out another item they never touched."""
    u, i, i_alt, ts = swapped_stream(seed=3)
    a, b = InteractionStore(min_history=2), InteractionStore(min_history=2)
    for lo in range(0, len(u), 37):  # small appends: several levels of the key set
        a.append(u[lo:lo + 37], i[lo:lo + 37], ts[lo:lo + 37])
        b.append(u[lo:lo + 37], i_alt[lo:lo + 37], ts[lo:lo + 37])
    assert a._pairs.levels > 1
    ua, ia = a.sample_positives(np.random.default_rng(1), 200_000)
    ub, ib = b.sample_positives(np.random.default_rng(1), 200_000)
    assert np.array_equal(ua, ub) and np.array_equal(ia, ib)
    # Uniform over the trained pairs: every one drawn, none other, counts as expected.
    trained_u, trained_i = a.training_pairs()
    trained = pair_keys(trained_u, trained_i)
    drawn = pair_keys(ua, ia)
    assert set(np.unique(drawn).tolist()) == set(trained.tolist())
    counts = np.unique(drawn, return_counts=True)[1]
    assert stats.chisquare(counts).pvalue > 1e-3
    assert abs(len(drawn) / 200_000 - len(trained) / len(a)) < 0.01


def test_bad_input_is_refused() -> None:
    s = InteractionStore()
    with pytest.raises(ValueError, match="same length"):
        s.append(np.array([1]), np.array([1, 2]), np.array([1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        s.append(np.array([-1]), np.array([1]), np.array([1.0]))


@given(streams, st.integers(1, 3))
@settings(max_examples=50, deadline=None)
def test_save_and_load_is_exact(tmp_path_factory: pytest.TempPathFactory,
                                batches: list[list[Event]], min_history: int) -> None:
    store, _, _ = run(batches, min_history)
    path = tmp_path_factory.mktemp("store") / "store.npz"
    store.save(path)
    loaded = InteractionStore.load(path)
    users, items = np.repeat(np.arange(7), 9), np.tile(np.arange(9), 7)
    assert np.array_equal(loaded.contains(users, items), store.contains(users, items))
    for a, b in zip(loaded.holdout().__dict__.values(), store.holdout().__dict__.values(),
                    strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(loaded.item_counts(), store.item_counts())
    assert (loaded.events, loaded.repeats, len(loaded)) == (store.events, store.repeats, len(store))
    # The restored store goes on exactly as the original would.
    nxt = (np.array([0, 3, 6]), np.array([8, 1, 2]), np.array([7.0, 3.0, 0.0]))
    a, b = store.append(*nxt), loaded.append(*nxt)
    assert a.train_items.tolist() == b.train_items.tolist()
    assert np.array_equal(store.holdout().items, loaded.holdout().items)


def test_keyset_levels_merge_and_answer_like_a_set() -> None:
    rng = np.random.default_rng(3)
    ks, ref = KeySet(), set()
    for _ in range(200):
        batch = np.unique(rng.integers(0, 50_000, rng.integers(1, 400)))
        new = batch[~ks.contains(batch)]
        assert set(new.tolist()).isdisjoint(ref)
        ks.insert(new, new.astype(np.int32))
        ref.update(new.tolist())
    assert len(ks) == len(ref) and ks.levels < 12
    q = np.arange(50_000)
    assert np.array_equal(ks.contains(q), np.isin(q, list(ref)))
    keys, vals = ks.arrays()
    assert keys.tolist() == sorted(ref) and np.array_equal(vals, keys.astype(np.int32))
    sample = ks.sample_excluding(rng, 5000, 20, lambda runs: np.full(len(runs), -1))
    assert len(sample) == 5000 and np.isin(sample, keys).all()


def test_bloom_filter_never_forgets_a_key_added_in_bulk_or_in_batches() -> None:
    from ncf_stream.keyset import BlockedBloom

    rng = np.random.default_rng(4)
    keys = rng.integers(0, 2**62, 200_000)
    bloom = BlockedBloom(len(keys))
    bloom.add(keys[:150_000])  # the bulk path of a rebuild
    for lo in range(150_000, len(keys), 5000):  # the per-batch path, duplicates in a word
        bloom.add(keys[lo:lo + 5000])
    assert bloom.maybe(keys).all()
    others = rng.integers(0, 2**62, 100_000)
    assert bloom.maybe(others).mean() < 0.05  # and it still filters


def test_ids_grow_look_up_and_round_trip(tmp_path: Path) -> None:
    ids = IdMap()
    rows = ids.rows(np.array(["b", "a", "b", "ü", "\x00"], dtype=object))
    assert rows.tolist() == [0, 1, 0, 2, 3]
    assert ids.rows(np.array(["a", "zz"], dtype=object), add=False).tolist() == [1, -1]
    assert ids.ids([2, 0]).tolist() == ["ü", "b"]
    for n in range(2000):  # grows past its first capacity
        ids.rows([f"x{n}"])
    ids.save(tmp_path / "ids.npz")
    loaded = IdMap.load(tmp_path / "ids.npz")
    assert loaded.all_ids().tolist() == ids.all_ids().tolist()
    assert loaded.rows(["ü", "x1999"], add=False).tolist() == [2, 2003]
    with pytest.raises(IndexError):
        ids.ids([len(ids)])


id_batches = st.lists(st.lists(st.tuples(st.sampled_from("abcdefgh"), st.sampled_from("pqrstu")),
                               max_size=8), max_size=8)


@given(id_batches, st.integers(0, 8))
@settings(max_examples=100, deadline=None)
def test_rows_mapped_upstream_are_the_rows_the_engine_would_assign(
    batches: list[list[tuple[str, str]]], restored: int
) -> None:
    """The engine's maps (restored from the first batches), extended by what a RowMapper
    started from them sends, equal maps that saw every id themselves, batch for batch."""
    def events(batch: list[tuple[str, str]]) -> Events:
        return Events.from_rows([(u, i, float(n), "t", 1.0) for n, (u, i) in enumerate(batch)])

    reference = IdMap(), IdMap()
    engine = IdMap(), IdMap()
    for batch in batches[:restored]:
        ev = events(batch)
        for users, items in (reference, engine):
            users.rows(ev.users)
            items.rows(ev.items)
    mapper = RowMapper(engine[0].all_ids().tolist(), engine[1].all_ids().tolist())
    for batch in batches[restored:]:
        ev = events(batch)
        mapped = mapper.map(ev)
        engine[0].extend(mapped.new_users, mapped.user_base)
        engine[1].extend(mapped.new_items, mapped.item_base)
        assert mapped.users.tolist() == reference[0].rows(ev.users).tolist()
        assert mapped.items.tolist() == reference[1].rows(ev.items).tolist()
        assert engine[0].ids(mapped.users).tolist() == ev.users.tolist()
        assert mapped.ts.tolist() == ev.ts.tolist()
    assert engine[0].all_ids().tolist() == reference[0].all_ids().tolist()
    assert engine[1].all_ids().tolist() == reference[1].all_ids().tolist()


def test_extend_refuses_rows_that_do_not_continue_the_map() -> None:
    ids = IdMap()
    ids.extend(["a", "b"], 0)
    for new, first, why in ((["c"], 3, "do not continue"), (["c"], 1, "do not continue"),
                            (["c", "a"], 2, "already mapped"), (["c", "c"], 2, "repeat")):
        with pytest.raises(IdMapMismatch, match=why):
            ids.extend(new, first)
        assert ids.all_ids().tolist() == ["a", "b"] and "c" not in ids  # nothing added
    ids.extend([], 2)
    ids.extend([f"x{n}" for n in range(3000)], 2)  # grows past its first capacity
    assert ids.rows(["b", "x2999"], add=False).tolist() == [1, 3001]


@given(st.lists(st.integers(0, 10**6), min_size=300, max_size=3000, unique=True),
       st.lists(st.integers(-5, 10**6 + 5), max_size=200))
@settings(max_examples=50, deadline=None)
def test_fenced_search_agrees_with_searchsorted(keys: list[int], queries: list[int]) -> None:
    from ncf_stream.keyset import Level

    level = Level(np.array(sorted(keys), dtype=np.int64))
    assert level.fence is not None  # long enough to be fenced
    q = np.array(sorted(queries), dtype=np.int64)
    assert np.array_equal(level.insertion_points(q), np.searchsorted(level.keys, q))
    expected = np.where(np.isin(q, level.keys), np.searchsorted(level.keys, q), -1)
    assert np.array_equal(level.search(q), expected)


def test_a_fraction_of_users_picked_by_id_hash_has_a_hold_out_the_rest_train_at_once() -> None:
    ids = [f"user-{k}" for k in range(20_000)]
    picked = evaluated_users(ids, 0.1)
    assert abs(picked.mean() - 0.1) < 0.01
    assert np.array_equal(picked, evaluated_users(ids, 0.1))  # the same users every run
    assert evaluated_users(ids, 1.0).all()
    assert np.all(picked <= evaluated_users(ids, 0.3))  # a larger share keeps these users

    s = InteractionStore(min_history=2)
    s.mark_evaluated(np.arange(4), np.array([True, False, True, False]))
    users = np.repeat(np.arange(4), 3)
    r = s.append(users, np.tile([7, 8, 9], 4), np.arange(12, dtype=np.float64))
    assert s.holdout().users.tolist() == [0, 2]
    # Users 1 and 3 train on every event, their newest included.
    assert sorted(zip(r.train_users.tolist(), r.train_items.tolist(), strict=True)) == [
        (0, 7), (0, 8), (1, 7), (1, 8), (1, 9), (2, 7), (2, 8), (3, 7), (3, 8), (3, 9)]
    assert not s.is_holdout(np.array([1, 3]), np.array([9, 9])).any()


def test_the_hold_out_mark_survives_a_checkpoint(tmp_path: Path) -> None:
    s = InteractionStore(min_history=2)
    s.mark_evaluated(np.arange(3), np.array([False, True, False]))
    s.append(np.repeat(np.arange(3), 2), np.tile([1, 2], 3), np.arange(6, dtype=np.float64))
    s.save(tmp_path / "s.npz")
    assert InteractionStore.load(tmp_path / "s.npz").holdout().users.tolist() == [1]
