"""Negative sampling: never a trained item, the hold-out invisible, the right distribution,
stable eval negatives."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import swapped_stream  # tests/conftest.py
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ncf_stream.sampler import NegativeSampler, SamplerConfig, _feistel, eval_negatives
from ncf_stream.store import InteractionStore


def store_with(pairs: list[tuple[int, int]], n_items: int | None = None) -> InteractionStore:
    s = InteractionStore(min_history=2)
    u, i = (np.array(c, dtype=np.int64) for c in zip(*pairs, strict=True))
    s.append(u, i, np.arange(len(u), dtype=np.float64))
    if n_items is not None and s.n_items < n_items:  # an extra user makes the catalogue this big
        s.append(np.array([10_000]), np.array([n_items - 1]), np.array([1e9]))
    return s


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 11)), min_size=1, max_size=60),
       st.sampled_from([0.0, 0.75]), st.integers(0, 2**16))
@settings(max_examples=150, deadline=None)
def test_never_a_touched_item(pairs: list[tuple[int, int]], alpha: float, seed: int) -> None:
    store = store_with(pairs)
    sampler = NegativeSampler(store, SamplerConfig(k=5, alpha=alpha, seed=seed))
    users = np.arange(5).repeat(20)
    neg = sampler.sample(users)
    assert neg.shape == (100, 5)
    held = dict(zip(store.holdout().users.tolist(), store.holdout().items.tolist(), strict=True))
    for u, row in zip(users.tolist(), neg.tolist(), strict=True):
        trained = set(store.seen(u).tolist()) - {held.get(u)}  # the hold-out is fair game
        free = set(range(store.n_items)) - trained
        if not free:
            assert row == [-1] * 5  # nothing left to draw: said, not faked
        else:
            assert set(row) <= free


def chi_square_p(observed: np.ndarray, expected_weights: np.ndarray) -> float:
    expected = expected_weights / expected_weights.sum() * observed.sum()
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("alpha", [0.0, 0.75])
def test_distribution_matches_the_target_over_the_untouched_items(alpha: float) -> None:
    rng = np.random.default_rng(0)
    # Popularity with a long tail from 400 other users; user 0 has touched 10 items.
    others = [(int(u), int(i)) for u, i in zip(rng.integers(1, 400, 6000),
                                                rng.zipf(1.3, 6000) % 50, strict=True)]
    touched = [(0, i) for i in range(0, 50, 5)]
    store = store_with(others + touched)
    sampler = NegativeSampler(store, SamplerConfig(k=1, alpha=alpha, seed=1))
    draws = sampler.sample(np.zeros(200_000, dtype=np.int64)).ravel()
    ho = store.holdout()
    trained = np.setdiff1d(store.seen(0), ho.items[ho.users == 0])
    free = np.setdiff1d(np.arange(store.n_items), trained)
    counts = np.bincount(draws, minlength=store.n_items)
    assert counts[trained].sum() == 0
    # Popularity without the hold-outs: they are not training data.
    popularity = store.item_counts() - np.bincount(ho.items, minlength=store.n_items)
    target = popularity[free].astype(float) ** alpha
    assert chi_square_p(counts[free], target) > 1e-3


def test_dense_user_is_sampled_exactly_from_the_complement() -> None:
    n = 200
    pairs = [(0, i) for i in range(n) if i not in (7, 99, 150)]
    store = store_with([*pairs, (1, 7), (1, 99), (1, 150)])
    sampler = NegativeSampler(store, SamplerConfig(k=3, seed=0))
    draws = sampler.sample(np.zeros(30_000, dtype=np.int64)).ravel()
    # The untouched three, and the user's hold-out (its newest, 199).
    assert set(np.unique(draws).tolist()) == {7, 99, 150, 199}
    assert chi_square_p(np.bincount(draws)[[7, 99, 150, 199]], np.ones(4)) > 1e-3


def test_rows_still_rejected_after_every_round_fall_back_to_the_complement() -> None:
    # 74% touched: just under the dense share, so rejection runs, and a row fails
    # all 24 rounds with probability 0.74**24 ~ 7e-4: ~30 of these 40,000 rows.
    store = store_with([(0, i) for i in range(100) if i % 50 < 37] + [(1, 99)])
    sampler = NegativeSampler(store, SamplerConfig(k=8, seed=0))
    neg = sampler.sample(np.zeros(5000, dtype=np.int64))
    zeros = np.zeros(neg.size, dtype=np.int64)
    assert not (store.contains(zeros, neg.ravel()) & ~store.is_holdout(zeros, neg.ravel())).any()
    assert sampler.rejected > 0 and 0 < sampler.from_complement < 200


def swapped_holdouts(seed: int) -> tuple[InteractionStore, InteractionStore]:
    u, i, i_alt, ts = swapped_stream(seed)
    a, b = InteractionStore(min_history=2), InteractionStore(min_history=2)
    a.append(u, i, ts)
    b.append(u, i_alt, ts)
    assert (a.holdout().items != b.holdout().items).sum() == 40 and a.n_items == b.n_items
    return a, b


@pytest.mark.parametrize("alpha", [0.0, 0.75])
def test_every_draw_is_the_same_whichever_untouched_item_a_user_holds_out(alpha: float) -> None:
    a, b = swapped_holdouts(seed=4)
    users = np.random.default_rng(5).integers(0, 40, 3000)
    sa, sb = (NegativeSampler(s, SamplerConfig(k=4, alpha=alpha, seed=9)) for s in (a, b))
    for _ in range(5):
        assert np.array_equal(sa.sample(users), sb.sample(users))
    assert sa.from_complement > 0  # the dense users' path was taken too
    assert (sa.drawn, sa.rejected) == (sb.drawn, sb.rejected)


def test_feistel_walk_is_a_bijection() -> None:
    for b in (1, 2, 5, 7):
        for key in (0, 12345, 2**63 + 7):
            x = np.arange(4**b, dtype=np.uint64)
            out = _feistel(x, np.uint64(b), np.full(len(x), key, dtype=np.uint64))
            assert sorted(out.tolist()) == list(range(4**b))
            assert not np.array_equal(out, x)


def test_eval_negatives_barely_move_when_the_catalogue_grows() -> None:
    s = holdout_store()  # 1000 items
    rows = np.arange(len(s.holdout().users))
    before = eval_negatives(s.view(), rows, 99)
    s.append(np.array([10_000] * 10), np.arange(1000, 1010), np.full(10, 5.0))  # +1% items
    after = eval_negatives(s.view(), rows, 99)
    changed = np.mean([len(set(a) - set(b)) for a, b in zip(after.tolist(), before.tolist(),
                                                          strict=True)])
    assert 0 < changed < 3  # about 1 in 99 per user, not a reshuffle
    assert (after >= 1000).any()  # new items do become negatives


def holdout_store() -> InteractionStore:
    rng = np.random.default_rng(5)
    s = InteractionStore(min_history=2)
    s.append(rng.integers(0, 300, 20_000), rng.integers(0, 1000, 20_000), rng.random(20_000))
    return s


def test_eval_negatives_are_untouched_distinct_and_stable() -> None:
    s = holdout_store()
    view = s.view()
    rows = np.arange(len(view.holdout.users))
    neg = eval_negatives(view, rows, 99, seed=3)
    assert neg.shape == (len(rows), 99)
    users = np.repeat(view.holdout.users, 99)
    assert not s.contains(users, neg.ravel()).any()
    assert all(len(set(r)) == 99 for r in neg.tolist())
    assert np.array_equal(neg, eval_negatives(s.view(), rows, 99, seed=3))
    assert not np.array_equal(neg, eval_negatives(view, rows, 99, seed=4))


def test_eval_negatives_change_only_with_the_holdout() -> None:
    s = holdout_store()
    before = s.view()
    u0 = int(before.holdout.users[0])
    neg_before = eval_negatives(before, np.arange(len(before.holdout.users)), 99)
    other_user = int(before.holdout.users[1])
    s.append(np.array([u0]), np.array([1]), np.array([10.0]))  # newer: a new hold-out for u0
    after = s.view()
    neg_after = eval_negatives(after, np.arange(len(after.holdout.users)), 99)
    assert not np.array_equal(neg_before[0], neg_after[0])
    idx_b = int(np.flatnonzero(before.holdout.users == other_user)[0])
    idx_a = int(np.flatnonzero(after.holdout.users == other_user)[0])
    assert np.array_equal(neg_before[idx_b], neg_after[idx_a])


def test_eval_negatives_for_a_user_with_few_untouched_items() -> None:
    n = 120
    pairs = [(0, i) for i in range(n) if i % 40 != 3]  # 3 untouched: 3, 43, 83
    store = store_with([*pairs, (1, 3)])
    view = store.view()
    row = int(np.flatnonzero(view.holdout.users == 0)[0])
    neg = eval_negatives(view, np.array([row]), 99)[0]
    assert sorted(neg[neg >= 0].tolist()) == [3, 43, 83]
    assert (neg == -1).sum() == 96


@pytest.mark.parametrize("weights", [
    np.r_[1e6, np.ones(1000)],  # the tail shares two buckets: long walks, binary-search fallback
    np.random.default_rng(0).zipf(1.5, 5000).astype(float) ** 0.75,
    np.zeros(10),  # nothing counted: uniform
])
def test_popularity_table_draws_exactly_what_inverse_cdf_draws(weights: np.ndarray) -> None:
    from ncf_stream.sampler import PopularityTable

    table = PopularityTable(weights, total=1)
    got = table.draw(np.random.default_rng(7), 100_000)
    x = np.random.default_rng(7).random(100_000) * table.mass
    assert np.array_equal(got, np.searchsorted(table.cdf, x, side="right"))
