"""Top-k from a snapshot: FAISS candidates, rescored by the full NeuMF, seen items dropped
(or, on request, only trained ones, or none: :data:`ncf_stream.api.Exclude`).

HTTP and gRPC both call this one class. Everything a request reads comes from
the snapshot current when it starts, so an answer never mixes two models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ncf_stream.api import DEFAULT_K, EXCLUDE, Exclude
from ncf_stream.errors import BadInput, NcfStreamError
from ncf_stream.settings import default
from ncf_stream.snapshot import Snapshot, SnapshotHolder


class NotReady(NcfStreamError):
    """No snapshot has been published yet."""


class UnknownUser(NcfStreamError, KeyError):
    """The user has no interactions in the served snapshot."""


@dataclass(frozen=True)
class Recommendation:
    user: str
    items: list[str]
    scores: list[float]  # model probability; popularity share when cold_start
    model_version: int
    cold_start: bool


@dataclass(frozen=True)
class Scores:
    user: str
    scores: list[float | None]  # None: the item is unknown to the model
    model_version: int


class Recommender:
    def __init__(self, holder: SnapshotHolder, candidates: int = default("candidates"),
                 max_k: int = default("max_k"), exact_items: int = default("exact_items"),
                 ) -> None:
        self.holder = holder
        self.candidates = candidates
        self.exact_items = exact_items
        self.max_k = max_k

    def snapshot(self) -> Snapshot:
        snap = self.holder.get()
        if snap is None:
            raise NotReady("no model snapshot is published yet")
        return snap

    def recommend(self, user: str, k: int = DEFAULT_K, exclude: Exclude = "seen") -> Recommendation:
        if not 1 <= k <= self.max_k:
            raise BadInput(f"k must be between 1 and {self.max_k}, got {k}")
        return self.recommend_many([user], k, exclude)[0]

    def recommend_many(self, users: list[str], k: int = DEFAULT_K,
                       exclude: Exclude = "seen") -> list[Recommendation]:
        """Top k for each user, all from the same snapshot."""
        if not 1 <= k <= self.max_k:
            raise BadInput(f"k must be between 1 and {self.max_k}, got {k}")
        snap = self.snapshot()
        out = []
        for user in users:
            row = snap.user_row(user)
            if row is None:
                out.append(self._cold_start(snap, user, k))
                continue
            rows, scores = top_k(snap, row, k, served_candidates(
                snap.n_items, self.candidates, self.exact_items), exclude)
            out.append(Recommendation(user, snap.item_ids.ids(rows).tolist(), scores.tolist(),
                                      snap.version, cold_start=False))
        return out

    def _cold_start(self, snap: Snapshot, user: str, k: int) -> Recommendation:
        rows = snap.popular[:k]
        return Recommendation(user, snap.item_ids.ids(rows).tolist(),
                              snap.popularity[:k].astype(float).tolist(), snap.version,
                              cold_start=True)

    def score(self, user: str, items: list[str]) -> Scores:
        snap = self.snapshot()
        row = snap.user_row(user)
        if row is None:
            raise UnknownUser(f"unknown user {user!r}")
        rows = snap.item_rows(items)
        known = rows >= 0
        out: list[float | None] = [None] * len(items)
        if known.any():
            probs = score_rows(snap, row, rows[known])
            for j, p in zip(np.flatnonzero(known).tolist(), probs.tolist(), strict=True):
                out[j] = p
        return Scores(user, out, snap.version)


def served_candidates(n_items: int, candidates: int, exact_items: int) -> int:
    """How many candidates a request asks for: the whole catalogue (the exact ranking)
    while it has at most ``exact_items`` items, else ``candidates``."""
    return n_items if n_items <= exact_items else candidates


def score_rows(snap: Snapshot, user_row: int, item_rows: np.ndarray) -> np.ndarray:
    """Probabilities of one user against the given item rows."""
    items = torch.from_numpy(np.asarray(item_rows, dtype=np.int64))
    return torch.sigmoid(snap.model.user_logits(user_row, items)).float().cpu().numpy()


def top_k(snap: Snapshot, user_row: int, k: int, candidates: int,
          exclude: Exclude = "seen") -> tuple[np.ndarray, np.ndarray]:
    """(item rows, probabilities) of the user's top k: retrieval, then full rescoring.

    With ``candidates`` >= the catalogue this is the exact ranking.
    """
    cand, probs = candidate_scores(snap, user_row, k, candidates, exclude)
    return best(cand, probs, k)


def best(items: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable of ``items`` (sorted rows), ties broken by row: a partition
    finds the k-th probability, and only what reaches it is sorted."""
    if len(items) > k:
        kth = np.partition(probs, len(probs) - k)[len(probs) - k]
        keep = probs >= kth  # NaN compares False: never kept ahead of a number
        if keep.sum() >= k:
            items, probs = items[keep], probs[keep]
    order = np.argsort(-probs, kind="stable")[:k]
    return items[order], probs[order]


def candidate_scores(snap: Snapshot, user_row: int, k: int, candidates: int,
                     exclude: Exclude = "seen") -> tuple[np.ndarray, np.ndarray]:
    """What :func:`top_k` ranks: the retrieved item rows (sorted, seen ones dropped)
    and their probabilities under the full NeuMF. Asked for the whole catalogue, it
    scores every item without the index (the exact ranking)."""
    seen = excluded_items(snap, user_row, exclude)
    # Ask for room to drop the seen ones, so k survive whenever k unseen items exist.
    want = min(snap.n_items, max(candidates, k) + len(seen))
    if want == snap.n_items:
        return _exact(snap, user_row, seen)
    model = snap.model
    query = model.retrieval_queries(torch.tensor([user_row], device=model.device), snap.a_ref)
    _, found = snap.index.search(query.cpu().numpy(), want)
    # In row order, so ties in score break by row exactly as in exact_top_k.
    cand = np.sort(found[0][found[0] >= 0])
    if len(seen):
        cand = cand[~np.isin(cand, seen, assume_unique=True)]
    if len(cand) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    return cand, score_rows(snap, user_row, cand)


def exact_top_k(snap: Snapshot, user_row: int, k: int,
                exclude: Exclude = "seen") -> tuple[np.ndarray, np.ndarray]:
    """The full model over the whole catalogue: what retrieval is measured against."""
    return best(*_exact(snap, user_row, excluded_items(snap, user_row, exclude)), k)


def _exact(snap: Snapshot, user_row: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every item row but the excluded ones, and its probability."""
    probs = torch.sigmoid(snap.model.user_logits(user_row)).float().cpu().numpy()
    eligible = np.ones(len(probs), dtype=bool)
    eligible[excluded] = False
    items = np.flatnonzero(eligible)
    return items, probs[items]


def excluded_items(snap: Snapshot, user_row: int, exclude: Exclude) -> np.ndarray:
    """The item rows a request leaves out, sorted (see :data:`Exclude`)."""
    if exclude == "none":
        return np.empty(0, dtype=np.int64)
    seen = snap.store.seen(user_row)
    if exclude == "seen":
        return seen
    if exclude != "trained":
        raise BadInput(f"exclude must be one of {', '.join(EXCLUDE)}, got {exclude!r}")
    ho = snap.store.holdout  # users sorted: rows of users with a hold-out
    at = int(np.searchsorted(ho.users, user_row))
    if at < len(ho.users) and ho.users[at] == user_row:
        return seen[seen != ho.items[at]]
    return seen
