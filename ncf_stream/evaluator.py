"""Continuous evaluation on published snapshots, and the online (prequential) hit rate.

The periodic evaluator ranks the current hold-out of every user, or a seeded
sample of at most ``max_users``, by both protocols of :mod:`ncf_stream.evaluate`
for K in (5, 10, 20). It runs off the training thread on the latest snapshot
and caps its own CPU share (``duty``): after each chunk of work it sleeps in
proportion, so on a machine the trainer already saturates, ingest keeps >= 90%
of its rate during an evaluation. The price is wall time, not training.

The online hit rate asks, for a sampled fraction of incoming events, before
the model trains on them: was the event's item in the user's top K as served
right then? That is what a live system experiences.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ncf_stream.evaluate import KS, Report, full_ranks, metrics, sampled_ranks
from ncf_stream.recommend import top_k
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
    history: int = 100  # reports kept for GET /v1/eval
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

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "model_version": self.version, "finished_at": self.finished_at, "users": self.users,
            "users_full": self.users_full,
            "seconds": round(self.seconds, 3), "compute_seconds": round(self.compute_seconds, 3),
            "sampled": _rounded(self.sampled.as_dict())}
        if self.full is not None:
            out["full"] = _rounded(self.full.as_dict())
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

    def evaluate(self, snap: Snapshot | None = None, throttle: bool = False) -> EvalReport | None:
        """One evaluation of ``snap`` (default: the current snapshot); None before any."""
        snap = snap or self.holder.get()
        if snap is None or len(snap.store.holdout.users) == 0:
            return None
        cfg = self.config
        start = time.perf_counter()
        pause = Throttle(cfg.duty, self._stop) if throttle else None
        rows = self._rows(snap)
        sampled = metrics(sampled_ranks(snapshot_scorer(snap), snap.store, rows, cfg.negatives,
                                        cfg.seed, pause=pause), "sampled", KS)
        full, n_full = None, 0
        if cfg.full:
            n_full = min(len(rows), max(1, cfg.full_max_pairs // max(snap.n_items, 1)))
            ranks = full_ranks(catalogue_scorer(snap), snap.store, rows[:n_full],
                               catalogue_scorer=True, pause=pause)
            full = metrics(ranks, "full", KS)
        seconds = time.perf_counter() - start
        report = EvalReport(snap.version, time.time(), len(rows), n_full, seconds,
                            pause.busy if pause is not None else seconds, sampled, full)
        self.history.append(report)
        log.info("eval v%d: %d users, HR@10 sampled %.4f full %s, %.1f s", snap.version,
                 len(rows), sampled.hr[10], "-" if full is None else f"{full.hr[10]:.4f}",
                 seconds)
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _rows(self, snap: Snapshot) -> np.ndarray:
        n = len(snap.store.holdout.users)
        limit = self.config.max_users or n
        # Seeded, so successive evaluations rank the same users while their hold-outs
        # stay; in random order, so any prefix (the full protocol's) is a fair sample.
        return np.random.default_rng(self.config.seed).permutation(n)[:limit]

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
        while not self._stop.is_set():
            self._wake.wait(self.config.interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.evaluate(throttle=True)
            except Cancelled:
                return
            except Exception:  # an evaluation must never take the daemon down
                log.exception("evaluation failed")
            finally:
                release_free_memory()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)


@dataclass
class OnlineHitRate:
    """Prequential HR@K: was the item in the user's served top K before training on it?"""

    fraction: float = setting("online_fraction")
    max_per_second: float = 50.0  # each probe is a retrieval; cap their cost at full ingest
    candidates: int = setting("candidates")
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
            served, _ = top_k(snap, user, kmax, self.candidates)
        self.probes += 1
        if item >= snap.n_items:
            return
        position = np.flatnonzero(served == item)
        for k in KS:
            if len(position) and position[0] < k:
                self.hits[k] += 1

    def rates(self) -> dict[int, float]:
        return {k: (self.hits[k] / self.probes if self.probes else 0.0) for k in KS}
