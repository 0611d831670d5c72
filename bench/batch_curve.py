"""Quality against batch size at an equal number of samples (issue #21's throughput/quality curve).

    python bench/batch_curve.py DATA [--batches 8192,65536,262144,1048576] [--seeds 3]
                                [--replay-samples N] [--quick]

A GPU trains fast only with large batches (launch overhead caps 8k batches far
below the issue's 25M samples/s), and a larger batch takes fewer, larger steps
over the same samples. This measures what that costs in quality, so a speed
figure is never bought with accuracy unseen.

The model is the one the GPU target is stated for, the paper's NeuMF: ``factors``
32, ``mlp_layers`` 64-32-16, BCE with 4 negatives per positive, the history input
off; every other setting at the daemon's default. The stream is
bench/quality.py's (the engine loop over the file, then idle replay to the sample
budget), with polls of one step's positives (at least 1,000 events), so a large
batch trains full fresh steps rather than a few fresh positives among replayed
ones.

Protocol, as bench/quality.py's:

* **Selection.** Per batch size, the row ``lr`` from the grid below on the
  validation split (each user's newest event removed), seed 0, kept by full
  NDCG@10. Step size is what a batch size changes most: a row's gradient sums
  over its samples in the batch, and there are fewer steps.
* **Test.** The whole file, each batch size at its chosen ``lr``, seeds
  0..S-1, each user's hit averaged over seeds; 10,000 paired bootstrap resamples
  of users give 95% intervals of each batch size minus the smallest. Inside its
  interval a difference is a tie.

``lr`` grid: 0.02, 0.05, 0.1. ``--quick``: batches 8192 and 65536, 3M samples,
``lr`` 0.05 without selection, one seed: a smoke test.

The samples/s column is this machine's trainer in the engine loop (CPU here); the
GPU's figures come from bench/gpu.sh. The last line of stdout is one JSON object:
``curve`` with one entry per batch size (``batch_size``, ``lr``, the four metrics
with ``_ci``, ``diff_ci`` against the smallest, ``samples_total``,
``samples_per_s``), ``seeds``, ``replay_samples``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import (
    METRICS,
    SELECT_METRIC,
    SELECT_SEED,
    Budget,
    Split,
    drop_newest,
    fit_and_rank,
    fit_stream,
    interval,
    per_user,
    resamples,
    summary,
)

from ncf_stream.readers import read_events

PAPER = {"factors": 32, "mlp_layers": [64, 32, 16], "negatives": 4, "loss": "bce",
         "history_length": 0}
LR_GRID = (0.02, 0.05, 0.1)
BATCHES = (8192, 65536, 262144, 1048576)


def budget_for(batch: int, replay_samples: int) -> Budget:
    """Polls of one step's positives (at least 1,000 events, bench/quality.py's poll)."""
    return Budget(max(1000, batch // (1 + PAPER["negatives"])), replay_samples)


def run(split: Split, batch: int, lr: float, seed: int, replay_samples: int,
        ) -> tuple[Any, dict[str, Any]]:
    cfg = {**PAPER, "batch_size": batch, "lr": lr}
    budget = budget_for(batch, replay_samples)
    start = time.perf_counter()
    ranks, info = fit_and_rank(f"batch {batch}",
                               lambda s, c, sd: fit_stream(s, c, sd, budget), split, cfg, seed)
    info["wall_s"] = time.perf_counter() - start
    return ranks, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--format")
    parser.add_argument("--batches", help="comma-separated batch sizes (samples per step)")
    parser.add_argument("--seeds", type=int, help="test seeds (default 3, --quick 1)")
    parser.add_argument("--replay-samples", type=int,
                        help="samples replayed once idle (default 20M, --quick 3M)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else list(BATCHES[:2] if args.quick else BATCHES))
    n_seeds = args.seeds or (1 if args.quick else 3)
    if n_seeds < 3 and not args.quick:
        parser.error("--seeds >= 3 (fewer only with --quick)")
    samples = args.replay_samples or (3_000_000 if args.quick else 20_000_000)
    events = read_events(args.data, args.format).events
    start = time.perf_counter()

    chosen: dict[int, float] = {}
    validation: dict[int, list[dict[str, float]]] = {}
    if args.quick:
        chosen = dict.fromkeys(batches, 0.05)
    else:
        val = Split.of(drop_newest(events))
        for batch in batches:
            trials = [{"lr": lr, **{m: round(float(v), 4) for m, v in run(
                val, batch, lr, SELECT_SEED, samples)[1].items() if m in METRICS}}
                for lr in LR_GRID]
            validation[batch] = trials
            chosen[batch] = max(trials, key=lambda t: t[SELECT_METRIC])["lr"]  # first of equals
            print(f"batch {batch}: chose lr {chosen[batch]}", file=sys.stderr)

    split = Split.of(events)
    idx = resamples(len(split.view.holdout.users))
    values, infos = {}, {}
    for batch in batches:
        runs, info = [], []
        for seed in range(n_seeds):
            r, i = run(split, batch, chosen[batch], seed, samples)
            runs.append(r)
            info.append(i)
        values[batch], infos[batch] = per_user(runs), info
    base = values[batches[0]]
    curve = []
    for batch in batches:
        fits = infos[batch]
        trained = sum(int(i["samples_total"]) for i in fits)
        curve.append({
            "batch_size": batch, "lr": chosen[batch], **summary(values[batch], idx),
            "diff_ci": {m: [round(v, 4) for v in interval(values[batch][m] - base[m], idx)]
                        for m in METRICS},
            "samples_total": [int(i["samples_total"]) for i in fits],
            "samples_per_s": round(trained / sum(i["pass_seconds"] + i["replay_seconds"]
                                                 for i in fits)),
            **({"validation": validation[batch]} if batch in validation else {}),
        })
    print(json.dumps({"data": Path(args.data).name, "model": PAPER, "curve": curve,
                      "seeds": list(range(n_seeds)), "replay_samples": samples,
                      "baseline_batch": batches[0],
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
