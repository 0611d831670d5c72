"""Memory under a steady stream: RSS growth is only what new users, items and interactions need.

    python bench/soak.py [--quick] [--minutes M] [--rate EVENTS_PER_S]

A real daemon (``ncf-stream serve``, a subprocess) consumes a synthetic stream
published at a steady rate through the real broker for 30 minutes
(``--quick``: 1), training, publishing snapshots, evaluating, checkpointing and
answering a light query load all the while. Its RSS is sampled from /proc;
the store's own size comes from its metrics. The last line is one JSON object
with ``rss_start_mb``, ``rss_end_mb`` and ``bytes_per_new_interaction``
(RSS growth after warm-up per interaction added).

``--steady``: the second half of the stream repeats the first (same users,
items and pairs, later timestamps), so nothing new arrives in it and RSS must
stay flat: the last line adds ``rss_growth_mb_during_repeats``, the median RSS
over the last third of the repeats minus that over the first third (medians:
each evaluation swings RSS by tens of MB), which no growth of the data can
explain.

``--retention``: no broker. The engine runs in-process in two child processes
in turn, on the same endless stream of new (user, item) pairs among a fixed
population (ids, tables and histories stop growing early; only the store can),
at full speed, with ``retention_s`` unset and then set to RETENTION_S of event
time. The loop's ingest, retention sweeps and publishing run; training does not
(its state is per row, not per interaction, and on a small machine it would cap
the stream below where the store's growth shows in RSS). RSS is sampled every
half second; the last line is one JSON object with, per run, RSS after warm-up
(a third of the run) and at the end, the RSS growth per minute over the last two
thirds (a least-squares slope), the interactions stored and the store's bytes.
With retention the store holds one window of pairs, so RSS stays flat; without,
it grows with every pair. ``--quick``: 20 s per run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consumers.broker import create_topics, existing_or_local, free_port  # noqa: E402
from consumers.produce import publish  # noqa: E402
from ncf_stream.events import encode_event  # noqa: E402
from ncf_stream.settings import Settings  # noqa: E402
from ncf_stream.synth import SynthConfig, generate  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


RETENTION_S = 300.0  # event time kept by --retention: 300k events at EVENTS_PER_S
EVENTS_PER_S = 1000.0  # event time advances one second per thousand events
POPULATION = (20_000, 5_000)  # users, items: 100M possible pairs, so almost all are new


def retention_child(retention: bool, seconds: float) -> None:
    """One --retention run in this process: print one JSON object."""
    from ncf_stream.engine import Engine
    from ncf_stream.events import Events
    from ncf_stream.source import MemorySource

    s = Settings(device="cpu", factors=8, mlp_layers=(16, 8), batch_size=8192, replay=False,
                 negatives=1, online_fraction=0.0, publish_every_s=1.0,
                 eval_interval_s=3600.0, holdout_fraction=0.1,
                 retention_s=RETENTION_S if retention else None)
    source = MemorySource()
    engine = Engine(s, source)
    rng = np.random.default_rng(0)
    uid = np.array([f"u{k}" for k in range(POPULATION[0])], dtype=object)
    iid = np.array([f"i{k}" for k in range(POPULATION[1])], dtype=object)
    sent, chunk = 0, 50_000
    samples: list[tuple[float, float, int]] = []
    start = last = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        ts = (sent + np.arange(chunk)) / EVENTS_PER_S
        source.push(Events(uid[rng.integers(0, len(uid), chunk)],
                           iid[rng.integers(0, len(iid), chunk)], ts,
                           np.ones(chunk), np.full(chunk, "interaction", dtype=object)))
        sent += chunk
        while (batch := source.poll(0.0)) is not None:
            # The loop's ingest, retention and publishing, without training: on two busy
            # cores training caps the stream at ~6k events/s, whose pairs (2 MB in 20 s)
            # would drown in RSS noise. Training holds no per-interaction state.
            engine._ingest(batch)
            engine._maybe_expire()
            engine.trainer._drop_fresh(lambda u, _: np.ones(len(u), dtype=bool))
            engine.watermark.trained(0)
        engine._maybe_publish()
        if now - last >= 0.5:
            last = now
            samples.append((now - start, rss_mb(os.getpid()), len(engine.trainer.store)))
    sweeps = engine.metrics.registry.get_sample_value("ncf_stream_store_expire_seconds_count")
    sweep_s = engine.metrics.registry.get_sample_value("ncf_stream_store_expire_seconds_sum")
    t, rss, stored = (np.array(c) for c in zip(*samples, strict=True))
    warm = len(samples) // 3
    slope = np.polyfit(t[warm:], rss[warm:], 1)[0] * 60  # MB per minute after warm-up (fit)
    print(json.dumps({
        "retention_s": RETENTION_S if retention else None, "events": sent,
        "events_consumed": engine.counters.consumed,
        "rss_warm_mb": round(float(rss[warm]), 1), "rss_end_mb": round(float(rss[-1]), 1),
        "rss_max_mb": round(float(rss.max()), 1),
        "rss_mb_per_minute_after_warmup": round(float(slope), 1),
        "interactions_warm": int(stored[warm]), "interactions_end": int(stored[-1]),
        "store_bytes_end": engine.trainer.store.nbytes(),
        "sweeps": int(sweeps or 0),
        "sweep_ms_mean": round(1000 * (sweep_s or 0) / max(sweeps or 0, 1), 2)}))


def retention_soak(quick: bool, minutes: float | None) -> None:
    seconds = 20.0 if quick else 60 * (minutes or 5.0)
    runs = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--retention-child", mode,
                              "--seconds", str(seconds)], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        print(f"retention {mode}: {runs[mode]}", file=sys.stderr, flush=True)
    print(json.dumps({"mode": "retention", "seconds_per_run": seconds,
                      "retention_off": runs["off"], "retention_on": runs["on"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--steady", action="store_true",
                        help="the second half repeats the first: RSS must stay flat")
    parser.add_argument("--retention", action="store_true",
                        help="in-process, no broker: RSS with retention_s set and unset")
    parser.add_argument("--retention-child", choices=("on", "off"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=20.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.retention_child:
        retention_child(args.retention_child == "on", args.seconds)
        return
    if args.retention:
        retention_soak(args.quick, args.minutes)
        return
    minutes = args.minutes or (1.0 if args.quick else 30.0)
    n = int(args.rate * minutes * 60)
    fresh = n // 2 if args.steady else n
    stream = generate(SynthConfig(users=max(1000, fresh // 20), items=max(500, fresh // 100),
                                  events=fresh, seed=0, topics=50))
    users, items, ts = stream.users.tolist(), stream.items.tolist(), stream.ts.tolist()
    if args.steady:
        span = ts[-1] - ts[0] + 1.0
        users, items, ts = users * 2, items * 2, ts + [t + span for t in ts]
    msgs = [(str(u).encode(), encode_event(str(u), str(i), t))
            for u, i, t in zip(users, items, ts, strict=True)]
    with existing_or_local() as bootstrap, tempfile.TemporaryDirectory(
            prefix="ncf-soak-") as checkpoints:
        topic = f"soak-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic, f"{topic}.dlq"])
        http_port = free_port()
        env = {**os.environ, "NCF_STREAM_KAFKA_BOOTSTRAP": bootstrap,
               "NCF_STREAM_KAFKA_TOPIC": topic, "NCF_STREAM_DEVICE": "cpu",
               "NCF_STREAM_CHECKPOINT_DIR": checkpoints,
               "NCF_STREAM_EVAL_INTERVAL_S": "20"}
        proc = subprocess.Popen([sys.executable, "-m", "consumers.cli", "serve", "--http-port",
                                 str(http_port), "--grpc-port", str(free_port())], env=env,
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10)
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("daemon did not start")
                time.sleep(0.2)
            producer = threading.Thread(target=publish, args=(msgs, Settings(
                kafka_bootstrap=bootstrap), topic, args.rate), daemon=True)
            producer.start()
            samples = []
            start = time.monotonic()
            while producer.is_alive() or time.monotonic() - start < minutes * 60:
                status = client.get("/v1/status").json()
                samples.append((time.monotonic() - start, rss_mb(proc.pid),
                                status["interactions"], status["users"], status["items"]))
                if len(samples) % 15 == 1:  # every ~30 s: the trajectory, not just the ends
                    t, rss, inter, users, items = samples[-1]
                    print(f"{t:6.0f} s  rss {rss:7.1f} MB  interactions {inter:,}  users {users:,}"
                          f"  items {items:,}", file=sys.stderr, flush=True)
                with contextlib.suppress(httpx.HTTPError):
                    client.post("/v1/recommend", json={"user": "1", "k": 10})
                time.sleep(2.0)
                if time.monotonic() - start > minutes * 60 + 120:
                    break
        finally:
            proc.terminate()
            proc.wait(60)
    warm = samples[len(samples) // 5]  # after warm-up: imports, first snapshot, first eval
    end = samples[-1]
    extra = {}
    if args.steady:  # from the first sample with every distinct pair stored: repeats only
        first = next(j for j, x in enumerate(samples) if x[2] >= end[2])
        repeats = np.array([x[1] for x in samples[first:]])
        third = max(1, len(repeats) // 3)
        # Evaluations swing RSS by ~80 MB every 20 s: compare medians, not two samples.
        early, late = float(np.median(repeats[:third])), float(np.median(repeats[-third:]))
        extra = {"rss_repeats_early_median_mb": round(early, 1),
                 "rss_repeats_late_median_mb": round(late, 1),
                 "rss_growth_mb_during_repeats": round(late - early, 1),
                 "minutes_of_repeats": round((end[0] - samples[first][0]) / 60, 1)}
    grown = max(end[2] - warm[2], 1)
    print(f"rss {samples[0][1]:.0f} -> {warm[1]:.0f} (warm) -> {end[1]:.0f} MB; "
          f"interactions {warm[2]:,} -> {end[2]:,}", file=sys.stderr)
    print(json.dumps({
        "minutes": minutes, "rate": args.rate, "events": n,
        "rss_start_mb": round(samples[0][1], 1), "rss_warm_mb": round(warm[1], 1),
        "rss_end_mb": round(end[1], 1), "interactions": end[2], "users": end[3],
        "items": end[4],
        "bytes_per_new_interaction": round((end[1] - warm[1]) * 2**20 / grown, 1),
        **extra,
    }))


if __name__ == "__main__":
    main()
