"""The quick first evaluation at 100k items: how long until the first HR@10.

    python bench/first_eval.py [--quick] [--items 100000]

A synthetic stream (100k items, 20k users) is replayed through the engine
loop the daemon runs (:class:`ncf_stream.engine.Engine`, default settings, an
in-memory source), on a SCHED_IDLE thread with the daemon's trainer threads,
with the engine's evaluator thread started as the daemon starts it. Measured:

* from the first published snapshot that has a hold-out to the first report
  (the quick evaluation: ``first_users`` hold-outs, ``first_max_pairs`` for the
  full-catalogue ranking and for candidate recall): wall time, which must stay
  well within 30 s, and its compute time;
* the compute time of a regular evaluation (full budget) of the last
  snapshot, unthrottled, with and without candidate recall (``--quick`` skips
  both).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.engine import Engine
from ncf_stream.evaluator import EvalReport, Evaluator
from ncf_stream.settings import Settings
from ncf_stream.source import MemorySource
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.threads import background_thread, reader_thread, trainer_thread


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
    settings = Settings(device="cpu", checkpoint_dir=None)
    engine = Engine(settings, MemorySource(stream.to_events(),
                                           batch_size=settings.kafka_max_poll_records))
    background_thread(settings.background_policy)  # as the daemon's trainer thread
    trainer_thread(settings.trainer_threads)
    first_holdout: list[float] = []

    def published(_version: int) -> None:
        snap = engine.holder.get()
        if not first_holdout and snap is not None and len(snap.store.holdout.users):
            first_holdout.append(time.monotonic())

    engine.on_publish.append(published)
    evaluator = engine.evaluator
    evaluator.start()
    engine.run(until=lambda: evaluator.latest is not None)
    quick = evaluator.latest
    assert quick is not None and quick.quick
    waited = time.monotonic() - first_holdout[0]
    snap = engine.holder.get()
    assert snap is not None
    out: dict[str, object] = {
        "items": snap.n_items, "users": snap.n_users,
        "holdouts": len(snap.store.holdout.users), "eval_duty": evaluator.config.duty,
        "first_users": quick.users, "first_users_full": quick.users_full,
        "first_recall_users": quick.recall_users,
        "first_report_after_s": round(waited, 2),
        "first_wall_seconds": round(quick.seconds, 2),
        "first_compute_seconds": round(quick.compute_seconds, 3),
        "first_hr10_sampled": round(quick.sampled.hr[10], 4),
        "first_candidate_recall": quick.candidate_recall,
        "events_consumed_by_then": engine.counters.consumed,
    }
    engine.close(final_checkpoint=False)
    if not args.quick:
        regular: EvalReport = on_thread(lambda: evaluator.evaluate())
        no_recall = Evaluator(engine.holder, replace(evaluator.config, recall_users=0))
        without: EvalReport = on_thread(lambda: no_recall.evaluate())
        out.update({
            "regular_users": regular.users, "regular_users_full": regular.users_full,
            "regular_recall_users": regular.recall_users,
            "regular_compute_seconds": round(regular.compute_seconds, 2),
            "regular_compute_seconds_without_recall": round(without.compute_seconds, 2),
            "regular_candidate_recall": regular.candidate_recall,
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
