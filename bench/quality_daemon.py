"""The quality figure as a user gets it: the stream's test split through a real daemon's API.

    python bench/quality.py DATA --daemon [--quick] [--replay-samples N]

``bench/quality.py --test`` measures the engine in-process, scoring the trainer's
model directly. This mode measures what a user of ``ncf-stream serve`` gets, and
holds it against that in-process figure:

1. **In-process** first: quality.py's ``fit_stream`` at the stream's chosen
   configuration (bench/chosen.json), seed 0, ``--replay-samples`` of idle replay
   after the pass (default as the test mode: 20M, ``--quick`` 3M), ranked by
   quality.py's ``ranks`` (exact scoring), on the daemon's count of trainer threads
   (one per core but one). The same engine then publishes a final snapshot and its
   ``Recommender`` answers ``recommend(user, 10, exclude="trained")`` and
   ``score(user, items)`` for every user (``in_process_served``): served (FAISS
   retrieval + NeuMF rescoring) against exact, in one process.
2. **The daemon**: a local broker, a one-partition topic, the whole file published
   with the producer CLI (``python -m consumers.cli produce``, timestamp order,
   as quality.py reads it), then ``python -m consumers.cli serve`` (a subprocess,
   bench/load.py's ``daemon``) with the same configuration and seed as
   ``NCF_STREAM_*`` variables, every user held out (``holdout_fraction`` 1.0),
   ``replay_duty`` 1.0 (no queries to yield to), the same ``replay_ratio`` (so it
   stops replaying at the in-process run's budget), a fresh checkpoint directory, a
   group of its own, and a snapshot every ``PUBLISH_EVERY_S``. The bench waits
   until every event is consumed, then until ``ncf_stream_replay_budget_samples``
   is 0, then for the publisher to take in the last steps. It checks that the daemon holds the store
   built in-process (events consumed, none rejected, users, items, interactions,
   hold-outs), then scores through HTTP only:

   * full HR@10 / NDCG@10: ``POST /v1/recommend/batch`` (every user in one request,
     so one snapshot answers them all; each answer is ``/v1/recommend``'s) with
     ``k`` 10 and ``exclude: "trained"``: the hold-out's rank in the returned list,
     else a miss. Listed items scoring at least as high count against it;
   * sampled HR@10 / NDCG@10: ``POST /v1/score`` for each user on the hold-out and
     its 99 evaluation negatives (``eval_negatives`` with quality.py's seed, from
     the same store built in-process; they go by item id, so the daemon's rows do
     not matter). Ties count against the hold-out; a non-finite or null score is
     never a hit.

   Its training has stopped by then, and the run fails if any answer comes from
   another snapshot or the sample count moves while it is scored. Both runs train
   the same fresh positives and stop at the same replay budget, so their sample
   counts differ by at most a step or two (``samples``).
3. **Comparison**: per-user hits and NDCG through quality.py's ``per_user``, paired
   bootstrap intervals (quality.py's resamples) of daemon minus in-process, and
   whether they lie within the equivalence margins: +-0.01 sampled HR@10 and +-10%
   (of the in-process value) full HR@10. One seed: the intervals resample users
   with both models fixed, so they leave out how two trainings of one configuration
   differ. The in-process engine repeats a run step for step since 2026-12-04 (a
   poll's positives are drained before the next poll, whatever the machine's speed);
   the daemon's polls follow the broker's timing. Unless ``--quick`` the in-process fit
   runs twice and ``in_process_again_minus_in_process_ci`` gives the second minus the
   first: zero intervals now, a check that the comparison's reference is fixed (before
   that change, on synthetic 10k users at 20M: full HR@10 [-0.028, -0.012]).

The last stdout line is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import load  # bench/load.py: the daemon subprocess and its status
import numpy as np
import torch

from consumers.broker import create_topics, existing_or_local
from ncf_stream.engine import Engine
from ncf_stream.evaluate import ranks_against
from ncf_stream.events import Events
from ncf_stream.ids import IdMap
from ncf_stream.sampler import EVAL_NEGATIVES, eval_negatives
from ncf_stream.settings import Settings
from ncf_stream.threads import trainer_thread

ROOT = Path(__file__).resolve().parents[1]
K = 10
PUBLISH_EVERY_S = 0.5  # the served snapshot is at most this old (plus a training slice)
SAMPLED_MARGIN = 0.01  # sampled HR@10, absolute
FULL_MARGIN = 0.10  # full HR@10, relative to the in-process value
START = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {text}", file=sys.stderr, flush=True)


# ---- ranks from answers ------------------------------------------------------------------------


def listed_rank(items: list[str], scores: list[float | None], holdout: str, miss: int) -> int:
    """The hold-out's rank in a served top-k: listed items scoring at least as high count
    against it; ``miss`` when it is not listed or its score is not finite."""
    if holdout not in items:
        return miss
    s = scores[items.index(holdout)]
    if s is None or not np.isfinite(s):
        return miss
    others = np.array([np.nan if x is None else x for j, x in enumerate(scores)
                       if items[j] != holdout], dtype=np.float64)
    return int(np.sum(np.isfinite(others) & (others >= s)))


def scored_rank(scores: list[float | None], miss: int) -> int:
    """Rank of ``scores[0]`` (the hold-out) among the rest; a null or non-finite one misses."""
    a = np.array([np.nan if x is None else x for x in scores], dtype=np.float64)
    if not np.isfinite(a[0]):
        return miss
    return int(ranks_against(a[:1], a[None, 1:])[0])


@dataclass(frozen=True)
class Holdouts:
    """What the bench knows of every hold-out, by external id: the user, the held-out
    item and its evaluation negatives (built in-process from the same file)."""

    users: list[str]
    items: list[str]
    negatives: list[list[str]]
    miss: int  # the rank of a miss: the catalogue size

    @classmethod
    def of(cls, split: Any, item_ids: IdMap, eval_seed: int) -> Holdouts:
        ho = split.view.holdout
        neg = eval_negatives(split.view, np.arange(len(ho.users)), EVAL_NEGATIVES, eval_seed)
        return cls(split.user_ids.ids(ho.users).tolist(), item_ids.ids(ho.items).tolist(),
                   [item_ids.ids(row[row >= 0]).tolist() for row in neg], split.view.n_items)


Answer = tuple[list[str], list[float | None]]  # a top-k: items and their scores


def served_ranks(h: Holdouts, recommend: Callable[[list[str]], list[Answer]],
                 score: Callable[[str, list[str]], list[float | None]]) -> dict[str, np.ndarray]:
    """Each hold-out's rank through a serving path: in the top 10 ``recommend`` answers
    with ``exclude="trained"`` (full), and among its negatives as ``score`` scores them."""
    full = np.array([listed_rank(items, scores, item, h.miss) for (items, scores), item in
                     zip(recommend(h.users), h.items, strict=True)], dtype=np.int64)
    sampled = np.array([scored_rank(score(user, [item, *neg]), h.miss) for user, item, neg in
                        zip(h.users, h.items, h.negatives, strict=True)], dtype=np.int64)
    return {"sampled": sampled, "full": full}


# ---- the in-process stream -----------------------------------------------------------------


def in_process(q: ModuleType, split: Any, cfg: Mapping[str, Any], budget: Any,
               item_ids: IdMap, h: Holdouts) -> tuple[dict[str, np.ndarray],
                                                     dict[str, np.ndarray], dict]:
    """quality.py's stream, ranked exactly and through the engine's own Recommender."""
    start = time.perf_counter()
    kept: list[Engine] = []
    # The daemon's trainer threads (trainer_threads unset: one per core but one), so both
    # train alike. Beside another benchmark on 2 cores, quality.py's 2 threads replayed at
    # 85k samples/s, the daemon's 1 at 290k: OpenMP teams stall at their barriers.
    threads = torch.get_num_threads()
    trainer_threads = trainer_thread()
    try:
        score_all, info = q.fit_stream(split, dict(cfg), q.SELECT_SEED, budget, keep=kept)
    finally:
        torch.set_num_threads(threads)
    fit_s = time.perf_counter() - start
    exact = q.ranks(score_all, split.view)
    engine = kept[0]
    if not np.array_equal(engine.trainer.item_ids.all_ids(), item_ids.all_ids()):
        raise RuntimeError("the engine's item rows disagree with the split's")
    # The final state, published as the daemon would, and served by its Recommender.
    engine.publisher.publish(engine.counters.consumed)
    rec = engine.recommender
    served = served_ranks(
        h, lambda users: [(r.items, r.scores) for r in
                          (rec.recommend(u, K, exclude="trained") for u in users)],
        lambda user, items: rec.score(user, items).scores)
    timing = {"fit_seconds": round(fit_s, 1), "pass_seconds": round(info["pass_seconds"], 1),
              "replay_seconds": round(info["replay_seconds"], 1),
              "score_seconds": round(time.perf_counter() - start - fit_s, 1),
              "samples": int(info["samples_total"]), "threads": trainer_threads}
    return exact, served, timing


# ---- the daemon ----------------------------------------------------------------------------


class Api:
    """The daemon's HTTP API on one kept-alive connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"content-type": "application/json"}
        for attempt in range(2):  # a dropped keep-alive connection: reconnect once
            try:
                self.conn.request(method, path, body=payload, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data) if path != "/metrics" else data.decode()

    def metric(self, name: str) -> float:
        text = self.call("GET", "/metrics")
        m = re.search(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"/metrics has no {name}")
        return float(m.group(1))

    def close(self) -> None:
        self.conn.close()


def wait_for(what: str, test: Any, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = test()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def daemon_settings(settings: Settings, cfg: Mapping[str, Any],
                    checkpoint_dir: str) -> dict[str, str]:
    """In-process ``settings`` as ``NCF_STREAM_*`` variables: ``cfg``'s and what
    quality.py's stream sets (seed, hold-outs, duty, the replay budget)."""
    names = [*cfg, "seed", "holdout_fraction", "replay_duty", "replay_ratio", "device"]
    env = {f"NCF_STREAM_{k.upper()}": str(getattr(settings, k)) for k in names}
    return {**env, "NCF_STREAM_CHECKPOINT_DIR": checkpoint_dir,
            "NCF_STREAM_PUBLISH_EVERY_S": str(PUBLISH_EVERY_S)}


def produce(data: str, bootstrap: str, topic: str, n: int) -> None:
    """The real producer CLI, the whole file."""
    out = subprocess.run([sys.executable, "-m", "consumers.cli", "produce", data,
                          "--bootstrap", bootstrap, "--topic", topic, "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or f"sent {n} events" not in out.stdout:
        raise RuntimeError(f"produce failed (rc {out.returncode}): {out.stdout} {out.stderr}")


def through_daemon(data: str, split: Any, h: Holdouts,
                   env: dict[str, str]) -> tuple[dict[str, np.ndarray], dict]:
    """Publish, serve, wait until the replay budget is spent and published, and rank
    every hold-out through HTTP."""
    n = len(split.events)
    t: dict[str, Any] = {}
    with existing_or_local() as bootstrap:
        progress(f"broker at {bootstrap}")
        topic = f"quality-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=1)
        start = time.monotonic()
        produce(data, bootstrap, topic, n)
        t["produce_seconds"] = round(time.monotonic() - start, 1)
        progress(f"published {n:,} events to {topic} with the producer CLI")
        with tempfile.TemporaryDirectory(prefix="ncf-quality-ckpt-") as ckpt, load.daemon(
                bootstrap, topic, "quality", env | {"NCF_STREAM_CHECKPOINT_DIR": ckpt}) as (
                    port, _):
            start = time.monotonic()
            api = Api(port)
            try:
                wait_for("the whole stream consumed", lambda: (s := load.status(port))
                         and s["events_consumed"] >= n, timeout=600)
                t["consume_seconds"] = round(time.monotonic() - start, 1)
                progress(f"consumed {n:,} events; replaying to the budget")
                wait_for("the replay budget spent", lambda: api.metric(
                    "ncf_stream_replay_budget_samples") == 0, timeout=900, every=0.1)
                t["train_seconds"] = round(time.monotonic() - start, 1)
                samples = int(api.metric("ncf_stream_train_samples_total"))
                # Training has stopped; the publisher takes in the last steps within its
                # period (a training slice may still be finishing: wait two).
                time.sleep(2 * PUBLISH_EVERY_S + 1.0)
                if int(api.metric("ncf_stream_train_samples_total")) != samples:
                    raise RuntimeError("the daemon trained on after its replay budget")
                start = time.monotonic()
                status = api.call("GET", "/v1/status")
                holdout_gauge = api.metric("ncf_stream_holdouts")
                got = (status["events_consumed"], status["events_rejected"], status["users"],
                       status["items"], status["interactions"], int(holdout_gauge))
                want = (n, 0, split.store.n_users, split.store.n_items, len(split.store),
                        len(h.users))
                if got != want:
                    raise RuntimeError(f"the daemon's store differs: (consumed, rejected, "
                                       f"users, items, interactions, holdouts) {got} != {want}")
                versions: list[int] = []

                def recommend(users: list[str]) -> list[Answer]:
                    out = []
                    for lo in range(0, len(users), 1000):  # the batch endpoint's limit
                        for r in api.call("POST", "/v1/recommend/batch", {
                                "users": users[lo: lo + 1000], "k": K,
                                "exclude": "trained"})["results"]:
                            if r["cold_start"]:
                                raise RuntimeError(f"user {r['user']} is unknown to the daemon")
                            versions.append(r["model_version"])
                            out.append(([x["item"] for x in r["items"]],
                                        [x["score"] for x in r["items"]]))
                    return out

                def score(user: str, items: list[str]) -> list[float | None]:
                    answer = api.call("POST", "/v1/score", {"user": user, "items": items})
                    versions.append(answer["model_version"])
                    return answer["scores"]

                ranks = served_ranks(h, recommend, score)
                t["score_seconds"] = round(time.monotonic() - start, 1)
                after = int(api.metric("ncf_stream_train_samples_total"))
            finally:
                api.close()
    if after != samples or min(versions) != max(versions):
        raise RuntimeError(f"the daemon's model moved while scored: samples {samples:,} -> "
                           f"{after:,}, snapshots {min(versions)}..{max(versions)}")
    info = {"samples": samples, "model_version": versions[0], **t}
    return ranks, info


# ---- the mode ------------------------------------------------------------------------------


def run_daemon(q: ModuleType, data: str, events: Events, chosen: Mapping[str, Any],
               budget: Any, repeat: bool = True) -> dict[str, Any]:
    """``--daemon``: the daemon's figures against the in-process stream's (module docstring)."""
    split = q.Split.of(events)
    item_ids = IdMap()
    item_ids.rows(events.items)  # rows in arrival order, as the store's
    cfg = chosen["methods"]["stream"]["config"]
    seed = q.SELECT_SEED
    progress(f"{len(events):,} events, {len(split.view.holdout.users)} hold-outs, "
             f"{split.view.n_items} items; stream {cfg}, seed {seed}, "
             f"{budget.replay_samples:,} replay samples")

    h = Holdouts.of(split, item_ids, q.EVAL_SEED)
    start = time.perf_counter()
    exact, served, ip_info = in_process(q, split, cfg, budget, item_ids, h)
    ip_seconds = time.perf_counter() - start
    progress(f"in-process: {ip_info}")
    again = None
    if repeat:  # the same fit once more: how far two trainings of one configuration land
        again, _, again_info = in_process(q, split, cfg, budget, item_ids, h)
        progress(f"in-process again: {again_info}")

    start = time.perf_counter()
    env = daemon_settings(q.stream_settings(split, cfg, seed, budget), cfg, "")
    daemon_ranks, d_info = through_daemon(data, split, h, env)
    d_seconds = time.perf_counter() - start
    progress(f"daemon: {d_info}")

    values = {name: q.per_user([r]) for name, r in
              (("daemon", daemon_ranks), ("in_process", exact), ("in_process_served", served))}
    idx = q.resamples(len(split.view.holdout.users))
    means = {name: {m: round(float(v[m].mean()), 4) for m in q.METRICS}
             for name, v in values.items()}
    diff = {m: [round(x, 4) for x in q.interval(values["daemon"][m] - values["in_process"][m],
                                                idx)] for m in q.METRICS}
    repeat_diff = None if again is None else {
        m: [round(x, 4) for x in q.interval(q.per_user([again])[m] - values["in_process"][m],
                                            idx)] for m in q.METRICS}
    served_diff = {m: [round(x, 4) for x in q.interval(
        values["in_process_served"][m] - values["in_process"][m], idx)]
        for m in q.METRICS}
    full_margin = FULL_MARGIN * means["in_process"]["full_hr10"]
    # Equivalent: the whole interval of the difference lies within the margin.
    equivalent = {"hr10": max(map(abs, diff["hr10"])) <= SAMPLED_MARGIN,
                  "full_hr10": max(map(abs, diff["full_hr10"])) <= full_margin}
    return {
        "events": len(events), "holdouts": len(split.view.holdout.users),
        "items": split.view.n_items, "config": cfg, "seed": seed, "seeds": 1,
        "replay_samples": budget.replay_samples,
        "daemon": means["daemon"], "in_process": means["in_process"],
        "in_process_served": means["in_process_served"],
        "diff_ci": diff, "served_minus_exact_ci": served_diff,
        "in_process_again_minus_in_process_ci": repeat_diff,
        "margins": {"hr10": SAMPLED_MARGIN, "full_hr10": round(full_margin, 4)},
        "equivalent": equivalent,
        "samples": {"in_process": ip_info["samples"], "daemon": d_info["samples"]},
        "daemon_info": d_info, "in_process_info": ip_info,
        "wall_seconds": {"in_process": round(ip_seconds, 1), "daemon": round(d_seconds, 1)},
    }
