"""One trainer against a group of two, on the same events, in one run.

    python bench/scale.py [--quick] [--data FILE] [--workers 1,2] [--replay-ratio R]
                          [--seeds S] [--sync-steps N] [--sync-every SECONDS]

Each configuration runs the daemon's engine loop (``ncf_stream.engine.Engine``)
in one process per trainer, each over its partitions' events (4 partitions,
keyed by user) from an in-memory source, the group kept in step over
torch.distributed (gloo on loopback: ``ncf_stream.group``). Every trainer trains
its fresh positives, then replays ``--replay-ratio`` times as many samples, so
every configuration trains the same number of samples in total. Then each
trainer evaluates its own users' hold-outs on its final snapshot, with the
daemon's evaluator (99 sampled negatives, and the full catalogue).

Reported per configuration: events/s (consumed events over the time to consume
them), trained samples/s per trainer and in total, the share of each trainer's
wall time spent in exchanges (waiting for the others included), bytes each
trainer sent per training step, and HR@10 over all users, each user's hit
averaged over ``--seeds`` training seeds (3; ``--quick`` 1). The difference
from the single trainer is a paired bootstrap over users (10,000 resamples); a
95% interval inside +-0.01 sampled HR@10 is equivalence. ``state_equal``: the
union of the group's stores is the single trainer's store (pairs with their
times, and hold-outs), and the shared tensors are identical on every trainer of
the group.

Two cores cannot show scaling: two trainers share them, so per-trainer rates
fall. Where more cores are available, run it there.

Data: a synthetic stream with planted structure (``ncf_stream.synth``), or
``--data`` (a ratings file). Last line: one JSON object, ``workers`` a list of
``{n, events_per_s, samples_per_s, sync_share, hr10, ...}``, and ``state_equal``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
TOPIC = "memory"
MARGIN = 0.01  # sampled HR@10: equivalence margin


def partition(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


# ---- one trainer (a process of its own) --------------------------------------------------------

def worker(spec_path: str) -> None:
    import torch

    from ncf_stream.engine import Engine
    from ncf_stream.evaluate import full_ranks, sampled_ranks
    from ncf_stream.evaluator import catalogue_scorer, snapshot_scorer
    from ncf_stream.events import Events
    from ncf_stream.settings import Settings
    from ncf_stream.source import MemorySource
    from ncf_stream.store import split_keys

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    with np.load(spec["events"], allow_pickle=False) as z:
        n = len(z["ts"])
        users, items, types = (np.empty(n, dtype=object) for _ in range(3))
        users[:], items[:], types[:] = z["users"].tolist(), z["items"].tolist(), "interaction"
        events = Events(users, items, z["ts"].astype(np.float64), np.ones(n), types)
    settings = Settings(**spec["settings"])
    engine = Engine(settings, lambda resume: MemorySource(events, batch_size=spec["poll"],
                                                          topic=TOPIC))
    consumed_at: list[float] = []

    def done() -> bool:
        if engine.positions.get((TOPIC, 0), 0) < n or engine.trainer.pending:
            return False
        if not consumed_at:
            consumed_at.append(time.perf_counter())
        return engine.trainer.replay_budget <= 0

    start = time.perf_counter()
    engine.run(until=done)
    wall = time.perf_counter() - start
    engine.publisher.publish(engine.watermark.value)  # everything trained, in one snapshot
    snap = engine.holder.get()
    assert snap is not None
    t = engine.trainer
    # Per user: the hold-out's sampled and full hit at 10, by external id (paired later).
    rows = np.arange(len(snap.store.holdout.users))  # positions in the hold-out
    sampled = sampled_ranks(snapshot_scorer(snap), snap.store, rows, 99, seed=0)
    full = full_ranks(catalogue_scorer(snap), snap.store, rows, catalogue_scorer=True)
    ids = t.user_ids.ids(snap.store.holdout.users).tolist()
    hits = {u: [int(s < 10), int(f < 10)] for u, s, f in
            zip(ids, sampled.tolist(), full.tolist(), strict=True)}
    keys, vals = t.store._pairs.arrays()
    pu, pi = split_keys(keys)
    t0 = t.store._t0 or 0.0
    pairs = zip(t.user_ids.ids(pu).tolist(), t.item_ids.ids(pi).tolist(), vals.tolist(),
                strict=True)
    ho = t.store.holdout()
    holdouts = zip(t.user_ids.ids(ho.users).tolist(), t.item_ids.ids(ho.items).tolist(),
                   strict=True)
    registry = engine.metrics.registry
    m = t.model

    def digest(x: torch.Tensor) -> str:
        return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

    out = {
        "rank": settings.group_rank, "events": n, "wall_s": wall,
        "consume_s": (consumed_at[0] if consumed_at else time.perf_counter()) - start,
        "samples": t.samples_trained, "steps": t.steps, "hits": hits,
        "exchange_s": registry.get_sample_value("ncf_stream_group_exchange_seconds_sum") or 0.0,
        "exchange_bytes": registry.get_sample_value("ncf_stream_group_exchange_bytes_total")
        or 0.0,
        # Order-free digests: a group's union is the sum of its trainers' (mod 2^64).
        "pairs_digest": _set_digest(f"{u}|{i}|{v + t0:.0f}" for u, i, v in pairs),
        "holdouts_digest": _set_digest(f"{u}|{i}" for u, i in holdouts),
        "shared": [digest(m.items.weight[: m.n_items]),
                   digest(torch.nn.utils.parameters_to_vector(m.tower.parameters()))],
    }
    engine.close()
    Path(spec["out"]).write_text(json.dumps(out))


def _set_digest(strings: Any) -> int:
    total = 0
    for s in strings:
        total += int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")
    return total % (1 << 64)


# ---- the comparison ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(tmp: Path, events: Any, n: int, settings: dict[str, Any],
               poll: int) -> list[dict[str, Any]]:
    owner = np.array([partition(u) % n for u in events.users.tolist()])
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for r in range(n):
        part = events.take(np.flatnonzero(owner == r))
        path = tmp / f"n{n}-r{r}"
        np.savez(f"{path}.npz", users=np.array(part.users.tolist(), dtype=str),
                 items=np.array(part.items.tolist(), dtype=str), ts=part.ts)
        spec = {"events": f"{path}.npz", "out": f"{path}.json", "poll": poll,
                "threads": max(1, (os.cpu_count() or 1) // n),
                "settings": {**settings, "group_size": n, "group_rank": r,
                             "group_address": address}}
        Path(f"{path}.spec.json").write_text(json.dumps(spec))
        procs.append((subprocess.Popen(
            [sys.executable, __file__, "--worker", f"{path}.spec.json"],
            env={**os.environ, "PYTHONPATH": str(ROOT)}), path))
    for proc, _ in procs:
        if proc.wait() != 0:
            raise SystemExit(f"a trainer of the group of {n} failed ({proc.returncode})")
    return [json.loads(Path(f"{path}.json").read_text()) for _, path in procs]


def user_hits(runs: list[list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Each user's sampled and full hit at 10, averaged over the seeds' runs."""
    per_seed = [{u: h for r in ranks for u, h in r["hits"].items()} for ranks in runs]
    return {u: [float(np.mean([hits[u][c] for hits in per_seed])) for c in (0, 1)]
            for u in per_seed[0]}


def summary(n: int, runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Rates from the first seed's run (the others repeat it), hits over all seeds."""
    ranks = runs[0]
    hits = user_hits(runs)
    consume = max(r["consume_s"] for r in ranks)
    return {
        "n": n,
        "events_per_s": round(sum(r["events"] for r in ranks) / consume),
        "samples": sum(r["samples"] for r in ranks),
        "samples_per_s": round(sum(r["samples"] / r["wall_s"] for r in ranks)),
        "samples_per_s_per_worker": [round(r["samples"] / r["wall_s"]) for r in ranks],
        "sync_share": round(max(r["exchange_s"] / r["wall_s"] for r in ranks), 4),
        "bytes_per_step": round(sum(r["exchange_bytes"] for r in ranks)
                                / max(1, sum(r["steps"] for r in ranks))),
        "hr10": round(float(np.mean([h[0] for h in hits.values()])), 4),
        "hr10_full": round(float(np.mean([h[1] for h in hits.values()])), 4),
        "users": len(hits), "seeds": len(runs),
        "wall_s": round(max(r["wall_s"] for r in ranks), 2),
    }


def paired(base: dict[str, list[float]], other: dict[str, list[float]], col: int
           ) -> tuple[float, float, float]:
    """Mean of other minus base, user by user, and its 95% interval (bench/quality.py's
    paired bootstrap)."""
    from quality import interval, resamples  # the bench folder is on sys.path

    users = sorted(base)
    d = np.array([other[u][col] - base[u][col] for u in users], dtype=np.float64)
    lo, hi = interval(d, resamples(len(d)))
    return float(d.mean()), lo, hi


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a small stream: under a minute")
    parser.add_argument("--data", help="a ratings file instead of the synthetic stream")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--replay-ratio", type=float, default=3.0)
    parser.add_argument("--poll", type=int, default=1000)
    parser.add_argument("--seeds", type=int, help="training seeds, each user's hits averaged "
                        "over them (default 3; --quick 1)")
    parser.add_argument("--sync-every", type=float, help="group_sync_every_s (default: the "
                        "setting's)")
    parser.add_argument("--sync-steps", type=int, help="group_sync_every_steps (default: the "
                        "setting's)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from ncf_stream.readers import read_events
    from ncf_stream.synth import SynthConfig, generate

    if args.data:
        events = read_events(args.data).events
    else:
        cfg = (SynthConfig(users=1500, items=400, events=40_000, topics=20, seed=3) if args.quick
               else SynthConfig(users=10_000, items=2000, events=400_000, topics=40, seed=3))
        events = generate(cfg).to_events()
    settings = {"device": "cpu", "checkpoint_dir": None, "replay_ratio": args.replay_ratio,
                "eval_interval_s": 3600.0, "holdout_fraction": 1.0,
                **({} if args.sync_every is None else {"group_sync_every_s": args.sync_every}),
                **({} if args.sync_steps is None else {"group_sync_every_steps": args.sync_steps}),
                **({"factors": 16, "mlp_layers": [32, 16, 8]} if args.quick else {})}
    counts = [int(x) for x in args.workers.split(",")]
    print(f"{len(events):,} events; trainers {counts}; replay ratio {args.replay_ratio}; "
          f"{os.cpu_count()} cores", file=sys.stderr)
    seeds = args.seeds or (1 if args.quick else 3)
    results: dict[int, list[list[dict[str, Any]]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):  # configurations side by side within each seed
            for n in counts:
                start = time.perf_counter()
                results[n].append(run_config(Path(tmp), events, n, {**settings, "seed": seed},
                                             args.poll))
                print(f"seed {seed}, {n} trainer(s): {json.dumps(summary(n, results[n][-1:]))} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    rows = [summary(n, results[n]) for n in counts]
    base_hits = user_hits(results[counts[0]])
    for row, n in zip(rows, counts, strict=True):
        if n == counts[0]:
            continue
        hits = user_hits(results[n])
        for col, name in ((0, "hr10"), (1, "hr10_full")):
            mean, lo, hi = paired(base_hits, hits, col)
            row[f"{name}_diff"] = [round(mean, 4), round(lo, 4), round(hi, 4)]
        lo, hi = row["hr10_diff"][1:]
        row["hr10_verdict"] = ("equivalent" if lo >= -MARGIN and hi <= MARGIN else
                               "worse" if hi < 0 else "better" if lo > 0 else "not shown")
    base = results[counts[0]][0][0]
    state_equal = all(
        sum(r["pairs_digest"] for r in ranks) % (1 << 64) == base["pairs_digest"]
        and sum(r["holdouts_digest"] for r in ranks) % (1 << 64) == base["holdouts_digest"]
        and len({tuple(r["shared"]) for r in ranks}) == 1
        for n in counts for ranks in results[n])
    print(json.dumps({"bench": "scale", "quick": args.quick, "cores": os.cpu_count(),
                      "events": len(events), "replay_ratio": args.replay_ratio, "seeds": seeds,
                      "workers": rows, "state_equal": state_equal}))


if __name__ == "__main__":
    main()
