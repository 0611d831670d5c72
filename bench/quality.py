"""Recommendation quality: the streaming model against batch baselines on one split.

    python bench/quality.py DATA [--quick] [--replay-seconds S] [--format F]

Replays a ratings file in time order through the engine loop the daemon runs
(:class:`ncf_stream.engine.Engine`, default settings, an in-memory source
instead of Kafka): polls of ``--poll`` events are ingested and trained as they
come, then the stream is idle and the engine replays at ``replay_duty`` until
``--replay-samples`` training samples (positives and negatives) have been
replayed in the idle phase; wall time is reported beside the budget. The split
is the store's own rolling hold-out at the end: each user's newest interaction
(users with >= 2), never trained on.

On the same split, in the same run: popularity, EASE (Steck 2019, closed
form, best of a small lambda grid on this split), implicit's ALS (best of a
small grid; each metric taken at its own best setting) and NeuMF trained
offline for 20 epochs with the same model code,
once with this project's RowAdagrad and once with lazy Adam (the paper's
optimizer). Baselines are tuned on the evaluation split itself, which only
makes them stronger than they would be in practice.

Metrics: HR@10 and NDCG@10 against the 99 evaluation negatives (ties count
against the held-out item) and over the full catalogue (rank among all items
the user has not touched). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.engine import Engine
from ncf_stream.evaluate import Scorer, evaluate
from ncf_stream.readers import read_events
from ncf_stream.settings import Settings
from ncf_stream.source import MemorySource
from ncf_stream.store import StoreView
from ncf_stream.trainer import Trainer, TrainerConfig

Result = dict[str, float]


def summarize(scorer: Scorer, view: StoreView) -> Result:
    r = evaluate(scorer, view, ks=(10,))
    return {"hr10": r["sampled"].hr[10], "ndcg10": r["sampled"].ndcg[10],
            "full_hr10": r["full"].hr[10], "full_ndcg10": r["full"].ndcg[10]}


def stream(events, poll: int, replay_samples: int) -> tuple[Engine, dict[str, float]]:
    """The daemon's loop over the file: consume and train, then idle replay for a budget."""
    settings = Settings(device="cpu", checkpoint_dir=None)
    engine = Engine(settings, MemorySource(events, batch_size=poll))
    trainer = engine.trainer
    start = time.perf_counter()
    engine.run(until=lambda: engine.counters.consumed == len(events) and not trainer.pending)
    pass_s, samples_pass = time.perf_counter() - start, trainer.samples_trained
    start = time.perf_counter()
    engine.run(until=lambda: trainer.samples_trained - samples_pass >= replay_samples)
    engine.close()
    return engine, {"pass_seconds": pass_s, "replay_seconds": time.perf_counter() - start,
                    "samples_in_pass": samples_pass, "samples_total": trainer.samples_trained}


def train_matrix(trainer: Trainer) -> sp.csr_matrix:
    users, items = trainer.store.training_pairs()
    shape = (trainer.store.n_users, trainer.store.n_items)
    return sp.csr_matrix((np.ones(len(users), np.float32), (users, items)), shape=shape)


def popularity(x: sp.csr_matrix) -> Scorer:
    counts = np.asarray(x.sum(axis=0)).ravel()
    return lambda users, items: counts[items]


def ease(x: sp.csr_matrix, lam: float) -> Scorer:
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = sla.cho_solve(sla.cho_factor(gram, check_finite=False), np.eye(len(gram)),
                      check_finite=False)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    b = b.astype(np.float32)

    def score(users: np.ndarray, items: np.ndarray) -> np.ndarray:
        full = np.asarray(x[users] @ b)
        return np.take_along_axis(full, items, axis=1)

    return score


def als(x: sp.csr_matrix, factors: int, reg: float, alpha: float) -> Scorer:
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=factors, regularization=reg, alpha=alpha,
                                    iterations=15, random_state=0)
    model.fit(x, show_progress=False)
    uf, itf = np.asarray(model.user_factors), np.asarray(model.item_factors)
    return lambda users, items: np.take_along_axis(uf[users] @ itf.T, items, axis=1)


def offline_neumf(events, cfg: TrainerConfig, epochs: int) -> tuple[Trainer, float]:
    """The same model code, trained in epochs over the training pairs (no stream)."""
    trainer = Trainer(replace(cfg, replay=False))
    trainer.ingest(events)  # builds the same store and hold-out split; trains nothing
    users, items = trainer.store.training_pairs()
    per_step = cfg.positives_per_step
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(users))
        for lo in range(0, len(order), per_step):
            sel = order[lo: lo + per_step]
            trainer.train_pairs(users[sel], items[sel])
    return trainer, time.perf_counter() - start


def best(results: dict[str, Result]) -> tuple[str, Result]:
    name = max(results, key=lambda k: results[k]["hr10"])
    return name, results[name]


def timed(label: str, fn: Callable[[], Result]) -> Result:
    start = time.perf_counter()
    out = fn()
    print(f"  {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in out.items())
          + f" ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--format")
    parser.add_argument("--quick", action="store_true",
                        help="3M samples of idle replay, one setting per baseline")
    parser.add_argument("--replay-samples", type=int,
                        help="training samples replayed once the stream is idle "
                             "(default 20M, --quick 3M)")
    parser.add_argument("--poll", type=int, default=1000, help="events per poll of the stream")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    replay_samples = args.replay_samples or (3_000_000 if args.quick else 20_000_000)

    events = read_events(args.data, args.format).events
    engine, timing = stream(events, args.poll, replay_samples)
    trainer = engine.trainer
    cfg = trainer.cfg
    print(f"{len(events):,} events; streamed with {cfg}", file=sys.stderr)
    view = trainer.store.view()
    print(f"pass {timing['pass_seconds']:.1f} s, replay {timing['replay_seconds']:.1f} s; "
          f"{len(view.holdout.users)} hold-outs, {view.n_items} items", file=sys.stderr)
    trainer.model.eval()
    results = {"stream": timed("stream", lambda: summarize(trainer.scorer(), view))}

    x = train_matrix(trainer)
    lambdas = [500.0] if args.quick else [100.0, 250.0, 500.0, 1000.0]
    grid = [(64, 0.05, 10.0)] if args.quick else [
        (f, r, a) for f in (64, 128) for r in (0.01, 0.1) for a in (1.0, 10.0)]
    baselines: dict[str, Result] = {
        "popularity": timed("popularity", lambda: summarize(popularity(x), view))}
    ease_runs = {f"ease_l{lam:g}": timed(f"ease lambda={lam:g}",
                                         lambda lam=lam: summarize(ease(x, lam), view))
                 for lam in lambdas}
    als_runs = {f"als_f{f}_r{r:g}_a{a:g}": timed(
        f"als f={f} reg={r} alpha={a}", lambda f=f, r=r, a=a: summarize(als(x, f, r, a), view))
        for f, r, a in grid}
    for label, runs in (("ease", ease_runs), ("als", als_runs)):
        # Each metric at its own best setting: the strongest this family can be.
        baselines[label] = {m: max(r[m] for r in runs.values()) for m in next(iter(
            runs.values()))}
        baselines[label]["setting"] = best(runs)[0]  # type: ignore[assignment]
    for label, opt, lr in (("neumf_offline", "adagrad", cfg.lr),
                           ("neumf_offline_adam", "adam", 1e-3)):
        off, seconds = offline_neumf(events, replace(cfg, optimizer=opt, lr=lr), args.epochs)
        if not np.array_equal(off.user_ids.all_ids(), trainer.user_ids.all_ids()):
            raise RuntimeError("offline and stream runs disagree on ids")
        off.model.eval()
        baselines[label] = timed(f"{label} ({args.epochs} epochs, {seconds:.0f} s)",
                                 lambda off=off: summarize(off.scorer(), view))

    strongest = max(("ease", "als", "neumf_offline", "neumf_offline_adam", "popularity"),
                    key=lambda k: baselines[k]["hr10"])
    s = results["stream"]
    beats = {k: bool(s[k] > max(float(baselines[b][k]) for b in baselines))
             for k in ("hr10", "full_hr10")}
    print(json.dumps({
        "data": Path(args.data).name, "events": len(events),
        "holdouts": len(view.holdout.users), "items": view.n_items,
        "stream": {k: round(v, 4) for k, v in s.items()},
        "baselines": {k: {m: (round(v, 4) if isinstance(v, float) else v) for m, v in r.items()}
                      for k, r in baselines.items()},
        "strongest_baseline": strongest,
        "stream_beats_every_baseline": beats,
        "replay_samples": replay_samples,
        "replay_seconds": round(timing["replay_seconds"], 1),
        "pass_seconds": round(timing["pass_seconds"], 1),
        "samples_total": timing["samples_total"],
        "config": {"factors": cfg.model.factors, "mlp_layers": list(cfg.model.mlp_layers),
                   "lr": cfg.lr, "weight_decay": cfg.weight_decay, "negatives": cfg.negatives,
                   "fresh_share": cfg.fresh_share},
    }))


if __name__ == "__main__":
    main()
