"""Interaction store, negative sampler: throughput and memory, against two baselines.

    python bench/store.py [--quick] [--sizes 10000000,100000000] [--users U] [--items I]

For each size: a long-tailed stream (Zipf users and items, increasing time)
is appended in batches of 8192 events through ``InteractionStore.append``
(dedup, hold-out, popularity, all of it); then ``contains`` is asked 32768
(user, item) pairs at a time (one training step's negatives) and the sampler
draws 4 negatives for each of 8192 positives at a time. On a prefix of the
stream, in the same run, the same work is timed for a scipy CSR rebuilt per
batch and for a Python set of (user, item) tuples.

Full run: 10M and 100M interactions over 1M users and 200k items.
``--quick``: 1M interactions over 100k users and 20k items.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncf_stream.ids import IdMap
from ncf_stream.sampler import NegativeSampler, SamplerConfig
from ncf_stream.store import InteractionStore

BATCH = 8192
QUERY_BATCH = 4 * BATCH


def zipf_rows(rng: np.random.Generator, n: int, size: int, exponent: float) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, n + 1) ** exponent)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    return rng.permutation(n)[ranks].astype(np.int64)


def stream(n: int, users: int, items: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    u = zipf_rows(rng, users, n, 0.8)
    i = zipf_rows(rng, items, n, 1.0)
    ts = 1.7e9 + np.sort(rng.random(n)) * 86_400 * 90
    return u, i, ts


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def time_store(u: np.ndarray, i: np.ndarray, ts: np.ndarray, n_items: int) -> dict[str, float]:
    gc.collect()
    rss0 = rss_mb()
    store = InteractionStore()
    start = time.perf_counter()
    for lo in range(0, len(u), BATCH):
        store.append(u[lo:lo + BATCH], i[lo:lo + BATCH], ts[lo:lo + BATCH])
    append = len(u) / (time.perf_counter() - start)
    rng = np.random.default_rng(1)
    q = 2_000_000
    qu, qi = u[rng.integers(0, len(u), q)], rng.integers(0, n_items, q)
    start = time.perf_counter()
    for lo in range(0, q, QUERY_BATCH):
        store.contains(qu[lo:lo + QUERY_BATCH], qi[lo:lo + QUERY_BATCH])
    contains = q / (time.perf_counter() - start)
    out = {"interactions": len(store), "events": len(u), "append_per_s": append,
           "contains_per_s": contains,
           "bytes_per_interaction": store.nbytes() / len(store),
           "rss_mb_per_million": (rss_mb() - rss0) / (len(store) / 1e6)}
    for name, alpha in (("negatives_per_s", 0.0), ("negatives_pop_per_s", 0.75)):
        sampler = NegativeSampler(store, SamplerConfig(k=4, alpha=alpha, seed=2))
        positives = u[rng.integers(0, len(u), 50 * BATCH)]
        start = time.perf_counter()
        for lo in range(0, len(positives), BATCH):
            sampler.sample(positives[lo:lo + BATCH])
        out[name] = 4 * len(positives) / (time.perf_counter() - start)
    return out


def time_csr_rebuild(u: np.ndarray, i: np.ndarray, n_users: int, n_items: int) -> dict[str, float]:
    """Baseline: keep COO arrays, rebuild a deduplicated CSR after every batch."""
    rows, cols = np.empty(0, np.int64), np.empty(0, np.int64)
    start = time.perf_counter()
    m = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    for lo in range(0, len(u), BATCH):
        rows = np.concatenate([rows, u[lo:lo + BATCH]])
        cols = np.concatenate([cols, i[lo:lo + BATCH]])
        m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
        m.sum_duplicates()
    append = len(u) / (time.perf_counter() - start)
    rng = np.random.default_rng(1)
    q = 200_000
    qu, qi = u[rng.integers(0, len(u), q)], rng.integers(0, n_items, q)
    start = time.perf_counter()
    for lo in range(0, q, QUERY_BATCH):
        _ = np.asarray(m[qu[lo:lo + QUERY_BATCH], qi[lo:lo + QUERY_BATCH]]).ravel() > 0
    contains = q / (time.perf_counter() - start)
    nbytes = m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + rows.nbytes + cols.nbytes
    return {"append_per_s": append, "contains_per_s": contains,
            "bytes_per_interaction": nbytes / m.nnz}


def time_python_set(u: np.ndarray, i: np.ndarray, n_items: int) -> dict[str, float]:
    """Baseline: a set of (user, item) tuples."""
    gc.collect()
    rss0 = rss_mb()
    seen: set[tuple[int, int]] = set()
    ul, il = u.tolist(), i.tolist()
    start = time.perf_counter()
    for lo in range(0, len(ul), BATCH):
        seen.update(zip(ul[lo:lo + BATCH], il[lo:lo + BATCH], strict=True))
    append = len(ul) / (time.perf_counter() - start)
    rng = np.random.default_rng(1)
    q = 500_000
    qu, qi = u[rng.integers(0, len(u), q)].tolist(), rng.integers(0, n_items, q).tolist()
    start = time.perf_counter()
    np.fromiter(((a, b) in seen for a, b in zip(qu, qi, strict=True)), dtype=bool, count=q)
    contains = q / (time.perf_counter() - start)
    return {"append_per_s": append, "contains_per_s": contains,
            "bytes_per_interaction": (rss_mb() - rss0) * 2**20 / len(seen)}


def ids_bytes(n_users: int, n_items: int) -> int:
    ids = IdMap()
    ids.rows(np.arange(n_users).astype(str).astype(object))
    items = IdMap()
    items.rows(np.arange(n_items).astype(str).astype(object))
    return ids.nbytes() + items.nbytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", help="comma-separated event counts")
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--baseline-events", type=int, help="prefix timed for the baselines")
    args = parser.parse_args()
    sizes = ([int(float(s)) for s in args.sizes.split(",")] if args.sizes
             else [1_000_000] if args.quick else [10_000_000, 100_000_000])
    n_users = args.users or (100_000 if args.quick else 1_000_000)
    n_items = args.items or (20_000 if args.quick else 200_000)
    prefix = args.baseline_events or 1_000_000

    results = []
    for n in sizes:
        u, i, ts = stream(n, n_users, n_items)
        r = time_store(u, i, ts, n_items)
        r["bytes_per_interaction_with_ids"] = (
            r["bytes_per_interaction"] + ids_bytes(n_users, n_items) / r["interactions"])
        print(f"store @ {n:,} events: " + ", ".join(f"{k}={v:,.1f}" for k, v in r.items()),
              file=sys.stderr)
        results.append(r)
        del u, i, ts
        gc.collect()

    u, i, ts = stream(prefix, n_users, n_items)
    same = results[0] if sizes[0] == prefix else time_store(u, i, ts, n_items)
    csr = time_csr_rebuild(u, i, n_users, n_items)
    pyset = time_python_set(u, i, n_items)
    for name, r in (("store", same), ("csr_rebuild", csr), ("python_set", pyset)):
        print(f"{name} @ {prefix:,} events: " + ", ".join(f"{k}={v:,.1f}" for k, v in r.items()),
              file=sys.stderr)

    last = results[-1]
    print(json.dumps({
        "users": n_users, "items": n_items,
        "append_per_s": round(last["append_per_s"]),
        "contains_per_s": round(last["contains_per_s"]),
        "negatives_per_s": round(last["negatives_per_s"]),
        "bytes_per_interaction": round(last["bytes_per_interaction"], 2),
        "sizes": [{k: round(v, 2) for k, v in r.items()} for r in results],
        "baselines_at": prefix,
        "vs_csr_rebuild": {k: round(same[k] / csr[k], 1) for k in ("append_per_s",
                                                                   "contains_per_s")},
        "vs_python_set": {k: round(same[k] / pyset[k], 1) for k in ("append_per_s",
                                                                    "contains_per_s")},
        "baseline_bytes_per_interaction": {"csr_rebuild": round(csr["bytes_per_interaction"], 1),
                                           "python_set": round(pyset["bytes_per_interaction"], 1)},
    }))


if __name__ == "__main__":
    main()
