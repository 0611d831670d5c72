"""Evaluation cost, and what it costs training: HR@K/NDCG@K at 100k users x 100k items.

    python bench/eval.py [--quick]

A synthetic stream with 100k users and 100k items is ingested and the model
trained briefly. Then, in one run:

* the sampled protocol (99 negatives) for 100k hold-outs (``--quick``: 20k,
  scaled to 100k) and the exact full-catalogue protocol for as many hold-outs
  as the default budget allows, scaled to 100k users (one forward pass per
  (user, item): 10^10 of them at this size);
* the training rate (steps/s on this thread) without an evaluation, and while
  the evaluator runs throttled in its own thread, as the daemon runs it.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.evaluate import full_ranks, sampled_ranks
from ncf_stream.evaluator import (
    Cancelled,
    EvalConfig,
    Evaluator,
    catalogue_scorer,
    snapshot_scorer,
)
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.threads import background_thread, reader_thread
from ncf_stream.trainer import Trainer, TrainerConfig

USERS = ITEMS = 100_000


def train_rate(trainer: Trainer, seconds: float) -> float:
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    events = 1_000_000 if args.quick else 3_000_000
    stream = generate(SynthConfig(users=USERS, items=ITEMS, events=events, seed=0, topics=100))
    trainer = Trainer(TrainerConfig())
    ev = stream.to_events()
    for lo in range(0, events, 262_144):
        trainer.ingest(ev.take(np.arange(lo, min(lo + 262_144, events))))
    train_rate(trainer, 3.0)
    holder = SnapshotHolder()
    Publisher(trainer, holder).publish(events)
    snap = holder.get()
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
    # Both as in the daemon: training and evaluation are background work (SCHED_IDLE).
    background_thread("idle")
    alone = train_rate(trainer, seconds)
    evaluator = Evaluator(holder, EvalConfig(max_users=10_000))
    done = threading.Event()

    def evaluate_repeatedly() -> None:
        reader_thread()  # as the daemon's evaluator thread does
        background_thread("idle")
        with contextlib.suppress(Cancelled):
            while not done.is_set():
                evaluator.evaluate(throttle=True)

    thread = threading.Thread(target=evaluate_repeatedly, daemon=True)
    thread.start()
    during = train_rate(trainer, seconds)
    done.set()
    evaluator.stop()
    thread.join()
    print(json.dumps({
        "users": n_holdouts, "items": snap.n_items,
        "eval_seconds_sampled": round(sampled_s, 2),
        "eval_seconds_full": round(full_s * 100_000 / n_full, 1),
        "full_users_in_default_budget": n_full,
        "full_seconds_for_default_budget": round(full_s, 2),
        "train_steps_per_s_alone": round(alone, 2), "train_steps_per_s_during_eval": round(
            during, 2),
        "train_rate_ratio_during_eval": round(during / alone, 3),
        "evaluations_during": len(evaluator.history),
        "eval_duty": evaluator.config.duty,
    }))


if __name__ == "__main__":
    main()
