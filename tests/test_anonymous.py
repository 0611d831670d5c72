"""Anonymous requests (items instead of a user): the fit, the planted truth, filters,
cold start, determinism, the history input, and that the snapshot never changes."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import SMALL, train_stream  # tests/conftest.py
from test_filters import FewIndex, holder_with  # tests/test_filters.py

from ncf_stream.anonymous import (
    AnonymousConfig,
    bce,
    draw_negatives,
    fit_row,
    history_recent,
    negative_cdf,
    request_seed,
)
from ncf_stream.errors import BadInput
from ncf_stream.model import NeuMFConfig
from ncf_stream.recommend import Filters, Recommender, logits_of, top_k
from ncf_stream.snapshot import Publisher, Snapshot, SnapshotHolder
from ncf_stream.synth import SynthConfig, SynthStream, generate
from ncf_stream.trainer import Trainer

TOPICS = 6


@pytest.fixture(scope="module")
def planted() -> Iterator[tuple[SynthStream, SnapshotHolder]]:
    """A small model trained to convergence on clearly clustered data: 6 topics, 90% of a
    user's events from their own topics, 90% of those from the primary one."""
    stream = generate(SynthConfig(users=300, items=250, events=12_000, seed=2, topics=TOPICS,
                                  affinity=0.9, primary_share=0.9))
    trainer = Trainer(SMALL)
    holder = SnapshotHolder()
    publisher = Publisher(trainer, holder)
    train_stream(trainer, stream.to_events(), poll=3000, replay_steps=600)
    publisher.publish(12_000)
    yield stream, holder
    publisher.close()


def topic_items(stream: SynthStream, topic: int, n: int = 10) -> list[str]:
    """The topic's n most popular items (by their events), as ids."""
    counts = np.bincount(stream.items, minlength=len(stream.item_topic))
    rows = np.flatnonzero(stream.item_topic == topic)
    return [str(i) for i in rows[np.argsort(-counts[rows], kind="stable")][:n]]


def share_in_topic(stream: SynthStream, items: list[str], topic: int) -> float:
    return float(np.mean(stream.item_topic[np.array(items, dtype=np.int64)] == topic))


def test_a_session_from_one_topic_gets_that_topic_back(planted) -> None:
    """Against the planted truth: the answer is mostly the topic's items (chance 1/6),
    where popularity's answer to the same request is not."""
    stream, holder = planted
    rec = Recommender(holder)
    fitted, popular = [], []
    for topic in range(TOPICS):
        given = topic_items(stream, topic)
        r = rec.recommend_items(given, 10)
        assert r.anonymous and not r.cold_start and r.user == "" and len(r.items) == 10
        fitted.append(share_in_topic(stream, r.items, topic))
        pop = rec.recommend("nobody", 10, filters=Filters(exclude_items=tuple(given)))
        popular.append(share_in_topic(stream, pop.items, topic))
    assert np.mean(fitted) >= 0.4, fitted
    assert np.mean(fitted) >= np.mean(popular) + 0.2, (fitted, popular)


def test_the_fit_lowers_the_loss_on_its_own_items(planted) -> None:
    _, holder = planted
    snap = holder.get()
    rows = snap.item_rows(["3", "17", "40", "41", "99"])
    cfg = AnonymousConfig()
    start = fit_row(snap.model, rows, dataclasses.replace(cfg, steps=0))
    fitted = fit_row(snap.model, rows, cfg)
    given = np.unique(rows)
    neg = draw_negatives(snap.n_items, given, cfg.negatives * len(given),
                         np.random.default_rng(request_seed(rows)))
    items = np.concatenate([given, neg])
    labels = np.r_[np.ones(len(given)), np.zeros(len(neg))]
    loss = [bce(snap.model, fit_row(snap.model, rows, dataclasses.replace(cfg, steps=n)),
                items, labels) for n in (0, 2, 5, cfg.steps)]
    assert loss == sorted(loss, reverse=True) and loss[-1] < 0.85 * loss[0], loss
    assert loss[0] == bce(snap.model, start, items, labels)
    assert loss[-1] == bce(snap.model, fitted, items, labels)
    # And the given items score above their negatives for the fitted row.
    logits = logits_of(snap, fitted).numpy()
    assert logits[given].mean() > logits[neg].mean()


def test_negatives_never_hit_the_given_items_and_fill_a_crowded_catalogue() -> None:
    rng = np.random.default_rng(0)
    given = np.array([0, 2, 3, 7])
    neg = draw_negatives(10, given, 500, rng)
    assert len(neg) == 500 and not np.isin(neg, given).any() and neg.max() < 10
    crowded = np.arange(9)  # one item left: drawn from the complement
    assert draw_negatives(10, crowded, 7, rng).tolist() == [9] * 7
    assert len(draw_negatives(10, np.arange(10), 7, rng)) == 0
    # By weight, as the trainer draws: an item that weighs 0 is never drawn.
    cdf = negative_cdf(np.array([5, 0, 5, 1, 0, 9, 9, 9, 0, 4]), 12, 0.5)
    assert cdf is not None and negative_cdf(np.ones(10), 10, 0.0) is None
    neg = draw_negatives(12, given, 2000, rng, cdf)
    assert len(neg) == 2000 and set(neg.tolist()) == {5, 6, 9}
    assert np.bincount(neg)[9] < np.bincount(neg)[5]
    heavy = np.array([5, 6, 7])  # most of the weight: drawn from the rest by weight
    assert set(draw_negatives(12, heavy, 500, rng, cdf).tolist()) == {0, 2, 3, 9}
    everything = np.flatnonzero(np.diff(cdf, prepend=0.0) > 0)  # all the weight: uniform
    assert not np.isin(draw_negatives(12, everything, 50, rng, cdf), everything).any()


def test_given_items_are_left_out_unless_exclude_is_none(planted) -> None:
    stream, holder = planted
    rec = Recommender(holder)
    given = topic_items(stream, 2, 20)
    for exclude in ("seen", "trained"):
        got = rec.recommend_items(given, 30, exclude=exclude)  # type: ignore[arg-type]
        assert not set(got.items) & set(given) and len(got.items) == 30
    everything = rec.recommend_items(given, 250, exclude="none")
    assert set(given) <= set(everything.items)


def test_the_same_items_get_the_same_answer(planted) -> None:
    _, holder = planted
    rec = Recommender(holder)
    a = rec.recommend_items(["5", "6", "7", "no-such-item"], 10)
    b = rec.recommend_items(["5", "6", "7"], 10)  # unknown ids are ignored
    assert a == b
    c = rec.recommend_items(["5", "6", "8"], 10)
    assert c.scores != a.scores


def brute(snap: Snapshot, user: object, eligible: np.ndarray, k: int) -> list[str]:
    probs = torch.sigmoid(logits_of(snap, user)).numpy()  # type: ignore[arg-type]
    rows = np.sort(eligible)
    return snap.item_ids.ids(rows[np.argsort(-probs[rows], kind="stable")[:k]]).tolist()


@pytest.mark.parametrize("exact_items", [10_000, 0], ids=["exact", "candidates"])
def test_filters_and_availability_apply_as_for_a_user(planted, exact_items: int) -> None:
    stream, holder = planted
    snap = holder.get()
    given = topic_items(stream, 1)
    user = fit_row(snap.model, snap.item_rows(given), AnonymousConfig())
    top = np.array(snap.item_rows(brute(snap, user, np.arange(snap.n_items), 40)))
    unavailable = np.sort(top[:5])
    h = holder_with(snap, unavailable=unavailable)
    banned = tuple(snap.item_ids.ids(top[5:10]).tolist())
    rec = Recommender(h, candidates=snap.n_items if exact_items else 60,
                      exact_items=exact_items)
    got = rec.recommend_items(given, 10, filters=Filters(exclude_items=banned))
    eligible = np.setdiff1d(np.arange(snap.n_items),
                            np.concatenate([user.items, top[:10]]))
    assert got.items == brute(snap, user, eligible, 10)
    only = tuple(snap.item_ids.ids(np.arange(0, snap.n_items, 3)).tolist())
    got = rec.recommend_items(given, 10, filters=Filters(include_only=only))
    eligible = np.setdiff1d(np.arange(0, snap.n_items, 3),
                            np.concatenate([user.items, unavailable]))
    assert got.items == brute(snap, user, eligible, 10)


def test_an_index_that_finds_too_few_falls_back_to_the_exact_ranking(planted) -> None:
    stream, holder = planted
    snap = holder.get()
    given = topic_items(stream, 4)
    h = holder_with(snap, index=FewIndex(snap.index, 4))
    got = Recommender(h, candidates=10, exact_items=0).recommend_items(given, 10)
    user = fit_row(snap.model, snap.item_rows(given), AnonymousConfig())
    assert got.items == brute(snap, user, np.setdiff1d(np.arange(snap.n_items), user.items), 10)
    # Through the index when it finds enough: the candidates' own rescored order.
    rows, _ = top_k(snap, user, 10, 60)
    assert Recommender(holder, candidates=60, exact_items=0).recommend_items(
        given, 10).items == snap.item_ids.ids(rows).tolist()


def test_no_known_item_is_a_flagged_cold_start_with_the_filters(planted) -> None:
    _, holder = planted
    rec = Recommender(holder)
    popular = rec.recommend("nobody", 5)
    got = rec.recommend_items(["no-such-item", "nor-this"], 5)
    assert got.cold_start and got.anonymous and got.user == ""
    assert got.items == popular.items
    f = Filters(exclude_items=tuple(popular.items[:2]))
    assert rec.recommend_items(["no-such-item"], 3, filters=f).items == popular.items[2:5]


def test_bad_input_is_refused(planted) -> None:
    _, holder = planted
    rec = Recommender(holder, max_k=50)
    for items, k in (([], 10), (["1"] * 1001, 10), (["1"], 0), (["1"], 51)):
        with pytest.raises(BadInput):
            rec.recommend_items(items, k)
    with pytest.raises(BadInput):
        rec.recommend_items(["1"], 5, exclude="everything")  # type: ignore[arg-type]


def test_requests_never_change_the_snapshot_and_run_concurrently(planted) -> None:
    stream, holder = planted
    snap = holder.get()
    model = snap.model
    before = [t.clone() for t in (model.users.weight, model.items.weight,
                                  *model.tower.state_dict().values())]
    rec = Recommender(holder)
    sessions = [topic_items(stream, t % TOPICS, 3 + t) for t in range(12)]
    want = [rec.recommend_items(s, 10) for s in sessions]
    got: list[object] = [None] * len(sessions)

    def ask(i: int) -> None:
        for _ in range(3):
            got[i] = rec.recommend_items(sessions[i], 10)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    after = [model.users.weight, model.items.weight, *model.tower.state_dict().values()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert model.n_users == snap.n_users and holder.get() is snap
    assert all(not p.requires_grad for p in model.tower.parameters())


def test_the_history_input_is_the_given_items_oldest_first() -> None:
    """With history_length > 0 the anonymous row carries the history term of the given
    items, newest last, computed as a known user's is: a user whose recent items are
    (newest first) a, b, c gets the same term as a session [c, b, a]."""
    stream = generate(SynthConfig(users=60, items=80, events=3000, seed=5, topics=4))
    cfg = dataclasses.replace(SMALL, model=NeuMFConfig(factors=8, mlp_layers=(16, 8),
                                                       history_length=5))
    trainer = Trainer(cfg)
    train_stream(trainer, stream.to_events(), poll=1000, replay_steps=20)
    model = trainer.model.frozen_copy()
    assert history_recent(np.array([4, 9, 4, 7]), 3).tolist() == [[7, 4, 9]]
    for user in range(10):
        recent = model.recent.of(np.array([user]))  # type: ignore[union-attr]
        items = recent[0][recent[0] >= 0][::-1]  # oldest first
        if not len(items):
            continue
        zero = AnonymousConfig(steps=0, init="zeros")
        row = fit_row(model, items, zero).row
        want = model.user_rows(torch.tensor([user]))[0] - model.users.weight[user]
        assert torch.allclose(row, want, atol=1e-6)
        fitted = fit_row(model, items, AnonymousConfig()).row
        assert not torch.allclose(fitted, row)  # the fit adds to it


@pytest.mark.parametrize("layers,dropout", [((16, 8, 4), 0.0), ((16,), 0.0), ((32, 16, 8, 4), 0.3)])
def test_the_written_out_gradient_is_autograds(layers: tuple[int, ...], dropout: float) -> None:
    from ncf_stream.model import NeuMF

    live = NeuMF(NeuMFConfig(factors=8, mlp_layers=layers, dropout=dropout), seed=3)
    live.grow(20, 50)
    with torch.no_grad():  # rows of a trained model's scale, so the ReLUs cut somewhere
        live.items.weight[:50] = torch.randn(50, live.cfg.row_dim) * 0.5
    model = live.frozen_copy()
    items = torch.arange(0, 50, 2)
    labels = (torch.arange(len(items)) % 3 == 0).float()
    gmf, c = model.item_parts(items)
    for seed in range(3):
        u = torch.randn(model.cfg.row_dim, generator=torch.Generator().manual_seed(seed))
        leaf = u.clone().requires_grad_()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model.logits_from_parts(leaf, gmf, c), labels, reduction="sum")
        (want,) = torch.autograd.grad(loss, leaf)
        assert torch.allclose(model.row_bce_grad(u, gmf, c, labels), want, atol=1e-5)
    with pytest.raises(RuntimeError):
        live.row_bce_grad(u, *live.item_parts(items), labels)  # train mode
