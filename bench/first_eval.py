"""The quick first evaluation at 100k items: how long until the first HR@10.

    python bench/first_eval.py [--quick] [--items 100000]

A synthetic stream (100k items, 20k users) is ingested and the model trained
briefly; one snapshot is published. Then, as the daemon runs it (the
evaluator's thread: single-threaded kernels, SCHED_IDLE, default ``eval_duty``)
while the trainer keeps training on another thread:

* the quick first evaluation (``first_users`` hold-outs, ``first_max_pairs``
  for the full-catalogue ranking and for candidate recall): wall time, which
  must stay well within 30 s, and compute time;
* the compute time of a regular evaluation (full budget), unthrottled, with
  and without candidate recall (``--quick`` skips both).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.evaluator import EvalConfig, EvalReport, Evaluator
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.threads import background_thread, reader_thread
from ncf_stream.trainer import Trainer, TrainerConfig


def on_thread(fn):  # type: ignore[no-untyped-def]
    """Run ``fn`` as the daemon's evaluator thread runs: one kernel thread, SCHED_IDLE."""
    out: list[object] = []

    def run() -> None:
        reader_thread()
        background_thread("idle")
        out.append(fn())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--items", type=int, default=100_000)
    args = parser.parse_args()
    events = (6 if args.quick else 12) * args.items  # so nearly every item appears
    stream = generate(SynthConfig(users=20_000, items=args.items, events=events, seed=0,
                                  topics=max(20, args.items // 2000)))
    trainer = Trainer(TrainerConfig())
    ev = stream.to_events()
    for lo in range(0, events, 262_144):
        trainer.ingest(ev.take(np.arange(lo, min(lo + 262_144, events))))
    start = time.perf_counter()
    while time.perf_counter() - start < 2.0:
        trainer.step()
    holder = SnapshotHolder()
    publisher = Publisher(trainer, holder)
    publisher.publish(events)
    snap = holder.get()
    assert snap is not None

    # The trainer keeps going meanwhile, as in the daemon (both background work).
    done = threading.Event()

    def train() -> None:
        background_thread("idle")
        while not done.is_set():
            trainer.step()

    trainer_thread = threading.Thread(target=train, daemon=True)
    trainer_thread.start()
    evaluator = Evaluator(holder, EvalConfig())
    quick: EvalReport = on_thread(lambda: evaluator.evaluate(throttle=True, quick=True))
    out: dict[str, object] = {
        "items": snap.n_items, "users": snap.n_users,
        "holdouts": len(snap.store.holdout.users), "eval_duty": evaluator.config.duty,
        "first_users": quick.users, "first_users_full": quick.users_full,
        "first_recall_users": quick.recall_users,
        "first_wall_seconds": round(quick.seconds, 2),
        "first_compute_seconds": round(quick.compute_seconds, 3),
        "first_hr10_sampled": round(quick.sampled.hr[10], 4),
        "first_candidate_recall": quick.candidate_recall,
    }
    if not args.quick:
        regular: EvalReport = on_thread(lambda: evaluator.evaluate())
        no_recall = Evaluator(holder, EvalConfig(recall_users=0))
        without: EvalReport = on_thread(lambda: no_recall.evaluate())
        out.update({
            "regular_users": regular.users, "regular_users_full": regular.users_full,
            "regular_recall_users": regular.recall_users,
            "regular_compute_seconds": round(regular.compute_seconds, 2),
            "regular_compute_seconds_without_recall": round(without.compute_seconds, 2),
            "regular_candidate_recall": regular.candidate_recall,
        })
    done.set()
    trainer_thread.join()
    publisher.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
