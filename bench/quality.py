"""Recommendation quality: the streaming model against baselines, chosen on validation, tested once.

    python bench/quality.py DATA --select [--trials N] [--quick]   # writes bench/chosen.json
    python bench/quality.py DATA --test [--seeds S]                 # reads it
    python bench/quality.py DATA --quick                            # a one-seed test run
    python bench/quality.py DATA --daemon [--quick]                 # via ncf-stream serve's API

The stream is the daemon's loop (:class:`ncf_stream.engine.Engine`, an in-memory
source instead of Kafka): the file in time order, polls of ``--poll`` events
ingested and trained as they come, then idle replay until ``--replay-samples``
training samples (positives and negatives) are replayed. The budget is the daemon's
own ``replay_ratio`` (replayed per fresh sample), set to give that many samples on
the split's training pairs, so ``ncf-stream serve`` stops at the same count
(``--daemon``). Replay runs at duty 1.0: there are no queries to yield to, and the
budget is in samples, so the duty changes only wall time. Every split is the
store's rolling hold-out: each user's newest interaction (users with >= 2), never trained on.

Protocol (declared before any run; the figures are in docs/benchmarks.md):

* **Selection** (``--select``). Each user's newest event is removed from the file,
  so the hold-out at the end of the stream is each user's second-newest event (the
  validation split) and the newest one is never seen. Each method gets the same
  number of trials (``--trials``, a seeded random subset of its grid below), one
  seed each (seed 0), and keeps the trial with the best **full NDCG@10** on
  validation: the one selection metric. The choice goes to bench/chosen.json.
* **Test** (``--test``). The whole file, restreamed from scratch with the stream's
  chosen settings; every baseline refit on everything but the final hold-out
  (training plus validation) at its chosen configuration. Each method is reported
  at that one configuration, on every metric.
* **Intervals.** The stream and each stochastic baseline run with seeds 0..S-1;
  a user's hit and NDCG are averaged over seeds, then 10,000 bootstrap resamples
  of users (one fixed set of resamples for every method, so differences are
  paired) give 95% intervals of each method's mean and of stream minus baseline.
  A difference is a win or a loss only when its interval excludes 0, else a tie.

Metrics, all at K = 10 with ties counted against the held-out item: HR and NDCG
against 99 sampled evaluation negatives (the same seeded negatives for every
method) and over the full catalogue (rank among all items the user has not
touched). The last line of stdout is one JSON object; progress goes to stderr.

Methods and their grids (``key v1, v2; ...``):

    stream: factors 128, 256; lr 0.05; loss bce, softmax; negatives 2, 8; negative_alpha 0.5;
        weight_decay 0.0001; history_length 50; history_decay 0.8
    ease: lam 10, 20, 40, 70, 100, 200, 300, 500, 700, 1000, 2000, 3000
    ease_recent: lam 40, 70, 100, 200, 500; decay 0.7, 0.8, 0.9, 0.95
    als: factors 32, 64, 128; regularization 0.01, 0.1, 1, 10; alpha 1, 5, 20, 40
    bpr: factors 32, 64, 128; learning_rate 0.003, 0.01, 0.03, 0.1; regularization 0.0001,
        0.001, 0.01, 0.1
    neumf_offline: epochs 5, 10, 20, 40; lr 0.005, 0.01, 0.02, 0.05
    mf: dims 16, 32, 64, 128; reg 0, 1e-05, 0.0001, 0.001, 0.01; lr 0.001, 0.003, 0.01

* stream: the engine with these ``Settings`` overrides, the rest at their defaults.
* ease: Steck 2019, closed form, computed through the users (Woodbury), exact.
* ease_recent: EASE's weights applied to each user's items weighted decay^rank by
  time, newest first: order-aware, as the stream is with its history input. Not in
  the quality issue's list; here so the stream is measured against the strongest
  simple baseline we have.
* als, bpr: implicit's AlternatingLeastSquares (15 iterations) and
  BayesianPersonalizedRanking (100 iterations).
* neumf_offline: the same NeuMF code and trainer, default settings but ``lr``,
  trained in epochs over the training pairs instead of a stream.
* mf: dot product plus biases (Rendle et al. 2020, "NCF vs MF revisited"), BCE on
  4 sampled negatives per positive (the stream's sampler), Adam, 40 epochs.
* popularity: distinct users per item, a reference with no trials.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import textwrap
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.engine import Engine
from ncf_stream.evaluate import CatalogueScorer, full_ranks, sampled_ranks
from ncf_stream.events import Events
from ncf_stream.ids import IdMap
from ncf_stream.readers import read_events
from ncf_stream.sampler import NegativeSampler, SamplerConfig
from ncf_stream.settings import Settings, default
from ncf_stream.source import MemorySource
from ncf_stream.store import InteractionStore, StoreView
from ncf_stream.trainer import Trainer, TrainerConfig

K = 10
METRICS = ("hr10", "ndcg10", "full_hr10", "full_ndcg10")
SELECT_METRIC = "full_ndcg10"
EVAL_SEED = 0  # the evaluation negatives: one set for every method, so comparisons are paired
SELECT_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 20261203
CHOSEN = Path(__file__).with_name("chosen.json")

Config = dict[str, Any]
Ranks = dict[str, np.ndarray]  # "sampled" / "full" -> (users,) rank of each hold-out

GRIDS: dict[str, dict[str, list[Any]]] = {
    # Around the history input's best on validation (bench/levers.py, docs/benchmarks.md,
    # Levers): factors 256 and sampled softmax with 8 negatives each lifted full NDCG@10
    # over the earlier choice (128, BCE, 2 negatives), 512 and 16 negatives did not, and
    # decay, alpha, weight decay, lr and history length moved it within seed noise. The
    # loss and the negatives are crossed: the grid holds the earlier choice and each
    # lever alone. Off, the history input lost in every seed and lever run.
    "stream": {"factors": [128, 256], "lr": [0.05], "loss": ["bce", "softmax"],
               "negatives": [2, 8], "negative_alpha": [0.5], "weight_decay": [1e-4],
               "history_length": [50], "history_decay": [0.8]},
    "ease": {"lam": [10, 20, 40, 70, 100, 200, 300, 500, 700, 1000, 2000, 3000]},
    "ease_recent": {"lam": [40, 70, 100, 200, 500], "decay": [0.7, 0.8, 0.9, 0.95]},
    "als": {"factors": [32, 64, 128], "regularization": [0.01, 0.1, 1.0, 10.0],
            "alpha": [1.0, 5.0, 20.0, 40.0]},
    "bpr": {"factors": [32, 64, 128], "learning_rate": [0.003, 0.01, 0.03, 0.1],
            "regularization": [1e-4, 1e-3, 1e-2, 0.1]},
    "neumf_offline": {"epochs": [5, 10, 20, 40], "lr": [0.005, 0.01, 0.02, 0.05]},
    "mf": {"dims": [16, 32, 64, 128], "reg": [0.0, 1e-5, 1e-4, 1e-3, 1e-2],
           "lr": [1e-3, 3e-3, 1e-2]},
}
# Methods whose result depends on a seed: these run once per seed in test mode.
STOCHASTIC = {"stream", "als", "bpr", "neumf_offline", "mf"}
ALS_ITERATIONS, BPR_ITERATIONS = 15, 100
MF_EPOCHS, MF_NEGATIVES, MF_BATCH = 40, 4, 4096


def grid_text() -> str:
    """The grids as the module docstring states them (a test holds the two equal)."""

    def values(vs: list[Any]) -> str:
        return ", ".join(f"{v:g}" if isinstance(v, int | float) else str(v) for v in vs)

    return "\n".join(
        textwrap.fill(f"{method}: " + "; ".join(f"{k} {values(vs)}" for k, vs in grid.items()),
                      width=96, initial_indent="    ", subsequent_indent="        ")
        for method, grid in GRIDS.items())


def trials(method: str, n: int) -> list[Config]:
    """``n`` distinct configurations of a method's grid, a seeded random subset.

    Seeded by the method's name, so adding a method does not change another's trials."""
    grid = GRIDS[method]
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if n > len(points):
        raise SystemExit(f"--trials {n}: {method}'s grid has only {len(points)} points")
    rng = np.random.default_rng(zlib.crc32(method.encode()))
    return [points[i] for i in sorted(rng.choice(len(points), n, replace=False))]


# ---- the split ----------------------------------------------------------------------------


def drop_newest(events: Events) -> Events:
    """Every event but each user's newest, the one the store would hold out.

    Newest as the store orders them: largest ts, a tie going to the later arrival.
    Removing it makes the store's hold-out the second-newest: the validation split.
    """
    _, user = np.unique(events.users.astype(str), return_inverse=True)
    order = np.lexsort((np.arange(len(events)), events.ts, user))  # by user, ts, arrival
    last = order[np.r_[user[order][1:] != user[order][:-1], True]]
    keep = np.ones(len(events), dtype=bool)
    keep[last] = False
    return events.take(np.flatnonzero(keep))


@dataclass(frozen=True)
class Split:
    """A stream's final state without any model: the hold-outs every method is ranked
    on, and the training matrix (everything but them) the baselines fit on."""

    events: Events
    user_ids: IdMap
    store: InteractionStore
    view: StoreView
    x: sp.csr_matrix  # (users, items) binary: store.training_pairs()

    @classmethod
    def of(cls, events: Events) -> Split:
        # Rows in arrival order, as the engine assigns them, so every method's rows agree.
        user_ids, item_ids = IdMap(), IdMap()
        store = InteractionStore()
        store.append(user_ids.rows(events.users), item_ids.rows(events.items), events.ts)
        users, items = store.training_pairs()
        x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)),
                          shape=(store.n_users, store.n_items))
        return cls(events, user_ids, store, store.view(), x)

    def check_same(self, store: InteractionStore, user_ids: IdMap) -> None:
        """A method that built its own store must have built this one."""
        ho, mine = store.holdout(), self.view.holdout
        if not (np.array_equal(user_ids.all_ids(), self.user_ids.all_ids())
                and np.array_equal(ho.users, mine.users) and np.array_equal(ho.items, mine.items)):
            raise RuntimeError("a method's store disagrees with the split")


# ---- metrics and intervals --------------------------------------------------------------------


def ranks(score_all: CatalogueScorer, view: StoreView) -> Ranks:
    """Each hold-out's rank among its sampled negatives and among the full catalogue."""
    rows = np.arange(len(view.holdout.users))

    def pairs(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.take_along_axis(score_all(users), items, axis=1)

    return {"sampled": sampled_ranks(pairs, view, rows, seed=EVAL_SEED),
            "full": full_ranks(score_all, view, rows, catalogue_scorer=True)}


def per_user(runs: Sequence[Ranks]) -> dict[str, np.ndarray]:
    """Each user's HR@10 and NDCG@10 contributions, averaged over runs (seeds)."""
    out = {}
    for metric in METRICS:
        kind = "full" if metric.startswith("full_") else "sampled"
        gains = []
        for run in runs:
            r = run[kind]
            hit = r < K
            gains.append(hit.astype(np.float64) if metric.endswith("hr10")
                         else np.where(hit, 1.0 / np.log2(r + 2.0), 0.0))
        out[metric] = np.mean(gains, axis=0)
    return out


def resamples(n_users: int, n: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
              ) -> np.ndarray:
    """(n, n_users) user indices drawn with replacement: one set shared by every interval."""
    return np.random.default_rng(seed).integers(0, n_users, (n, n_users))


def interval(values: np.ndarray, idx: np.ndarray) -> list[float]:
    """95% percentile bootstrap interval of the mean of per-user ``values``. Pass a paired
    difference (stream minus baseline, user by user) to get the difference's interval."""
    means = values[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def verdict(ci: Sequence[float]) -> str:
    return "win" if ci[0] > 0 else "loss" if ci[1] < 0 else "tie"


def summary(values: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METRICS:
        out[m] = round(float(values[m].mean()), 4)
        out[f"{m}_ci"] = [round(v, 4) for v in interval(values[m], idx)]
    return out


# ---- the methods: each fits on a split and returns users -> (n, n_items) scores ----------------


@dataclass(frozen=True)
class Budget:
    """The stream's schedule: events per poll, and samples replayed once it is idle."""

    poll: int
    replay_samples: int

    def replay_ratio(self, split: Split, negatives: int) -> float:
        """The daemon's ``replay_ratio`` that replays ``replay_samples`` on ``split``: every
        event but the final hold-outs is trained once fresh (a repeat too), with its
        negatives."""
        fresh = len(split.events) - len(split.view.holdout.users)
        return self.replay_samples / (fresh * (1 + negatives))


Fitted = tuple[CatalogueScorer, dict[str, float]]  # scores, and what to report of the fit


def from_matrix(scores: np.ndarray) -> CatalogueScorer:
    return lambda users: scores[users]


def neumf_scores(trainer: Trainer) -> CatalogueScorer:
    model = trainer.model.eval()
    return lambda users: model.score_matrix(torch.from_numpy(users)).numpy()


def stream_settings(split: Split, cfg: Config, seed: int, budget: Budget) -> Settings:
    """The daemon's settings for the stream: ``cfg`` and the replay budget. Every user is
    evaluated (the daemon's default evaluates holdout_fraction of them)."""
    return Settings(device="cpu", checkpoint_dir=None, replay_duty=1.0, seed=seed,
                    holdout_fraction=1.0, **cfg,
                    replay_ratio=budget.replay_ratio(split, negatives_of(cfg)))


def negatives_of(cfg: Config) -> int:
    """The stream's negatives per positive under ``cfg`` (the setting's default if unset)."""
    return int(cfg.get("negatives", default("negatives")))


def fit_stream(split: Split, cfg: Config, seed: int, budget: Budget,
               keep: list[Engine] | None = None) -> Fitted:
    """The daemon's loop over the file: consume and train, then idle replay to the budget.
    ``keep`` receives the closed engine (bench/quality_daemon.py serves from it)."""
    settings = stream_settings(split, cfg, seed, budget)
    engine = Engine(settings, MemorySource(split.events, batch_size=budget.poll))
    trainer = engine.trainer
    start = time.perf_counter()
    engine.run(until=lambda: engine.counters.consumed == len(split.events)
               and not trainer.pending)
    pass_s = time.perf_counter() - start
    start = time.perf_counter()
    engine.run(until=lambda: trainer.replay_budget == 0)
    engine.close()
    if keep is not None:
        keep.append(engine)
    split.check_same(trainer.store, trainer.user_ids)
    return neumf_scores(trainer), {
        "pass_seconds": pass_s, "replay_seconds": time.perf_counter() - start,
        "samples_total": trainer.samples_trained}


def fit_popularity(split: Split, cfg: Config, seed: int) -> Fitted:
    counts = np.asarray(split.x.sum(axis=0)).ravel()
    return lambda users: np.broadcast_to(counts, (len(users), len(counts))), {}


def ease_scores(x: sp.csr_matrix, lam: float, rows: sp.csr_matrix | None = None) -> np.ndarray:
    """EASE's scores R B for every user (Steck 2019): B = I - P / diag(P), P = (X'X + lam I)^-1,
    fitted on X; R is X unless ``rows`` (the same users, other weights) is given.

    With fewer users than items, Woodbury gives P = (I - X' (XX' + lam I)^-1 X) / lam,
    so only a users x users system is solved: exact, and seconds instead of minutes
    (ml-latest-small: 610 users, 9.7k items)."""
    xd = x.toarray().astype(np.float64)
    r = xd if rows is None else rows.toarray().astype(np.float64)
    kx = np.linalg.solve(xd @ xd.T + lam * np.eye(len(xd)), xd)  # (XX' + lam I)^-1 X
    rp = (r - (r @ xd.T) @ kx) / lam  # R P
    diag_p = (1.0 - np.einsum("ui,ui->i", xd, kx)) / lam
    return r - rp / diag_p  # R (I - P diag(P)^-1): B's diagonal is 0


def fit_ease(split: Split, cfg: Config, seed: int) -> Fitted:
    return from_matrix(ease_scores(split.x, cfg["lam"])), {}


def fit_ease_recent(split: Split, cfg: Config, seed: int) -> Fitted:
    """EASE's weights applied to each user's items weighted decay^rank, newest first: an
    order-aware item-item baseline, as the stream's history input is order-aware."""
    users, items = split.store.training_pairs()
    order = np.lexsort((-split.store.last_ts(users, items), users))  # per user, newest first
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    rank = np.arange(len(users)) - np.repeat(starts, np.diff(np.r_[starts, len(users)]))
    recent = sp.csr_matrix((cfg["decay"] ** rank, (users, items)), shape=split.x.shape)
    return from_matrix(ease_scores(split.x, cfg["lam"], recent)), {}


def _implicit(make: Callable[[], Any], x: sp.csr_matrix) -> CatalogueScorer:
    from threadpoolctl import threadpool_limits

    # implicit runs its own threads; BLAS threads under them thrash (it warns at init).
    with threadpool_limits(1, "blas"):
        model = make()
        model.fit(x, show_progress=False)
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return from_matrix(uf @ itf.T)  # BPR's item bias is a factor column, 1 on the user side


def fit_als(split: Split, cfg: Config, seed: int) -> Fitted:
    from implicit.cpu.als import AlternatingLeastSquares

    return _implicit(lambda: AlternatingLeastSquares(
        **cfg, iterations=ALS_ITERATIONS, random_state=seed), split.x), {}


def fit_bpr(split: Split, cfg: Config, seed: int) -> Fitted:
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    return _implicit(lambda: BayesianPersonalizedRanking(
        **cfg, iterations=BPR_ITERATIONS, random_state=seed), split.x), {}


def fit_neumf_offline(split: Split, cfg: Config, seed: int) -> Fitted:
    """The same model code and trainer, trained in epochs over the training pairs."""
    trainer = Trainer(TrainerConfig(lr=cfg["lr"], seed=seed, replay=False, holdout_fraction=1.0))
    trainer.ingest(split.events)  # builds the store and its hold-outs; trains nothing
    split.check_same(trainer.store, trainer.user_ids)
    users, items = trainer.store.training_pairs()
    per_step = trainer.cfg.positives_per_step
    rng = np.random.default_rng(seed)
    for _ in range(cfg["epochs"]):
        order = rng.permutation(len(users))
        for lo in range(0, len(order), per_step):
            sel = order[lo: lo + per_step]
            trainer.train_pairs(users[sel], items[sel])
    return neumf_scores(trainer), {}


def fit_mf(split: Split, cfg: Config, seed: int) -> Fitted:
    """Dot product plus user, item and global biases, BCE on sampled negatives, L2 on
    the rows each sample touches (Rendle et al. 2020)."""
    gen = torch.Generator().manual_seed(seed)
    n_users, n_items, d = split.store.n_users, split.store.n_items, cfg["dims"]
    p = (torch.randn(n_users, d, generator=gen) * 0.01).requires_grad_()
    q = (torch.randn(n_items, d, generator=gen) * 0.01).requires_grad_()
    bu, bi, b = (torch.zeros(n, requires_grad=True) for n in (n_users, n_items, 1))
    opt = torch.optim.Adam([p, q, bu, bi, b], lr=cfg["lr"])
    # The stream's sampler: never an item the user trained on; the hold-out is a
    # negative like any untouched item.
    sampler = NegativeSampler(split.store, SamplerConfig(k=MF_NEGATIVES, seed=seed))
    pos_u, pos_i = split.store.training_pairs()
    rng = np.random.default_rng(seed)
    for _ in range(MF_EPOCHS):
        order = rng.permutation(len(pos_u))
        for lo in range(0, len(order), MF_BATCH):
            sel = order[lo: lo + MF_BATCH]
            neg = sampler.sample(pos_u[sel]).ravel()
            ok = neg >= 0
            u = torch.from_numpy(np.concatenate([pos_u[sel], np.repeat(pos_u[sel],
                                                                       MF_NEGATIVES)[ok]]))
            i = torch.from_numpy(np.concatenate([pos_i[sel], neg[ok]]))
            y = torch.zeros(len(u))
            y[: len(sel)] = 1.0
            pu, qi = p[u], q[i]
            logits = (pu * qi).sum(1) + bu[u] + bi[i] + b
            reg = (pu.square().sum(1) + qi.square().sum(1) + bu[u] ** 2 + bi[i] ** 2).mean()
            loss = F.binary_cross_entropy_with_logits(logits, y) + cfg["reg"] * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        scores = (p @ q.T + bu[:, None] + bi[None, :] + b).numpy()
    return from_matrix(scores), {}


Fit = Callable[[Split, Config, int], Fitted]


def methods(budget: Budget) -> dict[str, Fit]:
    """Every method with a grid, the stream first."""
    return {"stream": lambda split, cfg, seed: fit_stream(split, cfg, seed, budget),
            "ease": fit_ease, "ease_recent": fit_ease_recent, "als": fit_als, "bpr": fit_bpr,
            "neumf_offline": fit_neumf_offline, "mf": fit_mf}


def fit_and_rank(label: str, fit: Fit, split: Split, cfg: Config, seed: int,
                 ) -> tuple[Ranks, dict[str, float]]:
    start = time.perf_counter()
    score_all, info = fit(split, cfg, seed)
    r = ranks(score_all, split.view)
    means = {m: float(v.mean()) for m, v in per_user([r]).items()}
    print(f"  {label} seed {seed} {cfg}: " + ", ".join(f"{m} {v:.4f}" for m, v in means.items())
          + f" ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return r, {**info, **means}


# ---- the two modes ----------------------------------------------------------------------------


def run_select(events: Events, n_trials: int, budget: Budget,
               only: Sequence[str] | None = None) -> dict[str, Any]:
    split = Split.of(drop_newest(events))
    print(f"selection: {len(split.events):,} events (each user's newest removed), "
          f"{len(split.view.holdout.users)} validation hold-outs", file=sys.stderr)
    chosen: dict[str, Any] = {}
    for method, fit in methods(budget).items():
        if only and method not in only:
            continue
        results = []
        for cfg in trials(method, n_trials):
            _, info = fit_and_rank(method, fit, split, cfg, SELECT_SEED)
            results.append({"config": cfg, **{m: round(info[m], 4) for m in METRICS}})
        best = max(results, key=lambda r: r[SELECT_METRIC])  # the first of equals
        chosen[method] = {"config": best["config"], "trials": results}
        if method == "stream":  # the budget as the daemon states it (deploy/quality.toml)
            chosen[method]["replay_ratio"] = round(budget.replay_ratio(
                split, negatives_of(best["config"])), 1)
        print(f"{method}: chose {best['config']} ({SELECT_METRIC} {best[SELECT_METRIC]:.4f})",
              file=sys.stderr)
    return {"metric": SELECT_METRIC, "trials_per_method": n_trials, "seed": SELECT_SEED,
            "poll": budget.poll, "replay_samples": budget.replay_samples, "methods": chosen}


def run_test(events: Events, chosen: dict[str, Any], seeds: list[int],
             budget: Budget) -> dict[str, Any]:
    split = Split.of(events)
    print(f"test: {len(events):,} events, {len(split.view.holdout.users)} hold-outs, "
          f"{split.view.n_items} items", file=sys.stderr)
    configs = {m: chosen["methods"][m]["config"] for m in GRIDS}
    fits: dict[str, Fit] = {**methods(budget), "popularity": fit_popularity}
    values, stream_info = {}, []
    for method, fit in fits.items():
        cfg = configs.get(method, {})
        runs = []
        for seed in seeds if method in STOCHASTIC else seeds[:1]:
            r, info = fit_and_rank(method, fit, split, cfg, seed)
            runs.append(r)
            if method == "stream":
                stream_info.append(info)
        values[method] = per_user(runs)

    idx = resamples(len(split.view.holdout.users))
    stream = values.pop("stream")
    diff = {b: {m: [round(v, 4) for v in interval(stream[m] - vals[m], idx)] for m in METRICS}
            for b, vals in values.items()}
    return {
        "events": len(events), "holdouts": len(split.view.holdout.users),
        "items": split.view.n_items,
        "stream": summary(stream, idx),
        "baselines": {b: summary(vals, idx) for b, vals in values.items()},
        "diff_ci": diff,
        "verdict": {b: {m: verdict(ci) for m, ci in d.items()} for b, d in diff.items()},
        "chosen": configs,
        "samples_total": [int(i["samples_total"]) for i in stream_info],
        "replay_seconds": [round(i["replay_seconds"], 1) for i in stream_info],
        "pass_seconds": [round(i["pass_seconds"], 1) for i in stream_info],
        "replay_samples": budget.replay_samples, "seeds": seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--format")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--select", action="store_true",
                      help="choose each method's configuration on the validation split")
    mode.add_argument("--test", action="store_true",
                      help="the chosen configurations on the test split (the default)")
    mode.add_argument("--daemon", action="store_true",
                      help="the stream's test figures through a real daemon's HTTP API against "
                           "the in-process stream (bench/quality_daemon.py)")
    parser.add_argument("--quick", action="store_true",
                        help="3M samples; test: 1 seed; select: 1 trial, chosen.json untouched")
    parser.add_argument("--trials", type=int, help="trials per method (default 8, --quick 1)")
    parser.add_argument("--methods", help="select: only these methods (comma-separated); the "
                                          "others keep their choice in the chosen file")
    parser.add_argument("--seeds", type=int, help="seeds in test mode (default 3, --quick 1)")
    parser.add_argument("--replay-samples", type=int,
                        help="training samples replayed once the stream is idle "
                             "(default 20M, --quick 3M)")
    parser.add_argument("--poll", type=int, default=1000, help="events per poll of the stream")
    parser.add_argument("--chosen", type=Path,
                        help=f"the chosen configurations (default {CHOSEN.name} beside this "
                             "script; a --select --quick run writes only where this says)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    budget = Budget(args.poll, args.replay_samples or (3_000_000 if args.quick else 20_000_000))
    events = read_events(args.data, args.format).events
    start = time.perf_counter()

    if args.daemon:
        from quality_daemon import run_daemon  # the bench folder is on sys.path

        chosen = json.loads((args.chosen or CHOSEN).read_text())
        result = {"mode": "daemon" + ("_quick" if args.quick else ""),
                  **run_daemon(sys.modules[__name__], args.data, events, chosen, budget,
                               repeat=not args.quick)}
    elif args.select:
        only = args.methods.split(",") if args.methods else None
        if only and set(only) - set(GRIDS):
            parser.error(f"--methods: choose among {', '.join(GRIDS)}")
        out = run_select(events, args.trials or (1 if args.quick else 8), budget, only)
        path = args.chosen or (None if args.quick else CHOSEN)
        if only and path is not None:  # the other methods keep their choice
            kept = json.loads(path.read_text())
            for key in ("metric", "seed", "poll", "replay_samples", "trials_per_method"):
                if kept[key] != out[key]:
                    parser.error(f"--methods: {path} was chosen with {key} {kept[key]}, "
                                 f"this run uses {out[key]}")
            out["methods"] = {**kept["methods"], **out["methods"]}
        if path is not None:
            path.write_text(json.dumps(out, indent=2) + "\n")
            print(f"wrote {path}", file=sys.stderr)
        result = {"mode": "select" + ("_quick" if args.quick else ""),
                  "chosen": {m: c["config"] for m, c in out["methods"].items()},
                  "validation": {m: {k: v for k, v in max(
                      c["trials"], key=lambda t: t[SELECT_METRIC]).items() if k != "config"}
                      for m, c in out["methods"].items()}}
    else:
        n_seeds = args.seeds or (1 if args.quick else 3)
        if n_seeds < 3 and not args.quick:
            parser.error("--test needs --seeds >= 3 (fewer only with --quick)")
        chosen = json.loads((args.chosen or CHOSEN).read_text())
        if chosen["replay_samples"] != budget.replay_samples:
            print(f"note: configurations chosen at {chosen['replay_samples']:,} samples, "
                  f"tested at {budget.replay_samples:,}", file=sys.stderr)
        result = {"mode": "quick" if args.quick else "test",
                  **run_test(events, chosen, list(range(n_seeds)), budget)}
    result = {"data": Path(args.data).name, **result,
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
