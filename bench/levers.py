"""Stream levers on the validation split only: one run per configuration, no test split.

    python bench/levers.py DATA --config '{"lr": 0.1}' [--config ...] [--seed S]
                           [--replay-samples N] [--poll N] [--out runs.jsonl] [--quick]

Each ``--config`` is a JSON object of ``Settings`` overrides laid over the stream's
chosen configuration (``bench/chosen.json``, or ``--base``); ``{}`` is that
configuration itself; a ``"seed"`` key overrides ``--seed`` for that run. Every run
streams the selection split of bench/quality.py (each user's newest event removed,
so the hold-out is the second-newest: validation) through the engine, then idle
replay to the sample budget, and prints the validation sampled HR@10, full HR@10
and full NDCG@10 with its wall time. The test split is never read: this is for
deciding what to put into ``GRIDS["stream"]``, which ``--select`` then searches
like every other method's grid. One JSON line per run on stdout (``--quick``: the
base configuration alone at 3M samples, a smoke test); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import CHOSEN, SELECT_SEED, Budget, Split, drop_newest, fit_and_rank, fit_stream

from ncf_stream.readers import read_events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--format")
    parser.add_argument("--config", action="append", default=[],
                        help="JSON Settings overrides on top of the base (repeatable)")
    parser.add_argument("--base", type=Path, default=CHOSEN,
                        help="chosen.json whose stream config the overrides apply to")
    parser.add_argument("--seed", type=int, default=SELECT_SEED)
    parser.add_argument("--replay-samples", type=int,
                        help="training samples replayed once idle (default 20M, --quick 3M)")
    parser.add_argument("--poll", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="append one JSON line per run here")
    parser.add_argument("--quick", action="store_true", help="3M samples, the base config only")
    args = parser.parse_args()
    torch.set_num_threads(2)

    base = json.loads(args.base.read_text())["methods"]["stream"]["config"]
    budget = Budget(args.poll, args.replay_samples or (3_000_000 if args.quick else 20_000_000))
    split = Split.of(drop_newest(read_events(args.data, args.format).events))
    print(f"validation: {len(split.events):,} events, {len(split.view.holdout.users)} "
          f"hold-outs; base {base}", file=sys.stderr)
    for text in ["{}"] if args.quick else args.config or ["{}"]:
        overrides = json.loads(text)
        seed = overrides.pop("seed", args.seed)  # a run's own seed, for the noise check
        cfg = {**base, **overrides}
        start = time.perf_counter()
        _, info = fit_and_rank("stream", lambda s, c, seed: fit_stream(s, c, seed, budget),
                               split, cfg, seed)
        row = {"overrides": overrides, "seed": seed, "replay_samples": budget.replay_samples,
               "hr10": round(info["hr10"], 4), "full_hr10": round(info["full_hr10"], 4),
               "full_ndcg10": round(info["full_ndcg10"], 4),
               "wall_s": round(time.perf_counter() - start, 1),
               "samples_total": int(info["samples_total"])}
        print(json.dumps(row), flush=True)
        if args.out is not None:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
