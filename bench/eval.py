"""Evaluation cost, and what it costs training: HR@K/NDCG@K at 100k users x 100k items.

    python bench/eval.py [--quick]

A synthetic stream with 100k users and 100k items is ingested and the model
trained briefly. Then, in one run:

* the sampled protocol (99 negatives) for 100k hold-outs (``--quick``: 20k,
  scaled to 100k) and the exact full-catalogue protocol for as many hold-outs
  as the default budget allows, scaled to 100k users (one forward pass per
  (user, item): 10^10 of them at this size);
* the training rate (samples/s) of the engine loop the daemon runs
  (:class:`ncf_stream.engine.Engine`) replaying on an idle stream, without an
  evaluation and while the engine's evaluator thread evaluates back to back
  (throttled to ``eval_duty``, as in the daemon). Replay runs at
  ``replay_duty=1`` here, the worst case for the evaluator's share.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.engine import Engine
from ncf_stream.evaluate import full_ranks, sampled_ranks
from ncf_stream.evaluator import EvalConfig, catalogue_scorer, snapshot_scorer
from ncf_stream.settings import Settings
from ncf_stream.source import MemorySource
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.threads import background_thread

USERS = ITEMS = 100_000


def train_rate(engine: Engine, seconds: float) -> float:
    """Samples/s of the engine's own loop over ``seconds`` of an idle stream."""
    trainer = engine.trainer
    before, start = trainer.samples_trained, time.perf_counter()
    engine.run(until=lambda: time.perf_counter() - start >= seconds)
    return (trainer.samples_trained - before) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    events = 1_000_000 if args.quick else 3_000_000
    stream = generate(SynthConfig(users=USERS, items=ITEMS, events=events, seed=0, topics=100))
    settings = Settings(device="cpu", checkpoint_dir=None, replay_duty=1.0, holdout_fraction=1.0,
                        eval_interval_s=0.01, eval_max_users=10_000)
    engine = Engine(settings, MemorySource(stream.to_events(), batch_size=262_144))
    engine.run(until=lambda: engine.counters.consumed == events and not engine.trainer.pending)
    train_rate(engine, 3.0)
    snap = engine.holder.get()
    assert snap is not None
    n_holdouts = len(snap.store.holdout.users)
    rng = np.random.default_rng(0)

    n_sampled = min(n_holdouts, 20_000 if args.quick else 100_000)
    rows = rng.permutation(n_holdouts)[:n_sampled]
    start = time.perf_counter()
    sampled_ranks(snapshot_scorer(snap), snap.store, rows)
    sampled_s = (time.perf_counter() - start) * 100_000 / n_sampled

    budget = EvalConfig().full_max_pairs
    n_full = max(1, budget // snap.n_items)
    start = time.perf_counter()
    full_ranks(catalogue_scorer(snap), snap.store, rows[:n_full], catalogue_scorer=True)
    full_s = time.perf_counter() - start
    print(f"{n_holdouts:,} hold-outs, {snap.n_items:,} items; sampled {sampled_s:.1f} s per 100k "
          f"users; full {full_s:.1f} s for {n_full} users", file=sys.stderr)

    seconds = 10.0 if args.quick else 30.0
    # As in the daemon: training and evaluation are background work (SCHED_IDLE).
    background_thread("idle")
    alone = train_rate(engine, seconds)
    engine.evaluator.start()  # back to back: eval_interval_s is 0.01
    during = train_rate(engine, seconds)
    engine.close(final_checkpoint=False)
    evaluator = engine.evaluator
    print(json.dumps({
        "users": n_holdouts, "items": snap.n_items,
        "eval_seconds_sampled": round(sampled_s, 2),
        "eval_seconds_full": round(full_s * 100_000 / n_full, 1),
        "full_users_in_default_budget": n_full,
        "full_seconds_for_default_budget": round(full_s, 2),
        "train_samples_per_s_alone": round(alone), "train_samples_per_s_during_eval": round(
            during),
        "train_rate_ratio_during_eval": round(during / alone, 3),
        "evaluations_during": len(evaluator.history),
        "eval_duty": evaluator.config.duty,
    }))


if __name__ == "__main__":
    main()
