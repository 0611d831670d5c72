"""Idle replay: the daemon's training rate once the stream is consumed, against the trainer's.

    python bench/idle.py [--quick] [--events N] [--seconds S] [--qps Q]

A real daemon (``ncf-stream serve``, a subprocess, default settings) consumes a
synthetic stream from a real broker. Once every event is consumed and trained
(``snapshot_events`` equals the stream), the stream is idle and the engine
replays from the store at ``replay_duty`` of its time. For ``--seconds`` its
training rate is read from its own ``/metrics`` (``train_samples_total``) while
one HTTP client queries it at ``--qps`` on an open-loop schedule (latency from
each request's scheduled send time). In the same run, with the broker idle,
``Trainer.step`` on the same stream and settings measures what
the trainer alone does (``bench/train.py``'s ``trainer`` figure), just before
and just after the daemon runs; their mean is the reference.

Target (issue 17): ``idle_ratio >= 0.9 * replay_duty``.

The last line is one JSON object: ``idle_samples_per_s``, ``bench_samples_per_s``,
``idle_ratio`` (the two divided), ``replay_duty``, ``idle_p99_ms`` (null with fewer
than 1000 requests), ``idle_p50_ms``, ``requests``, ``idle_window_s``, and
``idle_samples`` / ``bench_samples`` (training budgets are stated in samples).
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import daemon, get, status  # noqa: E402 - the same daemon harness as bench/load.py

from consumers.broker import create_topics, existing_or_local  # noqa: E402
from consumers.produce import publish  # noqa: E402
from ncf_stream.events import encode_event  # noqa: E402
from ncf_stream.metrics import PREFIX  # noqa: E402
from ncf_stream.settings import Settings  # noqa: E402
from ncf_stream.synth import SynthConfig, generate  # noqa: E402
from ncf_stream.threads import trainer_thread  # noqa: E402
from ncf_stream.trainer import Trainer, TrainerConfig  # noqa: E402

MIN_FOR_P99 = 1000  # 10 requests above the p99


def train_samples(http_port: int) -> float:
    for line in get(http_port, "/metrics").decode().splitlines():
        if line.startswith(f"{PREFIX}_train_samples_total "):
            return float(line.split()[1])
    raise RuntimeError("the daemon exports no train_samples_total")


def wait_trained(http_port: int, n: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while (s := status(http_port)) is None or s["snapshot_events"] < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stream was not consumed and trained in time: {s}")
        time.sleep(0.1)


def query(http_port: int, users: np.ndarray, seconds: float, qps: float) -> list[float]:
    """Open loop: request i is due at i / qps; its latency counts from then (a stalled
    answer delays the next requests, and they count the wait)."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    headers = {"Content-Type": "application/json"}
    rng = np.random.default_rng(1)
    latencies: list[float] = []
    begin = time.perf_counter()
    for i in range(int(seconds * qps)):
        due = begin + i / qps
        if (ahead := due - time.perf_counter()) > 0:
            time.sleep(ahead)
        user = str(users[rng.integers(0, len(users))])
        conn.request("POST", "/v1/recommend", json.dumps({"user": user, "k": 10}), headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        latencies.append(time.perf_counter() - due)
    conn.close()
    return latencies


def idle_rate(http_port: int, users: np.ndarray, seconds: float,
              qps: float) -> tuple[float, float, list[float]]:
    """(samples/s, samples) over the window, and the query latencies during it."""
    latencies: list[float] = []
    client = threading.Thread(target=lambda: latencies.extend(query(http_port, users, seconds,
                                                                    qps)))
    before, start = train_samples(http_port), time.monotonic()
    client.start()
    client.join()
    samples, elapsed = train_samples(http_port) - before, time.monotonic() - start
    return samples / elapsed, samples, latencies


def trainer_rate(stream, settings: Settings, seconds: float) -> tuple[float, float]:
    """``Trainer.step`` alone on the same stream (all replay once ingested), as
    bench/train.py measures it, with the daemon trainer's thread count;
    (samples/s, samples)."""
    trainer_thread(settings.trainer_threads)
    trainer = Trainer(TrainerConfig.from_settings(settings))
    trainer.ingest(stream.to_events())
    while trainer.pending:
        trainer.step()
    for _ in range(3):  # warm-up
        trainer.step()
    before, start = trainer.samples_trained, time.perf_counter()
    while time.perf_counter() - start < seconds:
        trainer.step()
    samples = trainer.samples_trained - before
    return samples / (time.perf_counter() - start), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int)
    parser.add_argument("--seconds", type=float, help="idle window (default 12, --quick 11)")
    parser.add_argument("--qps", type=float, default=100.0)
    args = parser.parse_args()
    n = args.events or (100_000 if args.quick else 300_000)
    seconds = args.seconds or (11.0 if args.quick else 30.0)
    stream = generate(SynthConfig(users=max(1000, n // 10), items=max(1000, n // 10),
                                  events=n, seed=0, topics=50))
    msgs = [(str(u).encode(), encode_event(str(u), str(i), t)) for u, i, t in
            zip(stream.users.tolist(), stream.items.tolist(), stream.ts.tolist(), strict=True)]
    users = np.unique(stream.users)
    settings = Settings()  # the daemon's defaults (and NCF_STREAM_* as the daemon sees them)
    alone_s = min(seconds, 6.0)
    with existing_or_local() as bootstrap:
        topic = f"idle-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic, f"{topic}.dlq"])
        publish(msgs, Settings(kafka_bootstrap=bootstrap), topic)
        # The trainer alone just before and just after the daemon, with the broker up and
        # idle in both: this machine's speed drifts by 2x within minutes.
        before = trainer_rate(stream, settings, alone_s)
        with daemon(bootstrap, topic, "idle") as (http_port, _):
            wait_trained(http_port, n)
            idle, idle_samples, latencies = idle_rate(http_port, users, seconds, args.qps)
        after = trainer_rate(stream, settings, alone_s)
    bench, bench_samples = (before[0] + after[0]) / 2, before[1] + after[1]
    print(f"trainer alone: {before[0]:,.0f} before, {after[0]:,.0f} after; daemon idle: "
          f"{idle:,.0f} samples/s over {seconds:.0f} s", file=sys.stderr)
    ms = np.array(latencies) * 1000
    print(json.dumps({
        "events": n, "idle_window_s": seconds, "qps": args.qps,
        "idle_samples_per_s": round(idle), "bench_samples_per_s": round(bench),
        "bench_before_after": [round(before[0]), round(after[0])],
        "idle_ratio": round(idle / bench, 3), "replay_duty": settings.replay_duty,
        "target_met": bool(idle / bench >= 0.9 * settings.replay_duty),
        "idle_samples": int(idle_samples), "bench_samples": int(bench_samples),
        "requests": len(ms), "idle_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "idle_p99_ms": (round(float(np.percentile(ms, 99)), 2) if len(ms) >= MIN_FOR_P99
                        else None),
        "idle_max_ms": round(float(ms.max()), 2),
    }))


if __name__ == "__main__":
    main()
