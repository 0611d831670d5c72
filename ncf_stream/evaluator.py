"""Continuous evaluation on published snapshots, and the online (prequential) hit rate.

The periodic evaluator ranks the current hold-out of every user, or a seeded
sample of at most ``max_users``, by both protocols of :mod:`ncf_stream.evaluate`
for K in (5, 10, 20). It runs off the training thread on the latest snapshot
and caps its own CPU share (``duty``): after each chunk of work it sleeps in
proportion, so on a machine the trainer already saturates, ingest keeps >= 90%
of its rate during an evaluation. The price is wall time, not training.

The first evaluation is a quick one: the thread watches the holder, and as
soon as a snapshot with a hold-out appears it ranks ``first_users`` (200) of
them, with small full-catalogue and recall budgets (``first_max_pairs``), so a
first HR@10 shows within seconds of start instead of after ``interval_s`` and a
full-size evaluation. Then the regular cadence: every ``interval_s``, full budget.

Each evaluation also measures the candidate recall: for the users of its
first hold-outs (``recall_users``, 50), recall@10 of the served top 10
(retrieval, then rescoring) against the exact top 10 of the same snapshot
(:func:`candidate_recall`); the full protocol has scored their catalogue already.

The online hit rate asks, for a sampled fraction of incoming events, before
the model trains on them: was the event's item in the user's top K as served
right then? That is what a live system experiences.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ncf_stream.evaluate import KS, CatalogueScorer, Report, full_ranks, metrics, sampled_ranks
from ncf_stream.recommend import (
    candidate_scores,
    excluded_items,
    score_rows,
    served_candidates,
    top_k,
)
from ncf_stream.sampler import EVAL_NEGATIVES
from ncf_stream.settings import Settings, check_config, config_values, setting
from ncf_stream.snapshot import Snapshot, SnapshotHolder
from ncf_stream.threads import (
    BackgroundPolicy,
    background_thread,
    reader_thread,
    release_free_memory,
)

log = logging.getLogger(__name__)

RECALL_K = 10  # candidate recall is recall@10: what a default request gets
HOLDOUT_POLL_S = 0.2  # how often the thread looks for the first snapshot with a hold-out
# Candidate recall's shortlist margin, in probability: score_matrix and the forward pass
# differ by <= 1.2e-7 (measured, 250 and 5k items), so this is ~400x the need.
SHORTLIST_TOL = 1e-4


@dataclass(frozen=True)
class EvalConfig:
    """The shared fields are the ``eval_*`` settings, and ``seed`` (ncf_stream.settings:
    defaults, bounds and why)."""

    interval_s: float = setting("eval_interval_s")
    max_users: int = setting("eval_max_users")
    negatives: int = EVAL_NEGATIVES
    seed: int = setting("seed")
    full: bool = setting("eval_full")
    full_max_pairs: int = setting("eval_full_max_pairs")
    duty: float = setting("eval_duty")
    candidates: int = setting("candidates")  # as served: candidate recall measures these
    exact_items: int = setting("exact_items")
    history: int = 100  # reports kept for GET /v1/eval
    # The quick first evaluation: this many hold-outs (at most max_users), and at most
    # this many (user, item) pairs for each of the full-catalogue ranking and the exact
    # side of candidate recall: 10 users each at 100k items. bench/first_eval.py, 100k
    # items, training alongside: ~0.15-0.5 s of one core, 3-10 s of wall time at
    # eval_duty 0.05, against the 30 s a first HR@10 may take.
    first_users: int = 200
    first_max_pairs: int = 1_000_000
    # Candidate recall: users sampled, and the exact side's budget in (user, item) pairs
    # (100k items: 50 users; 1M items: 10).
    recall_users: int = 50
    recall_max_pairs: int = 10_000_000
    # The periodic thread's CPU policy (threads.background_thread): an evaluation is
    # background work, and at normal priority its chunks took turns with requests.
    # None leaves the thread as it is (the daemon passes background_policy).
    background: BackgroundPolicy | None = None

    def __post_init__(self) -> None:
        check_config(self)

    @classmethod
    def from_settings(cls, s: Settings) -> EvalConfig:
        return cls(**config_values(cls, s), background=s.background_policy)


@dataclass(frozen=True)
class EvalReport:
    version: int  # snapshot evaluated
    finished_at: float
    users: int  # hold-outs ranked by the sampled protocol
    users_full: int  # hold-outs ranked against the full catalogue
    seconds: float  # wall time, throttling included
    compute_seconds: float
    sampled: Report
    full: Report | None
    quick: bool = False  # the first evaluation, on a small budget
    candidate_recall: float | None = None  # recall@10 of the served top 10; None: no users
    recall_users: int = 0  # users it was measured on

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "model_version": self.version, "finished_at": self.finished_at, "quick": self.quick,
            "users": self.users, "users_full": self.users_full,
            "seconds": round(self.seconds, 3), "compute_seconds": round(self.compute_seconds, 3),
            "sampled": _rounded(self.sampled.as_dict())}
        if self.full is not None:
            out["full"] = _rounded(self.full.as_dict())
        out["candidate_recall"] = (None if self.candidate_recall is None
                                   else round(self.candidate_recall, 5))
        out["recall_users"] = self.recall_users
        return out


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in d.items()}


def snapshot_scorer(snap: Snapshot) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    model = snap.model

    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        n, m = items.shape
        with torch.no_grad():
            u = torch.from_numpy(np.repeat(users, m)).to(model.device)
            i = torch.from_numpy(np.ascontiguousarray(items).ravel()).to(model.device)
            return model(u, i).float().cpu().numpy().reshape(n, m)

    return score


def catalogue_scorer(snap: Snapshot) -> Callable[[np.ndarray], np.ndarray]:
    model = snap.model

    def score(users: np.ndarray) -> np.ndarray:
        u = torch.from_numpy(np.asarray(users, dtype=np.int64))
        return model.score_matrix(u).float().cpu().numpy()

    return score


def candidate_recall(snap: Snapshot, users: np.ndarray, candidates: int, k: int = RECALL_K,
                     pause: Callable[[], None] | None = None, chunk_pairs: int = 4_000_000,
                     logits: Mapping[int, np.ndarray] | None = None) -> float | None:
    """Recall@k of the served top k against the exact top k, pooled over ``users`` (rows).

    Served: what :func:`~ncf_stream.recommend.top_k` returns (``candidates`` from
    the index, rescored by the full NeuMF, seen items dropped). Exact: the full
    NeuMF over every item the user has not seen, ranked as ``top_k`` ranks (the
    same probabilities, ties by row). The catalogue is scored by
    ``NeuMF.score_matrix`` (equal to the forward pass up to rounding, and several
    times faster); the items within ``SHORTLIST_TOL`` of its top 2k are then ranked
    by the probabilities the request path computes (the served ones reused, the
    others scored the same way), so rounding never decides a membership and with
    ``candidates`` >= the catalogue the recall is exactly 1.0. ``logits``: users'
    catalogue logits already computed (the full protocol's), used instead.

    A non-finite score never counts: the exact list is the top k of the finite
    scores, a served item with a non-finite score is never a hit, and each user
    still asks for min(k, unseen items) (a model scoring NaN everywhere has recall
    0). None when no user has an unseen item.
    """
    hits = wanted = 0
    known = logits or {}
    per_chunk = max(1, chunk_pairs // max(snap.n_items, 1))
    for lo in range(0, len(users), per_chunk):
        block = users[lo: lo + per_chunk].tolist()
        missing = [u for u in block if u not in known]
        scored = dict(zip(missing, catalogue_scorer(snap)(np.array(missing, dtype=np.int64)),
                          strict=True)) if missing else {}
        for user in block:
            logit = known[user] if user in known else scored[user]
            row = torch.sigmoid(torch.from_numpy(logit)).numpy()
            seen = excluded_items(snap, user, "seen")
            cand, probs = candidate_scores(snap, user, k, candidates)
            order = np.argsort(-probs, kind="stable")[:k]  # top_k's answer
            served = cand[order][np.isfinite(probs[order])]
            exact = _exact_top(snap, user, row, seen, cand, probs, k)
            hits += len(np.intersect1d(served, exact, assume_unique=True))
            wanted += min(k, snap.n_items - len(seen))
            if pause is not None:
                pause()
    return hits / wanted if wanted else None


def _exact_top(snap: Snapshot, user: int, approx: np.ndarray, seen: np.ndarray,
               cand: np.ndarray, cand_probs: np.ndarray, k: int) -> np.ndarray:
    """The top k unseen items of ``user`` by the request path's probabilities, finite only.

    ``approx``: every item's probability from score_matrix. An item outside the
    shortlist (within SHORTLIST_TOL of the 2k-th best approx) has 2k items scoring
    strictly higher under the forward pass too, while the two differ by less than
    SHORTLIST_TOL / 2, so it cannot be in the top k whatever the tie-break.
    Non-finite approx scores are rescored too, so the shortlist never drops what
    the forward pass would keep.
    """
    approx = approx.copy()
    approx[seen] = -np.inf
    finite = np.isfinite(approx)
    keep = ~finite
    keep[seen] = False
    n_finite = int(finite.sum())
    m = 2 * k
    if n_finite > m:
        bar = np.partition(approx[finite], n_finite - m)[n_finite - m]
        keep |= finite & (approx >= bar - SHORTLIST_TOL)
    else:
        keep |= finite
    short = np.flatnonzero(keep)  # sorted rows: ties then break by row, as in top_k
    probs = np.empty(len(short), dtype=np.float32)
    at = np.searchsorted(cand, short)
    found = (at < len(cand)) & (cand[np.minimum(at, len(cand) - 1)] == short) if len(cand) \
        else np.zeros(len(short), dtype=bool)
    probs[found] = cand_probs[at[found]]  # the served numbers, so both sides rank alike
    if (~found).any():
        probs[~found] = score_rows(snap, user, short[~found])
    ok = np.isfinite(probs)
    return short[ok][np.argsort(-probs[ok], kind="stable")[:k]]


class Cancelled(Exception):
    """The evaluator was stopped in the middle of an evaluation."""


class Throttle:
    """Sleeps after each piece of work so that work takes at most ``duty`` of wall time;
    raises :class:`Cancelled` once ``stop`` is set."""

    def __init__(self, duty: float, stop: threading.Event | None = None) -> None:
        self.duty = min(max(duty, 0.01), 1.0)
        self.stop = stop
        self.busy = 0.0
        self._mark = time.perf_counter()

    def __call__(self) -> None:
        worked = time.perf_counter() - self._mark
        self.busy += worked
        rest = worked * (1.0 / self.duty - 1.0)
        if self.stop is not None:
            if self.stop.wait(rest):
                raise Cancelled
        elif rest > 0:
            time.sleep(rest)
        self._mark = time.perf_counter()


class Evaluator:
    def __init__(self, holder: SnapshotHolder, config: EvalConfig | None = None,
                 on_report: Callable[[EvalReport], None] | None = None) -> None:
        self.holder = holder
        self.config = config or EvalConfig()
        self.on_report = on_report
        self.history: deque[EvalReport] = deque(maxlen=self.config.history)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> EvalReport | None:
        return self.history[-1] if self.history else None

    def evaluate(self, snap: Snapshot | None = None, throttle: bool = False,
                 quick: bool = False) -> EvalReport | None:
        """One evaluation of ``snap`` (default: the current snapshot); None before any.

        ``quick``: the first evaluation's budget (``first_users``, ``first_max_pairs``).
        """
        snap = snap or self.holder.get()
        if snap is None or len(snap.store.holdout.users) == 0:
            return None
        cfg = self.config
        start = time.perf_counter()
        pause = Throttle(cfg.duty, self._stop) if throttle else None
        rows = self._rows(snap, quick)
        sampled = metrics(sampled_ranks(snapshot_scorer(snap), snap.store, rows, cfg.negatives,
                                        cfg.seed, pause=pause), "sampled", KS)
        full, n_full = None, 0
        kept: dict[int, np.ndarray] = {}  # catalogue logits of the recall users, on the way
        if cfg.full:
            n_full = min(len(rows), _fit(self._budget(cfg.full_max_pairs, quick), snap.n_items))
            scorer = _keeping(catalogue_scorer(snap), self.recall_rows(snap, quick, rows), kept)
            ranks = full_ranks(scorer, snap.store, rows[:n_full], catalogue_scorer=True,
                               pause=pause)
            full = metrics(ranks, "full", KS)
        users = self.recall_rows(snap, quick, rows)
        recall = candidate_recall(
            snap, users, served_candidates(snap.n_items, cfg.candidates, cfg.exact_items),
            pause=pause, logits=kept)
        seconds = time.perf_counter() - start
        report = EvalReport(snap.version, time.time(), len(rows), n_full, seconds,
                            pause.busy if pause is not None else seconds, sampled, full,
                            quick=quick, candidate_recall=recall, recall_users=len(users))
        self.history.append(report)
        log.info("eval v%d%s: %d users, HR@10 sampled %.4f full %s, candidate recall@10 %s, "
                 "%.1f s", snap.version, " (quick)" if quick else "", len(rows),
                 sampled.hr[10], "-" if full is None else f"{full.hr[10]:.4f}",
                 "-" if recall is None else f"{recall:.3f}", seconds)
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _budget(self, pairs: int, quick: bool) -> int:
        return min(pairs, self.config.first_max_pairs) if quick else pairs

    def _rows(self, snap: Snapshot, quick: bool = False) -> np.ndarray:
        n = len(snap.store.holdout.users)
        limit = self.config.max_users or n
        if quick:
            limit = min(limit, self.config.first_users)
        # Seeded, so successive evaluations rank the same users while their hold-outs
        # stay; in random order, so any prefix (the full protocol's, the quick
        # evaluation's) is a fair sample.
        return np.random.default_rng(self.config.seed).permutation(n)[:limit]

    def recall_rows(self, snap: Snapshot, quick: bool = False,
                    rows: np.ndarray | None = None) -> np.ndarray:
        """The user rows candidate recall is measured on: the users of the first hold-outs
        of the evaluation's seeded sample ``rows``, the first the full protocol ranks, so
        their catalogue scores are computed once for both."""
        cfg = self.config
        rows = self._rows(snap, quick) if rows is None else rows
        n = min(len(rows), cfg.recall_users,
                _fit(self._budget(cfg.recall_max_pairs, quick), snap.n_items))
        return snap.store.holdout.users[rows[:n]]

    # ---- the periodic thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ncf-evaluator", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Evaluate as soon as possible (on demand)."""
        self._wake.set()

    def _run(self) -> None:
        reader_thread()
        if self.config.background:
            background_thread(self.config.background)
        first = self._first_snapshot()
        if first is None or not self._run_one(first, quick=True):
            return
        while not self._stop.is_set():
            self._wake.wait(self.config.interval_s)
            self._wake.clear()
            if self._stop.is_set() or not self._run_one(None):
                return

    def _first_snapshot(self) -> Snapshot | None:
        """Wait for the first snapshot with a hold-out (None: stopped meanwhile)."""
        while not self._stop.is_set():
            snap = self.holder.get()
            if snap is not None and len(snap.store.holdout.users):
                return snap
            self._stop.wait(HOLDOUT_POLL_S)
        return None

    def _run_one(self, snap: Snapshot | None, quick: bool = False) -> bool:
        """One throttled evaluation on this thread; False once stopped."""
        try:
            self.evaluate(snap, throttle=True, quick=quick)
        except Cancelled:
            return False
        except Exception:  # an evaluation must never take the daemon down
            log.exception("evaluation failed")
        finally:
            release_free_memory()
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _keeping(scorer: CatalogueScorer, users: np.ndarray,
             kept: dict[int, np.ndarray]) -> CatalogueScorer:
    """``scorer``, keeping in ``kept`` the rows of ``users`` it scores along the way."""
    wanted = set(users.tolist())

    def score(block: np.ndarray) -> np.ndarray:
        out = scorer(block)
        for j, user in enumerate(np.asarray(block).tolist()):
            if user in wanted:
                kept[user] = out[j].copy()
        return out

    return score


def _fit(pairs: int, n_items: int) -> int:
    """Users whose full-catalogue scoring fits ``pairs`` (at least one)."""
    return max(1, pairs // max(n_items, 1))


@dataclass
class OnlineHitRate:
    """Prequential HR@K: was the item in the user's served top K before training on it?"""

    fraction: float = setting("online_fraction")
    max_per_second: float = 50.0  # each probe is a retrieval; cap their cost at full ingest
    candidates: int = setting("candidates")
    exact_items: int = setting("exact_items")
    seed: int = setting("seed")
    hits: dict[int, int] = field(default_factory=lambda: dict.fromkeys(KS, 0))
    probes: int = 0
    _rng: np.random.Generator = field(init=False)
    _budget: float = field(init=False, default=0.0)
    _last: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        check_config(self)
        self._rng = np.random.default_rng(self.seed)
        self._last = time.monotonic()

    def observe(self, snap: Snapshot | None, users: np.ndarray, items: np.ndarray) -> None:
        """Probe a sample of a batch of events, as (user rows, item rows) of the live
        maps, against the served snapshot."""
        if snap is None or len(users) == 0:
            return
        now = time.monotonic()
        self._budget = min(self.max_per_second, self._budget + (now - self._last)
                           * self.max_per_second)
        self._last = now
        picked = np.flatnonzero(self._rng.random(len(users)) < self.fraction)
        for j in picked[: int(self._budget)].tolist():
            self._budget -= 1
            self._probe(snap, int(users[j]), int(items[j]))

    def _probe(self, snap: Snapshot, user: int, item: int) -> None:
        kmax = max(KS)
        if user >= snap.n_users:  # new since the snapshot: served as cold start
            served = snap.popular[:kmax]
        else:
            served, _ = top_k(snap, user, kmax, served_candidates(  # as served: available only
                snap.n_items, self.candidates, self.exact_items), hidden=snap.unavailable)
        self.probes += 1
        if item >= snap.n_items:
            return
        position = np.flatnonzero(served == item)
        for k in KS:
            if len(position) and position[0] < k:
                self.hits[k] += 1

    def rates(self) -> dict[int, float]:
        return {k: (self.hits[k] / self.probes if self.probes else 0.0) for k in KS}
