"""The evaluator's thread (a quick first evaluation, then the full budget) and the
candidate recall it measures with each evaluation."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncf_stream.engine import Engine
from ncf_stream.evaluate import metrics, ranks_against
from ncf_stream.evaluator import EvalConfig, EvalReport, Evaluator, candidate_recall
from ncf_stream.recommend import exact_top_k, top_k
from ncf_stream.retrieval import CandidateIndex
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Snapshot, SnapshotHolder
from ncf_stream.source import MemorySource
from ncf_stream.store import HoldOut
from ncf_stream.synth import SynthConfig, generate

GUARD_S = 30.0  # a failure guard, not a target: each wait below ends in well under a second


@pytest.fixture(scope="module")
def snap(trained) -> Snapshot:  # the trained fixture: tests/conftest.py
    s = trained[1].get()
    assert s is not None and len(s.store.holdout.users) > 200  # more than the quick sample
    return s


@pytest.fixture(scope="module")
def noisy_index(snap: Snapshot) -> Snapshot:
    """The snapshot served from an index of perturbed item vectors: a retrieval that
    misses some of the exact top 10 (on weights this small, the true index finds all of
    them even with 10 candidates)."""
    vectors, a_ref = snap.model.retrieval_items()
    v = vectors.detach().numpy()
    noise = np.random.default_rng(0).normal(size=v.shape).astype(np.float32)
    noisy = v + noise * np.linalg.norm(v, axis=1, keepdims=True) / np.sqrt(v.shape[1])
    return dataclasses.replace(snap, index=CandidateIndex(noisy), a_ref=a_ref)


def without_holdouts(snap: Snapshot) -> Snapshot:
    empty = HoldOut(*(np.empty(0, dtype=a.dtype) for a in dataclasses.astuple(snap.store.holdout)))
    return dataclasses.replace(snap, version=snap.version - 1,
                               store=dataclasses.replace(snap.store, holdout=empty))


def with_holdouts(snap: Snapshot, n: int) -> Snapshot:
    ho = snap.store.holdout
    fewer = HoldOut(*(a[:n] for a in dataclasses.astuple(ho)))
    return dataclasses.replace(snap, store=dataclasses.replace(snap.store, holdout=fewer))


class WatchedHolder(SnapshotHolder):
    """A holder that says when a reader has seen its current snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self.read = threading.Event()

    def get(self) -> Snapshot | None:
        current = super().get()
        if current is not None:
            self.read.set()
        return current


class Reports:
    def __init__(self) -> None:
        self.items: list[EvalReport] = []
        self._cond = threading.Condition()

    def __call__(self, report: EvalReport) -> None:
        with self._cond:
            self.items.append(report)
            self._cond.notify_all()

    def wait(self, n: int) -> list[EvalReport]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.items) >= n, GUARD_S), (
                f"{len(self.items)} reports, expected {n}")
            return list(self.items)


# ---- the first evaluation ------------------------------------------------------------------------

def test_first_report_is_quick_as_soon_as_hold_outs_exist_then_the_full_budget(
        snap: Snapshot) -> None:
    """With a one-hour interval, only the quick path can produce a report before the
    request: remove it and the first wait fails."""
    n_holdouts, n_items = len(snap.store.holdout.users), snap.n_items
    cfg = EvalConfig(interval_s=3600.0, max_users=0, duty=1.0,
                     first_max_pairs=20 * n_items,  # the quick full protocol: 20 users
                     full_max_pairs=10 ** 9)  # the regular one: every hold-out
    holder, reports = WatchedHolder(), Reports()
    ev = Evaluator(holder, cfg, on_report=reports)
    holder.set(without_holdouts(snap))  # a snapshot, but nothing to evaluate yet
    ev.start()
    try:
        assert holder.read.wait(GUARD_S)  # the thread has looked at it...
        holder.set(snap)  # ...and the first snapshot with hold-outs appears
        first = reports.wait(1)[0]
        assert first.quick and first.version == snap.version
        assert first.users == min(cfg.first_users, n_holdouts) == 200
        assert first.users_full == 20 and first.recall_users == 20
        assert first.candidate_recall is not None
        ev.request()  # the next one comes at the regular cadence; no need to wait an hour
        second = reports.wait(2)[1]
        assert not second.quick
        assert second.users == second.users_full == n_holdouts
        assert second.recall_users == cfg.recall_users == 50
    finally:
        ev.stop()
    assert len(reports.items) == 2


def test_quick_evaluation_ranks_every_hold_out_when_there_are_fewer(snap: Snapshot) -> None:
    ev = Evaluator(SnapshotHolder(), EvalConfig(duty=1.0))
    report = ev.evaluate(with_holdouts(snap, 37), quick=True)
    assert report is not None and report.quick and report.users == report.users_full == 37
    # Never more than a regular evaluation would rank.
    capped = Evaluator(SnapshotHolder(), EvalConfig(max_users=50)).evaluate(snap, quick=True)
    assert capped is not None and capped.users == 50


def test_quick_ranks_a_prefix_of_the_regular_sample(snap: Snapshot) -> None:
    """The same users as the regular evaluation's first ones: figures that compare."""
    ev = Evaluator(SnapshotHolder(), EvalConfig())
    assert np.array_equal(ev._rows(snap, quick=True), ev._rows(snap)[:200])


# ---- candidate recall ----------------------------------------------------------------------------

def hand_recall(snap: Snapshot, users: np.ndarray, candidates: int) -> float:
    hits = [len(np.intersect1d(top_k(snap, u, 10, candidates)[0], exact_top_k(snap, u, 10)[0]))
            for u in users.tolist()]
    return sum(hits) / (10 * len(users))


def test_candidate_recall_is_one_when_candidates_cover_the_catalogue(snap: Snapshot) -> None:
    everyone = np.arange(snap.n_users)
    assert candidate_recall(snap, everyone, candidates=snap.n_items) == 1.0
    ev = Evaluator(SnapshotHolder(), EvalConfig(candidates=snap.n_items))
    report = ev.evaluate(snap)
    assert report is not None and report.candidate_recall == 1.0 and report.recall_users == 50


def test_candidate_recall_with_few_candidates_is_the_overlap_with_brute_force(
        noisy_index: Snapshot) -> None:
    snap = noisy_index
    ev = Evaluator(SnapshotHolder(), EvalConfig(candidates=10, exact_items=0))
    users = ev.recall_rows(snap)
    assert len(users) == 50 and len(np.unique(users)) == 50
    recall = candidate_recall(snap, users, candidates=10)
    assert recall is not None and recall < 1.0
    assert recall == hand_recall(snap, users, 10)
    report = ev.evaluate(snap)
    assert report is not None and report.candidate_recall == recall
    # In chunks of users (the throttle pauses between them): the same figure.
    assert candidate_recall(snap, users, 10, chunk_pairs=3 * snap.n_items) == recall
    # More candidates, more recall; all of them, all of it.
    assert recall < candidate_recall(snap, users, 40) == hand_recall(snap, users, 40)  # type: ignore[operator]
    assert candidate_recall(snap, users, snap.n_items) == 1.0


def test_non_finite_scores_never_count(snap: Snapshot) -> None:
    users = np.arange(0, snap.n_users, 5)
    model = copy.deepcopy(snap.model)
    broken = dataclasses.replace(snap, model=model)
    # A third of the catalogue scores NaN: neither served (NaN sorts last) nor exact.
    model.items.weight[: snap.n_items: 3] = float("nan")
    assert candidate_recall(broken, users, candidates=snap.n_items) == 1.0
    for u in users[:5].tolist():
        assert np.all(top_k(broken, u, 10, snap.n_items)[0] % 3 != 0)
    # All but 5 items score NaN: the served top 10 is those 5 (where unseen), then NaN
    # ones, and so is the brute-force list; only the finite ones are hits.
    finite = np.array([3, 50, 100, 150, 200])
    model.items.weight[:] = float("nan")
    model.items.weight[finite] = snap.model.items.weight[finite]
    hits = sum(len(np.setdiff1d(finite, snap.store.seen(u))) for u in users.tolist())
    assert hand_recall(broken, users, snap.n_items) == 1.0  # what counting NaNs would say
    assert candidate_recall(broken, users, snap.n_items) == hits / (10 * len(users))
    # A user scored NaN everywhere gets nothing right.
    model.users.weight[users] = float("nan")
    assert candidate_recall(broken, users, candidates=snap.n_items) == 0.0


# ---- where the figures go ----------------------------------------------------------------------

def test_engine_exports_the_report_to_prometheus_the_history_and_json() -> None:
    events = generate(SynthConfig(users=120, items=90, events=3000, seed=0, topics=4)).to_events()
    s = Settings(device="cpu", factors=8, mlp_layers=[16, 8], batch_size=512,
                 checkpoint_dir=None, eval_interval_s=3600.0, replay=False)
    engine = Engine(s, MemorySource(events, batch_size=len(events)))
    engine.run(until=lambda: engine.status().snapshot_events == len(events))
    report = engine.evaluator.evaluate(quick=True)
    assert report is not None and report.candidate_recall is not None
    gauge = engine.metrics.registry.get_sample_value("ncf_stream_candidate_recall")
    assert gauge == report.candidate_recall > 0
    engine._last_sample = None  # a chart point now, not HISTORY_EVERY_S after the last
    engine._sample()
    sample = engine.history.last()
    assert sample is not None
    assert (sample.eval_users, sample.eval_users_full, sample.candidate_recall) == (
        report.users, report.users_full, report.candidate_recall)
    as_json = report.as_dict()
    assert as_json["quick"] is True and as_json["users"] == report.users
    assert as_json["candidate_recall"] == round(report.candidate_recall, 5)
    assert as_json["recall_users"] == report.recall_users
    engine.close(final_checkpoint=False)


def brute_rank(pos: float, negs: list[float]) -> int:
    """The positive's 0-based rank, by hand: a non-finite score is below every finite
    one, and a tie (non-finite ones tie each other) counts against the positive."""
    def key(x: float) -> float:
        return x if math.isfinite(x) else -math.inf
    return sum(key(n) >= key(pos) for n in negs)


@given(st.lists(st.lists(st.sampled_from([0.0, 1.0, 2.5, -1.0, math.nan, math.inf, -math.inf]),
                         min_size=4, max_size=4), min_size=1, max_size=30))
@settings(max_examples=200, deadline=None)
def test_ranks_match_brute_force_with_ties_and_non_finite_scores(rows: list[list[float]]) -> None:
    scores = np.array(rows)
    ranks = ranks_against(scores[:, 0], scores[:, 1:])
    assert ranks.tolist() == [brute_rank(r[0], r[1:]) for r in rows]


def test_an_all_nan_model_scores_zero_not_one() -> None:
    pos, neg = np.full(50, np.nan), np.full((50, 99), np.nan)
    report = metrics(ranks_against(pos, neg), "sampled")
    assert report.hr[10] == 0.0 and report.ndcg[10] == 0.0
