"""Similar items: the ranking against an independent brute force (the correlation over
users of the items' linearized logits), and the items never returned."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ncf_stream.errors import BadInput
from ncf_stream.recommend import Recommender, UnknownItem
from ncf_stream.retrieval import CandidateIndex, IndexConfig
from ncf_stream.similar import SAMPLE_USERS, similar_space, top_similar
from ncf_stream.snapshot import Snapshot, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate


def brute_similar(snap: Snapshot, row: int, k: int, hidden: np.ndarray = ()) -> list[str]:
    """The definition itself: Pearson correlation, over the sampled users, of the
    index's approximate logits (query . item vector) of ``row`` and of every other item."""
    model = snap.model
    import torch

    users = torch.arange(0, model.n_users, max(1, model.n_users // SAMPLE_USERS))
    q = model.retrieval_queries(users, snap.a_ref).double().numpy()
    logits = q @ snap.index.vectors.astype(np.float64).T  # (users, items)
    corr = np.corrcoef(logits, rowvar=False)[row]
    corr[row] = -np.inf
    corr[np.asarray(hidden, dtype=np.int64)] = -np.inf
    top = np.argsort(-corr, kind="stable")[:k]
    return snap.item_ids.ids(top).tolist()


def with_(snap: Snapshot, **changes: object) -> SnapshotHolder:
    h = SnapshotHolder()
    h.set(dataclasses.replace(snap, **changes))  # type: ignore[arg-type]
    return h


def test_the_exact_ranking_is_the_correlation_of_the_items_logits_over_users(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    rec = Recommender(holder)
    for item in map(str, range(0, 250, 23)):
        row = int(snap.item_rows([item])[0])
        got = rec.similar(item, 10)
        assert got.items == brute_similar(snap, row, 10) and item not in got.items
        assert all(-1 - 1e-5 <= s <= 1 + 1e-5 for s in got.scores)
        assert got.scores == sorted(got.scores, reverse=True)


def test_a_torch_index_gives_the_same_similar_items(trained) -> None:
    """Similar items read the index's vectors, which every backend keeps."""
    _, holder, _ = trained
    snap = holder.get()
    index = CandidateIndex(snap.index.vectors, IndexConfig(retrieval_backend="torch"))
    rec = Recommender(with_(snap, index=index))
    for item in map(str, range(0, 250, 41)):
        assert rec.similar(item, 10) == Recommender(holder).similar(item, 10)


def test_similar_items_share_the_planted_topic_well_above_chance(trained) -> None:
    """The trained fixture's stream plants 6 topics: chance is 1/6 of the top 10."""
    _, holder, _ = trained
    snap = holder.get()
    topic = generate(SynthConfig(users=300, items=250, events=12_000, seed=2,
                                 topics=6)).item_topic
    rec = Recommender(holder)
    items = snap.item_ids.all_ids()[: snap.n_items].tolist()
    same = [topic[[int(i) for i in rec.similar(item, 10).items]] == topic[int(item)]
            for item in items]
    assert np.mean(same) > 2 / 6


def test_unavailable_items_and_the_item_itself_never_come_back(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    row = int(snap.item_rows(["5"])[0])
    first = Recommender(holder).similar("5", 10).items
    hidden = np.sort(snap.item_rows(first[:4]))
    got = Recommender(with_(snap, unavailable=hidden)).similar("5", 10)
    assert len(got.items) == 10 and not set(got.items) & set(first[:4])
    assert "5" not in got.items and got.items == brute_similar(snap, row, 10, hidden)


def test_fewer_eligible_items_than_k_return_what_there_is(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    row = int(snap.item_rows(["3"])[0])
    hidden = np.setdiff1d(np.arange(snap.n_items), [row, 10, 11, 12])
    rows, sims = top_similar(snap, row, 10, hidden)
    assert sorted(rows.tolist()) == [10, 11, 12] and np.isfinite(sims).all()
    h = with_(snap, unavailable=hidden)
    assert Recommender(h).similar("3", 10).items == brute_similar(snap, row, 3, hidden)


def test_unknown_or_not_yet_indexed_items_and_bad_k(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    rec = Recommender(holder, max_k=50)
    with pytest.raises(UnknownItem):
        rec.similar("no-such-item")
    newest = str(snap.item_ids.ids(np.array([snap.n_items - 1]))[0])
    lagging = CandidateIndex(snap.index.vectors[:-1])  # an IVF refresh behind the weights
    with pytest.raises(UnknownItem, match="not in the candidate index yet"):
        Recommender(with_(snap, index=lagging)).similar(newest)
    for k in (0, 51):
        with pytest.raises(BadInput):
            rec.similar("5", k)


def test_the_space_is_computed_once_per_index(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    assert similar_space(snap) is similar_space(dataclasses.replace(snap, version=99))
    other = dataclasses.replace(snap, index=CandidateIndex(snap.index.vectors))
    assert similar_space(other) is not similar_space(snap)
