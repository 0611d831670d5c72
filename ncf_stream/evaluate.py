"""HR@K and NDCG@K on the leave-latest-out hold-out, sampled (99 negatives) and full catalogue.

Both protocols rank each user's held-out item:

* **sampled** (He et al. 2017): among the user's 99 evaluation negatives;
* **full**: among every item the user has not touched.

Ties count against the held-out item (rank = number of candidates scoring at
least as high), so a constant scorer gets HR 0, not a lucky tie-break.
Krichene and Rendle (KDD 2020) show sampled metrics can rank models
differently from full ones, so both are always reported side by side.

Scorers are functions ``(users (n,), items (n, m)) -> scores (n, m)`` over
aligned rows, so any model (NeuMF, EASE, popularity) is evaluated the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ncf_stream.sampler import EVAL_NEGATIVES, eval_negatives
from ncf_stream.store import StoreView

Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
CatalogueScorer = Callable[[np.ndarray], np.ndarray]  # users (n,) -> (n, n_items)
KS = (5, 10, 20)


@dataclass(frozen=True)
class Report:
    kind: str  # "sampled" or "full"
    users: int
    hr: dict[int, float]
    ndcg: dict[int, float]

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.hr:
            out[f"hr{k}"] = self.hr[k]
            out[f"ndcg{k}"] = self.ndcg[k]
        return out


def ranks_against(pos: np.ndarray, neg: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Rank (0 = first) of each positive among its row of negatives; ties count against.

    A non-finite score ranks last, as a tie does: ``neg >= NaN`` is False, so an
    all-NaN model once scored HR@10 = 1.0."""
    pos = np.where(np.isfinite(pos), pos, -np.inf)
    neg = np.where(np.isfinite(neg), neg, -np.inf)
    beats = neg >= pos[:, None]
    if valid is not None:
        beats &= valid
    return beats.sum(axis=1)


def metrics(ranks: np.ndarray, kind: str, ks: Sequence[int] = KS) -> Report:
    n = len(ranks)
    hr, ndcg = {}, {}
    for k in ks:
        hit = ranks < k
        hr[k] = float(hit.mean()) if n else 0.0
        ndcg[k] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean()) if n else 0.0
    return Report(kind, n, hr, ndcg)


def sampled_ranks(scorer: Scorer, view: StoreView, rows: np.ndarray, n_neg: int = EVAL_NEGATIVES,
                  seed: int = 0, chunk: int = 2048,
                  pause: Callable[[], None] | None = None) -> np.ndarray:
    """Ranks of the hold-outs ``view.holdout[rows]`` among their evaluation negatives.

    In chunks of users: memory stays small, and ``pause`` runs between chunks.
    """
    ho = view.holdout
    out = np.empty(len(rows), dtype=np.int64)
    for lo in range(0, len(rows), chunk):
        r = rows[lo: lo + chunk]
        neg = eval_negatives(view, r, n_neg, seed)
        items = np.concatenate([ho.items[r, None], np.maximum(neg, 0)], axis=1)
        scores = scorer(ho.users[r], items)
        out[lo: lo + chunk] = ranks_against(scores[:, 0], scores[:, 1:], valid=neg >= 0)
        if pause is not None:
            pause()
    return out


def full_ranks(scorer: Scorer | CatalogueScorer, view: StoreView, rows: np.ndarray,
               chunk_pairs: int = 4_000_000, catalogue_scorer: bool = False,
               pause: Callable[[], None] | None = None) -> np.ndarray:
    """Ranks of the hold-outs among every item their user has not touched.

    ``catalogue_scorer``: ``scorer(users)`` scores the whole catalogue itself
    (faster for NeuMF); otherwise it gets the catalogue as an item matrix.
    ``pause`` runs between chunks (the evaluator uses it to cap its CPU share).
    """
    ho = view.holdout
    n_items = view.n_items
    out = np.empty(len(rows), dtype=np.int64)
    per_chunk = max(1, chunk_pairs // max(n_items, 1))
    catalogue = np.arange(n_items)
    for lo in range(0, len(rows), per_chunk):
        r = rows[lo: lo + per_chunk]
        users = ho.users[r]
        if catalogue_scorer:
            scores = scorer(users)  # type: ignore[call-arg]
        else:
            scores = scorer(users, np.broadcast_to(catalogue, (len(r), n_items)))  # type: ignore[call-arg]
        pos = scores[np.arange(len(r)), ho.items[r]]
        candidate = np.ones((len(r), n_items), dtype=bool)
        indptr, seen = view.seen_csr(users)
        candidate[np.repeat(np.arange(len(r)), np.diff(indptr)), seen] = False  # holdout too
        out[lo: lo + per_chunk] = ranks_against(pos, scores, valid=candidate)
        if pause is not None:
            pause()
    return out


def evaluate(scorer: Scorer, view: StoreView, rows: np.ndarray | None = None,
             ks: Sequence[int] = KS, seed: int = 0, full: bool = True) -> dict[str, Report]:
    """Both protocols on the given hold-out rows (default: all of them)."""
    if rows is None:
        rows = np.arange(len(view.holdout.users))
    reports = {"sampled": metrics(sampled_ranks(scorer, view, rows, seed=seed), "sampled", ks)}
    if full:
        reports["full"] = metrics(full_ranks(scorer, view, rows), "full", ks)
    return reports
