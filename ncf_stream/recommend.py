"""Top-k from a snapshot: FAISS candidates, rescored by the full NeuMF, seen items dropped
(or, on request, only trained ones, or none: :data:`ncf_stream.api.Exclude`).

Items marked unavailable are never recommended, and a request may narrow the
answer further (:class:`Filters`): items to leave out, or a list to rank within.
Neither costs k: what they hide widens the candidate request, and when the index
still finds fewer than k eligible items the whole catalogue is ranked instead.

HTTP and gRPC both call this one class. Everything a request reads comes from
the snapshot current when it starts, so an answer never mixes two models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ncf_stream.anonymous import AnonymousConfig, AnonymousUser, fit_row, negative_cdf
from ncf_stream.api import (
    DEFAULT_K,
    DEFAULT_PAGE,
    EXCLUDE,
    MAX_ANONYMOUS_ITEMS,
    Exclude,
    check_page,
)
from ncf_stream.errors import BadInput, NcfStreamError
from ncf_stream.ranking import best
from ncf_stream.settings import Settings, default
from ncf_stream.similar import top_similar
from ncf_stream.snapshot import POPULAR_KEPT, Snapshot, SnapshotHolder

_NO_ROWS = np.empty(0, dtype=np.int64)
# Whom a ranking is for: a user's row in the snapshot, or an anonymous request's fitted row.
User = int | AnonymousUser


class NotReady(NcfStreamError):
    """No snapshot has been published yet."""


class UnknownUser(NcfStreamError, KeyError):
    """The user has no interactions in the served snapshot."""


class UnknownItem(NcfStreamError, KeyError):
    """The item is not in the served snapshot (or not yet in its index)."""


@dataclass(frozen=True)
class Recommendation:
    user: str
    items: list[str]
    scores: list[float]  # model probability; popularity share when cold_start
    model_version: int
    cold_start: bool
    anonymous: bool = False  # ranked for the request's items, not a user (user is "")


@dataclass(frozen=True)
class Filters:
    """What a request narrows its answer to, beyond its ``exclude``. Ids the snapshot
    does not know are ignored: they cannot be recommended either way."""

    exclude_items: tuple[str, ...] = ()  # never recommend these
    include_only: tuple[str, ...] | None = None  # rank these only; None: the catalogue


NO_FILTERS = Filters()


@dataclass(frozen=True)
class Similar:
    item: str
    items: list[str]  # most similar first; never the item itself or an unavailable one
    scores: list[float]  # the similarity, in [-1, 1] (ncf_stream.similar)
    model_version: int


@dataclass(frozen=True)
class Popular:
    items: list[str]  # most interacted-with first, unavailable ones left out
    counts: list[int]  # interaction events in the window
    window_s: float
    model_version: int


@dataclass(frozen=True)
class KnownItems:
    user: str
    items: list[str]  # this page of the user's items, newest first
    ts: list[float]  # each one's last event time
    total: int  # the user's items in all pages
    model_version: int


@dataclass(frozen=True)
class Scores:
    user: str
    scores: list[float | None]  # None: the item is unknown to the model
    model_version: int


class Serving(Protocol):
    """What the HTTP and gRPC servers call: a :class:`Recommender`, or a replica's router
    in front of one per trainer of a group (:mod:`ncf_stream.routing`)."""

    @property
    def max_k(self) -> int: ...

    def ready(self) -> Snapshot | None: ...

    def recommend(self, user: str, k: int = DEFAULT_K, exclude: Exclude = "seen",
                  filters: Filters = NO_FILTERS) -> Recommendation: ...

    def recommend_many(self, users: list[str], k: int = DEFAULT_K, exclude: Exclude = "seen",
                       filters: Filters = NO_FILTERS) -> list[Recommendation]: ...

    def recommend_items(self, items: list[str], k: int = DEFAULT_K, exclude: Exclude = "seen",
                        filters: Filters = NO_FILTERS) -> Recommendation: ...

    def similar(self, item: str, k: int = DEFAULT_K) -> Similar: ...

    def popular(self, k: int = DEFAULT_K) -> Popular: ...

    def known_items(self, user: str, offset: int = 0,
                    limit: int = DEFAULT_PAGE) -> KnownItems: ...

    def score(self, user: str, items: list[str]) -> Scores: ...


class Recommender:
    def __init__(self, holder: SnapshotHolder, candidates: int = default("candidates"),
                 max_k: int = default("max_k"), exact_items: int = default("exact_items"),
                 anonymous: AnonymousConfig | None = None) -> None:
        self.holder = holder
        self.candidates = candidates
        self.exact_items = exact_items
        self.max_k = max_k
        self.anonymous = anonymous or AnonymousConfig()
        # (snapshot version, its negatives' draw weights): computed once per snapshot
        # (O(items)), not per anonymous request. One tuple, swapped whole: no lock.
        self._negatives: tuple[int, np.ndarray | None] = (0, None)

    @classmethod
    def from_settings(cls, holder: SnapshotHolder, s: Settings) -> Recommender:
        """The trainer's and a replica's: the same settings give the same answers."""
        return cls(holder, s.candidates, s.max_k, s.exact_items, AnonymousConfig.from_settings(s))

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.max_k:
            raise BadInput(f"k must be between 1 and {self.max_k}, got {k}")

    def ready(self) -> Snapshot | None:
        """The snapshot requests are answered from; None before the first (/readyz)."""
        return self.holder.get()

    def snapshot(self) -> Snapshot:
        snap = self.holder.get()
        if snap is None:
            raise NotReady("no model snapshot is published yet")
        return snap

    def recommend(self, user: str, k: int = DEFAULT_K, exclude: Exclude = "seen",
                  filters: Filters = NO_FILTERS) -> Recommendation:
        return self.recommend_many([user], k, exclude, filters)[0]

    def recommend_many(self, users: list[str], k: int = DEFAULT_K, exclude: Exclude = "seen",
                       filters: Filters = NO_FILTERS) -> list[Recommendation]:
        """Top k for each user, all from the same snapshot."""
        self._check_k(k)
        snap = self.snapshot()
        narrow = _Narrowing.of(snap, filters)
        out = []
        for user in users:
            row = snap.user_row(user)
            if row is None:
                out.append(self._cold_start(snap, user, k, narrow))
                continue
            out.append(self._ranked(snap, user, row, k, exclude, narrow))
        return out

    def recommend_items(self, items: list[str], k: int = DEFAULT_K, exclude: Exclude = "seen",
                        filters: Filters = NO_FILTERS) -> Recommendation:
        """Top k for someone known only by ``items`` (oldest first): ranked for a row fitted
        to them on the spot and never stored (:mod:`ncf_stream.anonymous`). ``exclude``
        "seen" (and "trained": there is no hold-out) leaves the given items out. Ids the
        snapshot does not know are ignored; with none known, the answer is a cold start."""
        self._check_k(k)
        if not 1 <= len(items) <= MAX_ANONYMOUS_ITEMS:
            raise BadInput(f"'items' must hold 1 to {MAX_ANONYMOUS_ITEMS} ids")
        if exclude not in EXCLUDE:
            raise BadInput(f"exclude must be one of {', '.join(EXCLUDE)}, got {exclude!r}")
        snap = self.snapshot()
        narrow = _Narrowing.of(snap, filters)
        rows = snap.item_rows(items)
        rows = rows[rows >= 0]
        if not len(rows):
            return self._cold_start(snap, "", k, narrow, anonymous=True)
        user = fit_row(snap.model, rows, self.anonymous, self._negative_cdf(snap))
        return self._ranked(snap, "", user, k, exclude, narrow)

    def _negative_cdf(self, snap: Snapshot) -> np.ndarray | None:
        version, cdf = self._negatives
        if version != snap.version:
            cdf = negative_cdf(snap.store.item_counts, snap.n_items, self.anonymous.alpha)
            self._negatives = (snap.version, cdf)
        return cdf

    def _ranked(self, snap: Snapshot, name: str, user: User, k: int, exclude: Exclude,
                narrow: _Narrowing) -> Recommendation:
        if narrow.include is not None:
            rows, scores = top_k_within(snap, user, k, narrow.include, exclude, narrow.hidden)
        else:
            rows, scores = top_k(snap, user, k, served_candidates(
                snap.n_items, self.candidates, self.exact_items), exclude, narrow.hidden)
        names, scores = named(snap, rows, scores)
        return Recommendation(name, names, scores.tolist(), snap.version, cold_start=False,
                              anonymous=isinstance(user, AnonymousUser))

    def _cold_start(self, snap: Snapshot, user: str, k: int, narrow: _Narrowing,
                    anonymous: bool = False) -> Recommendation:
        rows, share = popular_rows(snap, k, narrow.banned, narrow.include)
        names, share = named(snap, rows, share)
        return Recommendation(user, names, share.astype(float).tolist(), snap.version,
                              cold_start=True, anonymous=anonymous)

    def similar(self, item: str, k: int = DEFAULT_K) -> Similar:
        """The k items the model scores most alike to ``item`` across its users."""
        self._check_k(k)
        snap = self.snapshot()
        row = int(snap.item_rows([item])[0])
        if row < 0:
            raise UnknownItem(f"unknown item {item!r}")
        if row >= snap.index.size:  # an IVF index lags the weights by up to one refresh
            raise UnknownItem(f"item {item!r} is not in the candidate index yet")
        rows, sims = top_similar(snap, row, k, snap.unavailable)
        names, sims = named(snap, rows, sims)
        return Similar(item, names, sims.astype(float).tolist(), snap.version)

    def popular(self, k: int = DEFAULT_K) -> Popular:
        """The k items with the most interaction events over the recent window (fewer when
        fewer had any), counted per snapshot."""
        self._check_k(k)
        snap = self.snapshot()
        names, counts = named(snap, snap.recent[:k], snap.recent_counts[:k])
        return Popular(names, counts.tolist(), snap.popular_window_s, snap.version)

    def known_items(self, user: str, offset: int = 0, limit: int = DEFAULT_PAGE) -> KnownItems:
        """One page of the items the user has interacted with, newest first."""
        offset, limit = check_page(offset, limit)
        snap = self.snapshot()
        row = snap.user_row(user)
        if row is None:
            raise UnknownUser(f"unknown user {user!r}")
        rows, ts = snap.store.newest_first(row)
        page = slice(offset, offset + limit)
        names, ts = named(snap, rows[page], ts[page])
        return KnownItems(user, names, ts.tolist(), len(rows), snap.version)

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


@dataclass(frozen=True)
class _Narrowing:
    """A request's filters as item rows of one snapshot."""

    banned: np.ndarray  # exclude_items
    include: np.ndarray | None  # include_only; None: the catalogue
    hidden: np.ndarray  # banned and unavailable

    @classmethod
    def of(cls, snap: Snapshot, filters: Filters) -> _Narrowing:
        banned = known_rows(snap, filters.exclude_items)
        include = (None if filters.include_only is None
                   else known_rows(snap, filters.include_only))
        return cls(banned, include, hidden_rows(snap, banned))


def named(snap: Snapshot, rows: np.ndarray, values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The ids of ``rows`` and their ``values``, less the items deleted since the snapshot
    was taken: its id maps are the live ones (copying them per snapshot would cost a
    pointer per id), and a deleted item's id is gone from them at once, while its row
    leaves the snapshot's answers only with the next one."""
    names = snap.item_ids.ids(rows).tolist()
    if None not in names:  # a scan in C: the request path pays nothing more without deletions
        return names, np.asarray(values)
    keep = np.array([name is not None for name in names], dtype=bool)
    return [name for name in names if name is not None], np.asarray(values)[keep]


def known_rows(snap: Snapshot, ids: tuple[str, ...]) -> np.ndarray:
    """Sorted distinct rows of the ids the snapshot knows (the others are dropped)."""
    if not ids:
        return _NO_ROWS
    rows = snap.item_rows(list(ids))
    return np.unique(rows[rows >= 0])


def hidden_rows(snap: Snapshot, banned: np.ndarray) -> np.ndarray:
    """What no answer from this snapshot may hold: the unavailable items and ``banned``."""
    if not len(banned):
        return snap.unavailable
    return np.union1d(snap.unavailable, banned) if len(snap.unavailable) else banned


def popular_rows(snap: Snapshot, k: int, banned: np.ndarray,
                 include: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The k most popular eligible items (a cold start) and their share of all
    interactions: from the snapshot's list of the most popular, unless the request
    narrows it below k; then from every item's count."""
    if include is None:
        keep = ~np.isin(snap.popular, banned) if len(banned) else slice(None)
        rows, share = snap.popular[keep], snap.popularity[keep]
        # The list holds every available item when it is shorter than its cap.
        if len(rows) >= k or len(snap.popular) < POPULAR_KEPT:
            return rows[:k], share[:k]
        include = np.arange(snap.n_items)
    rows = np.setdiff1d(include, hidden_rows(snap, banned), assume_unique=True)
    counts = snap.store.item_counts
    rows = rows[rows < len(counts)]  # an item newer than the store view has no count
    rows = rows[np.argsort(-counts[rows], kind="stable")[:k]]
    return rows, counts[rows] / max(int(counts.sum()), 1)


def served_candidates(n_items: int, candidates: int, exact_items: int) -> int:
    """How many candidates a request asks for: the whole catalogue (the exact ranking)
    while it has at most ``exact_items`` items, else ``candidates``."""
    return n_items if n_items <= exact_items else candidates


def score_rows(snap: Snapshot, user_row: User, item_rows: np.ndarray) -> np.ndarray:
    """Probabilities of one user (or fitted row) against the given item rows."""
    items = torch.from_numpy(np.asarray(item_rows, dtype=np.int64))
    return torch.sigmoid(logits_of(snap, user_row, items)).float().cpu().numpy()


@torch.no_grad()
def logits_of(snap: Snapshot, user: User, items: torch.Tensor | None = None) -> torch.Tensor:
    """The full model's logits of a user or a fitted row against item rows (default:
    the catalogue)."""
    if isinstance(user, AnonymousUser):
        return snap.model.row_logits(user.row, items)
    return snap.model.user_logits(user, items)


def retrieval_query(snap: Snapshot, user: User) -> np.ndarray:
    """(1, d) the index query of a user or a fitted row."""
    model = snap.model
    if isinstance(user, AnonymousUser):
        query = model.row_queries(user.row[None], snap.a_ref)
    else:
        query = model.retrieval_queries(torch.tensor([user], device=model.device), snap.a_ref)
    return query.cpu().numpy()


def top_k(snap: Snapshot, user_row: User, k: int, candidates: int,
          exclude: Exclude = "seen", hidden: np.ndarray = _NO_ROWS,
          ) -> tuple[np.ndarray, np.ndarray]:
    """(item rows, probabilities) of the user's top k: retrieval, then full rescoring.

    With ``candidates`` >= the catalogue this is the exact ranking. ``hidden``: sorted
    item rows to leave out as well (:func:`hidden_rows`).
    """
    cand, probs = candidate_scores(snap, user_row, k, candidates, exclude, hidden)
    return best(cand, probs, k)


def top_k_within(snap: Snapshot, user_row: User, k: int, items: np.ndarray,
                 exclude: Exclude = "seen", hidden: np.ndarray = _NO_ROWS,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The user's top k among ``items`` (sorted distinct rows), each scored by the full
    NeuMF: the exact ranking restricted to them (a request's ``include_only``)."""
    drop = excluded_items(snap, user_row, exclude)
    if len(hidden):
        drop = np.union1d(drop, hidden)
    rows = np.setdiff1d(items, drop, assume_unique=True)
    if not len(rows):
        return rows, np.empty(0, dtype=np.float32)
    return best(rows, score_rows(snap, user_row, rows), k)


def candidate_scores(snap: Snapshot, user_row: User, k: int, candidates: int,
                     exclude: Exclude = "seen", hidden: np.ndarray = _NO_ROWS,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`top_k` ranks: the retrieved item rows (sorted, seen and ``hidden``
    ones dropped) and their probabilities under the full NeuMF. Asked for the whole
    catalogue, it scores every item without the index (the exact ranking); so it does
    when the index finds fewer than k eligible items while the catalogue has them."""
    seen = excluded_items(snap, user_row, exclude)
    # Ask for room to drop the seen ones, so k survive whenever k unseen items exist.
    want = min(snap.n_items, max(candidates, k) + len(seen))
    ask = want
    if len(hidden):  # room for those too; rescored below are at most `want`, as without
        seen, ask = np.union1d(seen, hidden), min(snap.n_items, want + len(hidden))
    if ask == snap.n_items:
        return _exact(snap, user_row, seen)
    _, found = snap.index.search(retrieval_query(snap, user_row), ask)
    cand = found[0][found[0] >= 0]  # best first by the index
    if len(seen):
        cand = cand[~np.isin(cand, seen, assume_unique=True)][:want]
    if len(cand) < k and len(cand) < snap.n_items - len(seen):
        # An IVF index probes a few lists and may find too few: rank the catalogue.
        return _exact(snap, user_row, seen)
    if len(cand) == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    # In row order, so ties in score break by row exactly as in exact_top_k.
    cand = np.sort(cand)
    return cand, score_rows(snap, user_row, cand)


def exact_top_k(snap: Snapshot, user_row: User, k: int,
                exclude: Exclude = "seen") -> tuple[np.ndarray, np.ndarray]:
    """The full model over the whole catalogue: what retrieval is measured against."""
    return best(*_exact(snap, user_row, excluded_items(snap, user_row, exclude)), k)


def _exact(snap: Snapshot, user_row: User, excluded: np.ndarray,
           ) -> tuple[np.ndarray, np.ndarray]:
    """Every item row but the excluded ones, and its probability."""
    probs = torch.sigmoid(logits_of(snap, user_row)).float().cpu().numpy()
    eligible = np.ones(len(probs), dtype=bool)
    eligible[excluded] = False
    items = np.flatnonzero(eligible)
    return items, probs[items]


def excluded_items(snap: Snapshot, user_row: User, exclude: Exclude) -> np.ndarray:
    """The item rows a request leaves out, sorted (see :data:`Exclude`). For a fitted
    row, "seen" and "trained" are the items it was fitted to (it has no hold-out)."""
    if exclude not in EXCLUDE:
        raise BadInput(f"exclude must be one of {', '.join(EXCLUDE)}, got {exclude!r}")
    if exclude == "none":
        return np.empty(0, dtype=np.int64)
    if isinstance(user_row, AnonymousUser):
        return user_row.items
    seen = snap.store.seen(user_row)
    if exclude == "seen":
        return seen
    ho = snap.store.holdout  # users sorted: rows of users with a hold-out
    at = int(np.searchsorted(ho.users, user_row))
    if at < len(ho.users) and ho.users[at] == user_row:
        return seen[seen != ho.items[at]]
    return seen
