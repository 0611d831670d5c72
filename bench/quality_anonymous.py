"""Anonymous quality: each test user scored from their training items alone, as if anonymous.

    python bench/quality_anonymous.py DATA [--quick] [--replay-samples N] [--chosen FILE]
                                           [--defaults]

quality.py's stream (``fit_stream``, the chosen configuration of bench/chosen.json,
or with ``--defaults`` the daemon's defaults, seed 0) is fitted on a split and its
final snapshot published. Each user with a
hold-out is then ranked twice by that one snapshot:

* **known**: the user's own row (the served figure: at ml-latest-small's 9.7k items
  the served ranking is the exact one, ``exact_items`` 20k);
* **anonymous**: a row fitted to the user's training items (every item they
  touched but the hold-out, oldest first, at most the request limit of 1,000:
  the newest), exactly as ``POST /v1/recommend`` with ``items`` fits it
  (:func:`ncf_stream.anonymous.fit_row`, negatives drawn as the stream's trainer
  draws them), the user's own row unused.

Both go through quality.py's ``ranks`` (HR@10 and NDCG@10 against the 99 sampled
evaluation negatives, and over the full catalogue less the user's items) and
``per_user``; the difference anonymous minus known gets quality.py's paired
bootstrap interval over users.

The fit's settings are chosen the way quality.py chooses (protocol declared before
the run): on the **validation** split (each user's newest event dropped; the
hold-out is the second-newest) every point of ``GRID`` is scored and the best
full NDCG@10 is kept; the **test** split (the whole file, restreamed from
scratch) then reports the chosen point, and beside it the same point from the
other start (``init`` zeros vs mean), to answer which start is better. Steps
are kept at <= 10: each one costs a forward and backward pass per request
(bench/anonymous.py). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality as q  # bench/quality.py

from ncf_stream.anonymous import AnonymousConfig, fit_row, negative_cdf
from ncf_stream.api import MAX_ANONYMOUS_ITEMS
from ncf_stream.engine import Engine
from ncf_stream.evaluate import CatalogueScorer
from ncf_stream.readers import read_events
from ncf_stream.recommend import logits_of
from ncf_stream.snapshot import Snapshot

GRID: dict[str, list[Any]] = {"steps": [0, 5, 10], "lr": [0.03, 0.1, 0.3],
                              "init": ["zeros", "mean"]}


def grid(alpha: float) -> list[AnonymousConfig]:
    """Every point; steps 0 (the start row plus the history input) once per start. The
    negatives are drawn as the stream's trainer draws them (its ``negative_alpha``)."""
    out = []
    for steps, lr, init in itertools.product(*GRID.values()):
        if steps == 0 and lr != GRID["lr"][0]:
            continue
        out.append(AnonymousConfig(steps=steps, lr=lr, init=init, alpha=alpha))
    return out


def label(cfg: AnonymousConfig) -> str:
    return f"steps={cfg.steps},lr={cfg.lr:g},init={cfg.init}"


def fitted_snapshot(split: q.Split, budget: q.Budget, cfg: dict[str, Any]) -> Snapshot:
    kept: list[Engine] = []
    q.fit_stream(split, cfg, q.SELECT_SEED, budget, keep=kept)
    engine = kept[0]
    engine.publisher.publish(engine.counters.consumed)
    snap = engine.holder.get()
    if snap is None:
        raise RuntimeError("no snapshot")
    return snap


def sessions(snap: Snapshot) -> list[np.ndarray]:
    """Each hold-out user's training items, oldest first, the newest 1,000 at most."""
    ho = snap.store.holdout
    out = []
    for user, held in zip(ho.users.tolist(), ho.items.tolist(), strict=True):
        rows, _ = snap.store.newest_first(user)
        rows = rows[rows != held][:MAX_ANONYMOUS_ITEMS]
        out.append(rows[::-1].astype(np.int64))
    return out


def anonymous_scorer(snap: Snapshot, cfg: AnonymousConfig,
                     items: list[np.ndarray]) -> CatalogueScorer:
    """Catalogue logits of hold-out users from rows fitted to their training items."""
    ho_users = snap.store.holdout.users
    position = {int(u): i for i, u in enumerate(ho_users.tolist())}
    cache: dict[int, np.ndarray] = {}
    cdf = negative_cdf(snap.store.item_counts, snap.n_items, cfg.alpha)

    def score(users: np.ndarray) -> np.ndarray:
        out = np.empty((len(users), snap.n_items), dtype=np.float32)
        for j, user in enumerate(users.tolist()):
            if user not in cache:
                row = fit_row(snap.model, items[position[user]], cfg, cdf)
                cache[user] = logits_of(snap, row).numpy()
            out[j] = cache[user]
        return out

    return score


def known_scorer(snap: Snapshot) -> CatalogueScorer:
    return lambda users: snap.model.score_matrix(torch.from_numpy(users)).numpy()


def means(values: dict[str, np.ndarray]) -> dict[str, float]:
    return {m: round(float(values[m].mean()), 4) for m in q.METRICS}


def select(split: q.Split, budget: q.Budget, cfg: dict[str, Any]) -> tuple[
        AnonymousConfig, list[dict[str, Any]]]:
    snap = fitted_snapshot(split, budget, cfg)
    items = sessions(snap)
    trials = []
    points = grid(cfg.get("negative_alpha", 0.0))
    for point in points:
        start = time.perf_counter()
        values = q.per_user([q.ranks(anonymous_scorer(snap, point, items), snap.store)])
        trials.append({"config": label(point), **means(values)})
        print(f"  validation {label(point)}: {trials[-1]} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    best = max(range(len(trials)), key=lambda i: trials[i][q.SELECT_METRIC])
    return points[best], trials


def test(split: q.Split, budget: q.Budget, cfg: dict[str, Any],
         chosen: AnonymousConfig) -> dict[str, Any]:
    snap = fitted_snapshot(split, budget, cfg)
    items = sessions(snap)
    other = dataclasses.replace(chosen, init="mean" if chosen.init == "zeros" else "zeros")
    values = {"known": q.per_user([q.ranks(known_scorer(snap), snap.store)])}
    for name, point in (("anonymous", chosen), ("anonymous_other_init", other)):
        values[name] = q.per_user([q.ranks(anonymous_scorer(snap, point, items), snap.store)])
    idx = q.resamples(len(snap.store.holdout.users))
    diff = {name: {m: [round(v, 4) for v in q.interval(values[name][m] - values["known"][m],
                                                        idx)] for m in q.METRICS}
            for name in ("anonymous", "anonymous_other_init")}
    return {
        "holdouts": len(snap.store.holdout.users), "items": snap.n_items,
        "session_items_median": int(np.median([len(i) for i in items])),
        "known": q.summary(values["known"], idx),
        "anonymous": {"config": label(chosen), **q.summary(values["anonymous"], idx)},
        "anonymous_other_init": {"config": label(other),
                                 **q.summary(values["anonymous_other_init"], idx)},
        "minus_known_ci": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--format")
    parser.add_argument("--quick", action="store_true", help="3M replay samples (default 20M)")
    parser.add_argument("--replay-samples", type=int)
    parser.add_argument("--poll", type=int, default=1000)
    parser.add_argument("--chosen", type=Path, default=q.CHOSEN)
    parser.add_argument("--defaults", action="store_true",
                        help="the stream at the daemon's defaults (no history input) instead "
                             "of the chosen configuration")
    args = parser.parse_args()
    torch.set_num_threads(2)
    budget = q.Budget(args.poll, args.replay_samples or (3_000_000 if args.quick else
                                                         20_000_000))
    cfg = {} if args.defaults else json.loads(args.chosen.read_text())["methods"]["stream"][
        "config"]
    events = read_events(args.data, args.format).events
    start = time.perf_counter()
    chosen, trials = select(q.Split.of(q.drop_newest(events)), budget, cfg)
    print(f"chose {label(chosen)}", file=sys.stderr)
    result = test(q.Split.of(events), budget, cfg, chosen)
    print(json.dumps({"data": Path(args.data).name, "stream": cfg,
                      "replay_samples": budget.replay_samples, "chosen": label(chosen),
                      "validation": trials, "test": result,
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
