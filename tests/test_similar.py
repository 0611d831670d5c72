"""Similar items: the exact ranking against an independent brute force (the correlation
over users of the items' linearized logits), the candidate path and its fallback,
and the items never returned."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ncf_stream.errors import BadInput
from ncf_stream.recommend import Recommender, UnknownItem
from ncf_stream.retrieval import CandidateIndex
from ncf_stream.similar import SAMPLE_USERS, candidate_similar, exact_similar, similar_space
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
    rec = Recommender(holder, exact_items=10_000)
    for item in map(str, range(0, 250, 23)):
        row = int(snap.item_rows([item])[0])
        got = rec.similar(item, 10)
        assert got.items == brute_similar(snap, row, 10) and item not in got.items
        assert all(-1 - 1e-5 <= s <= 1 + 1e-5 for s in got.scores)
        assert got.scores == sorted(got.scores, reverse=True)


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
    h = with_(snap, unavailable=hidden)
    for exact_items in (10_000, 0):
        got = Recommender(h, candidates=8, exact_items=exact_items).similar("5", 10)
        assert len(got.items) == 10 and not set(got.items) & set(first[:4])
        assert "5" not in got.items
    got = Recommender(h, exact_items=10_000).similar("5", 10)
    assert got.items == brute_similar(snap, row, 10, hidden)


def test_the_candidate_path_is_exact_when_it_covers_the_catalogue(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    none = np.empty(0, dtype=np.int64)
    for row in (0, 17, 100):
        want = exact_similar(snap, row, none)
        got = candidate_similar(snap, row, 10, snap.index.size, none)
        assert np.array_equal(got[0], want[0]) and np.allclose(got[1], want[1])
        cand = candidate_similar(snap, row, 10, 20, none)  # the index's top 20, rescored
        assert len(cand[0]) == 20 and row not in cand[0]
        exact = dict(zip(want[0].tolist(), want[1].tolist(), strict=True))
        assert np.allclose(cand[1], [exact[r] for r in cand[0].tolist()], atol=1e-6)  # rescored


class FewIndex:
    """An index that finds only its first few items (an IVF probing too few lists)."""

    def __init__(self, index: CandidateIndex, found: int) -> None:
        self.index, self.found = index, found
        self.size, self.vectors = index.size, index.vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(queries, k)
        rows = rows.copy()
        rows[:, self.found:] = -1
        return scores, rows


def test_an_index_that_finds_too_few_falls_back_to_the_exact_ranking(trained) -> None:
    _, holder, _ = trained
    snap = holder.get()
    h = with_(snap, index=FewIndex(snap.index, 3))
    got = Recommender(h, candidates=8, exact_items=0).similar("9", 10)
    assert got.items == brute_similar(snap, int(snap.item_rows(["9"])[0]), 10)


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
