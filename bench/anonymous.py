"""Anonymous requests' latency: a row fitted to the items against a known user's row.

    python bench/anonymous.py [--quick] [--sizes 10000,100000] [--queries N] [--profile TOML]

For each catalogue size: a synthetic stream is ingested and trained one pass
(the model need not be good for timing: a request's cost does not depend on its
weights), a snapshot published, and the engine's :class:`Recommender` built from
the settings (the defaults, or ``--profile``'s): the exact ranking at 10k items,
index candidates rescored at 100k (``exact_items`` 20k). Then, one query at a
time on one thread as a request thread computes (``reader_thread``), for a
sample of users, **interleaved** so both see the same machine:

* ``known``: ``recommend(user, 10)``;
* ``anonymous``: ``recommend_items(items, 10)`` with that user's own items
  (oldest first, at most 1,000): the same ranking work plus the fit;
* ``anonymous_max``: ``recommend_items`` with 1,000 items (the limit): the
  fit's worst case, every request at the largest batch.

Each is reported as p50 / p99 in ms, with ``added_p50_ms`` / ``added_p99_ms``
(anonymous minus known). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.anonymous import AnonymousConfig
from ncf_stream.recommend import Recommender
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.threads import reader_thread
from ncf_stream.trainer import Trainer, TrainerConfig

K = 10
MAX_ITEMS = 1000


def build(items: int, settings: Settings, events: int) -> tuple[Recommender, Trainer,
                                                                 dict[str, Any]]:
    stream = generate(SynthConfig(users=max(5000, items // 10), items=items, events=events,
                                  seed=0, topics=max(20, items // 2000)))
    trainer = Trainer(TrainerConfig.from_settings(settings), device="cpu")
    start = time.perf_counter()
    ev = stream.to_events()
    for lo in range(0, events, 262_144):
        trainer.ingest(ev.take(np.arange(lo, min(lo + 262_144, events))))
        while trainer.pending:
            trainer.step()
    holder = SnapshotHolder()
    publisher = Publisher(trainer, holder)
    publisher.publish(events)
    publisher.close()
    rec = Recommender(holder, settings.candidates, settings.max_k, settings.exact_items,
                      AnonymousConfig.from_settings(settings))
    return rec, trainer, {"build_seconds": round(time.perf_counter() - start, 1)}


def pct(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return 1000 * (time.perf_counter() - start)


def measure(rec: Recommender, trainer: Trainer, queries: int) -> dict[str, Any]:
    snap = rec.snapshot()
    rng = np.random.default_rng(1)
    users = rng.choice(snap.n_users, min(queries, snap.n_users), replace=False)
    ids = snap.user_ids.ids(users).tolist()
    sessions = []
    for row in users.tolist():
        rows, _ = snap.store.newest_first(row)
        sessions.append(snap.item_ids.ids(rows[:MAX_ITEMS][::-1]).tolist())
    longest = snap.item_ids.ids(rng.choice(snap.n_items, MAX_ITEMS, replace=False)).tolist()
    for i in range(5):  # warm-up: first calls allocate
        rec.recommend(ids[i], K), rec.recommend_items(sessions[i], K)
    known, anon, anon_max = [], [], []
    for user, session in zip(ids, sessions, strict=True):
        known.append(timed(lambda u=user: rec.recommend(u, K)))
        anon.append(timed(lambda s=session: rec.recommend_items(s, K)))
        anon_max.append(timed(lambda: rec.recommend_items(longest, K)))
    k, a = pct(known), pct(anon)
    return {"items": snap.n_items, "users": snap.n_users, "queries": len(ids),
            "path": "exact" if snap.n_items <= rec.exact_items else "candidates",
            "session_items_median": int(np.median([len(s) for s in sessions])),
            "known": k, "anonymous": a, "anonymous_max": pct(anon_max),
            "added_p50_ms": round(a["p50_ms"] - k["p50_ms"], 3),
            "added_p99_ms": round(a["p99_ms"] - k["p99_ms"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 queries per size")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, help="users asked per size (default 2000)")
    parser.add_argument("--profile", type=Path, help="a settings TOML (deploy/quality.toml)")
    args = parser.parse_args()
    settings = Settings.load(args.profile)
    reader_thread()
    queries = args.queries or (300 if args.quick else 2000)
    out: dict[str, Any] = {
        "settings": {k: getattr(settings, k) for k in (
            "factors", "history_length", "anonymous_steps", "anonymous_lr",
            "anonymous_negatives", "anonymous_init", "exact_items", "candidates")},
        "sizes": []}
    for size in map(int, args.sizes.split(",")):
        rec, trainer, info = build(size, settings, max(200_000, 3 * size))
        result = {**measure(rec, trainer, queries), **info}
        print(json.dumps(result), file=sys.stderr)
        out["sizes"].append(result)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
