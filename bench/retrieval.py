"""Retrieval: index candidates + full rescoring against the exact full-catalogue ranking.

    python bench/retrieval.py [--quick] [--sizes 10000,100000,1000000]
                              [--profile deploy/quality.toml] [--max-samples N]
                              [--backend faiss|torch|auto|faiss,torch]

For each catalogue size: a synthetic stream is ingested and the model (the
defaults, or the settings of ``--profile``) trained until it converges: in
rounds of one pass's worth of samples, until its HR@10 (99 sampled negatives) on
a fixed set of up to 2,000 hold-outs rises by less than 0.002 over two rounds, or
``--max-samples`` (``--quick``: one 2M-sample round, not converged). A
snapshot is published (timed: weights copy + index build); then for a sample
of users, in one run:

* recall@10 of the candidate path (top C by the retrieval inner product: GMF exact,
  MLP to first order; rescored by the
  full NeuMF) against the exact top 10 of the full NeuMF over the catalogue,
  for several C;
* p50 and p99 latency per query of both paths (one query at a time, as a
  request would), and their ratio.

Similar items (``/v1/similar``, :mod:`ncf_stream.similar`), for a sample of
items (``similar``): the served exact ranking's latency, the time to compute an
index's similarity space (paid by the first request on each index), and, for
the alternative that is not served, recall@10 against the exact ranking of the
recommendation index's top C for the query S v_i, rescored exactly.

What a request gets with the default settings is reported as ``served``: the
exact ranking while the catalogue has at most ``exact_items`` items (recall 1 by
construction; its cost is the exact path's), the candidate path at the default C
above that. ``candidates_for_recall_0_95`` is the smallest C tried whose recall@10
is >= 0.95 at every size (and backend) served from candidates.

``--backend`` is the setting ``retrieval_backend`` for the index (default: the
profile's, "auto" unless set): faiss, torch (the exact top-k as torch matrix
products, on CUDA when torch sees one), or a comma-separated list, each measured
on the same trained model per size (a publish each). Every size then has one
entry per backend, with ``retrieval_backend`` (as resolved), ``index`` and
``index_device``; similar items are measured with the first backend only (they
read the vectors every backend keeps). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.evaluate import sampled_ranks
from ncf_stream.recommend import best, exact_top_k, top_k
from ncf_stream.retrieval import IndexConfig
from ncf_stream.settings import Settings, default
from ncf_stream.similar import similar_space, top_similar
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.synth import SynthConfig, generate
from ncf_stream.trainer import Trainer, TrainerConfig

CANDIDATES = (200, 400, 800, 1600, 3200)
CANDIDATES_DEFAULT = default("candidates")  # p50/p99 of the candidate path are at this C
CONVERGED = 0.002  # HR@10 rising by less than this over two rounds
EVAL_USERS = 2000  # the full-catalogue HR would cost a 100k-item catalogue per user


def build(items: int, settings: Settings, rounds: Rounds, device: str,
          seed: int = 0) -> tuple[Trainer, dict[str, Any]]:
    events = max(200_000, 3 * items)
    stream = generate(SynthConfig(users=max(5000, items // 10), items=items, events=events,
                                  seed=seed, topics=max(20, items // 2000)))
    cfg = TrainerConfig.from_settings(settings.model_copy(update={"holdout_fraction": 1.0}))
    trainer = Trainer(cfg, device=device)
    ev = stream.to_events()
    for lo in range(0, events, 262_144):
        trainer.ingest(ev.take(np.arange(lo, min(lo + 262_144, events))))
    start = time.perf_counter()
    curve = converge(trainer, rounds.size or trainer.pending * (1 + cfg.negatives), rounds.most)
    fit = {"train_samples": trainer.samples_trained, "train_seconds": round(
        time.perf_counter() - start, 1),
        "hr10_by_round": curve, "converged": len(curve) >= 3 and curve[-1] - curve[-3] < CONVERGED}
    return trainer, fit


@dataclass(frozen=True)
class Rounds:
    size: int | None  # samples per round; None: one pass over the stream's positives
    most: int  # samples in all


def converge(trainer: Trainer, round_samples: int, most: int) -> list[float]:
    """Train in rounds until HR@10 on a fixed sample of hold-outs rises by less than
    CONVERGED over two rounds, or ``most`` samples; the HR@10 after each round."""
    view = trainer.store.view()
    rows = np.random.default_rng(2).permutation(len(view.holdout.users))[:EVAL_USERS]
    curve: list[float] = []
    while trainer.samples_trained < most:
        target = min(most, trainer.samples_trained + round_samples)
        while trainer.samples_trained < target:
            trainer.step()
        curve.append(round(float(np.mean(sampled_ranks(trainer.scorer(), view, rows) < 10)), 4))
        print(f"  {trainer.samples_trained:,} samples: HR@10 {curve[-1]}", file=sys.stderr)
        if len(curve) >= 3 and curve[-1] - curve[-3] < CONVERGED:
            break
    return curve


def latencies(fn, users: np.ndarray) -> np.ndarray:
    out = []
    for u in users.tolist():
        start = time.perf_counter()
        fn(u)
        out.append(time.perf_counter() - start)
    return np.array(out) * 1000


def measure(items: int, settings: Settings, rounds: Rounds, n_users: int, device: str,
            backends: list[str]) -> list[dict[str, Any]]:
    """One trained model per size; each backend's index measured on it in turn."""
    trainer, fit = build(items, settings, rounds, device)
    return [measure_index(trainer, fit, items, settings.model_copy(
        update={"retrieval_backend": backend}), n_users, device, similar=i == 0)
        for i, backend in enumerate(backends)]


def measure_index(trainer: Trainer, fit: dict[str, Any], items: int, settings: Settings,
                  n_users: int, device: str, similar: bool) -> dict[str, Any]:
    # The index as the profile configures it (nprobe, ivf_threshold, retrieval_backend), as
    # the daemon builds it.
    publisher = Publisher(trainer, SnapshotHolder(), IndexConfig.from_settings(settings))
    start = time.perf_counter()
    publisher.publish(0)
    first_publish = time.perf_counter() - start
    trainer.step()
    start = time.perf_counter()
    publisher.publish(1)  # a later publish: an IVF index is refreshed in the background
    publish = time.perf_counter() - start
    snap = publisher.holder.get()
    assert snap is not None
    rng = np.random.default_rng(1)
    users = rng.choice(snap.n_users, n_users, replace=False)
    exact = {u: exact_top_k(snap, u, 10)[0] for u in users.tolist()}
    recall = {}
    for c in CANDIDATES:
        hits = [len(np.intersect1d(top_k(snap, u, 10, c)[0], exact[u])) for u in users.tolist()]
        recall[c] = float(np.mean(hits)) / 10
    cand_ms = latencies(lambda u: top_k(snap, u, 10, CANDIDATES_DEFAULT), users)
    exact_ms = latencies(lambda u: exact_top_k(snap, u, 10), users)
    sample = rng.choice(snap.index.size, n_users, replace=False)
    similar_items = measure_similar(snap, sample) if similar else None
    publisher.close()
    exact = items <= default("exact_items")
    served_ms = exact_ms if exact else cand_ms
    return {
        "items": items, "device": device, "retrieval_backend": snap.index.backend,
        "index": snap.index.kind, "index_device": snap.index.device,
        "served": "exact" if exact else "candidates",
        "served_recall_at_10": 1.0 if exact else round(recall[CANDIDATES_DEFAULT], 4),
        "served_p50_ms": round(float(np.percentile(served_ms, 50)), 3),
        "served_p99_ms": round(float(np.percentile(served_ms, 99)), 3),
        "recall_by_candidates": {str(c): round(r, 4) for c, r in recall.items()},
        "p50_ms": round(float(np.percentile(cand_ms, 50)), 3),
        "p99_ms": round(float(np.percentile(cand_ms, 99)), 3),
        "exact_p50_ms": round(float(np.percentile(exact_ms, 50)), 3),
        "exact_p99_ms": round(float(np.percentile(exact_ms, 99)), 3),
        "speedup_p50": round(float(np.percentile(exact_ms, 50) / np.percentile(cand_ms, 50)), 1),
        **fit, "publish_seconds": round(publish, 3),
        "first_publish_seconds": round(first_publish, 3), "similar": similar_items,
    }


def index_candidates(snap, row: int, c: int) -> np.ndarray:
    """The alternative not served: the recommendation index's top ``c`` for S v_i (the
    similarity times each candidate's norm), rescored by the exact similarity."""
    space = similar_space(snap)
    _, found = snap.index.search((space.metric @ snap.index.vectors[row])[None, :], c + 1)
    cand = np.sort(found[0][(found[0] >= 0) & (found[0] != row)])
    return best(cand, space.unit[cand] @ space.unit[row], 10)[0]


def measure_similar(snap, rows: np.ndarray) -> dict[str, object]:
    """The served (exact) similar items' cost; recall@10 of index candidates against it."""
    none = np.empty(0, dtype=np.int64)
    start = time.perf_counter()
    similar_space(snap)
    space_s = time.perf_counter() - start
    exact = {r: top_similar(snap, r, 10, none)[0] for r in rows.tolist()}
    recall = {c: float(np.mean([len(np.intersect1d(index_candidates(snap, r, c), exact[r]))
                                for r in rows.tolist()])) / 10 for c in CANDIDATES}
    served_ms = latencies(lambda r: top_similar(snap, r, 10, none), rows)
    return {
        "served": "exact", "served_recall_at_10": 1.0,
        "served_p50_ms": round(float(np.percentile(served_ms, 50)), 3),
        "served_p99_ms": round(float(np.percentile(served_ms, 99)), 3),
        "space_seconds": round(space_s, 3),
        "index_candidates_recall_at_10": {str(c): round(r, 4) for c, r in recall.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated catalogue sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model trains and scores (the index: --backend)")
    parser.add_argument("--profile", help="a settings file (TOML) for the model, e.g. "
                                          "deploy/quality.toml; default: the defaults")
    parser.add_argument("--max-samples", type=float, default=200e6,
                        help="the most training samples per catalogue size")
    parser.add_argument("--backend", help="retrieval_backend: faiss, torch, auto, or a "
                                          "comma-separated list measured on the same model; "
                                          "default: the profile's setting")
    args = parser.parse_args()
    torch.set_num_threads(2)
    sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes
             else [10_000, 100_000, 1_000_000])
    settings = Settings.load(args.profile)
    backends = (args.backend or settings.retrieval_backend).split(",")
    for backend in backends:  # a bad name refused before minutes of training, not after
        IndexConfig(retrieval_backend=backend)
    rounds, n_users = ((Rounds(2_000_000, 2_000_000), 60) if args.quick
                       else (Rounds(None, int(args.max_samples)), 300))
    results = []
    for items in sizes:
        for r in measure(items, settings, rounds, n_users, args.device, backends):
            print(json.dumps(r), file=sys.stderr)
            results.append(r)
    from_index = [r for r in results if r["served"] == "candidates"]
    chosen = next((c for c in CANDIDATES
                   if all(r["recall_by_candidates"][str(c)] >= 0.95 for r in from_index)), None)
    print(json.dumps({"profile": args.profile or "defaults",
                      "retrieval_backend": ",".join(backends), "sizes": results,
                      "candidates_for_recall_0_95": chosen}))


if __name__ == "__main__":
    main()
