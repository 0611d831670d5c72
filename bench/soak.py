"""Memory under a steady stream: RSS growth is only what new users, items and interactions need.

    python bench/soak.py [--quick] [--minutes M] [--rate EVENTS_PER_S]

A real daemon (``ncf-stream serve``, a subprocess) consumes a synthetic stream
published at a steady rate through the real broker for 30 minutes
(``--quick``: 1), training, publishing snapshots, evaluating, checkpointing and
answering a light query load all the while. Its RSS is sampled from /proc;
the store's own size comes from its metrics. The last line is one JSON object
with ``rss_start_mb``, ``rss_end_mb`` and ``bytes_per_new_interaction``
(RSS growth after warm-up per interaction added).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--rate", type=float, default=5000.0)
    args = parser.parse_args()
    minutes = args.minutes or (1.0 if args.quick else 30.0)
    n = int(args.rate * minutes * 60)
    stream = generate(SynthConfig(users=max(1000, n // 20), items=max(500, n // 100), events=n,
                                  seed=0, topics=50))
    msgs = [(str(u).encode(), encode_event(str(u), str(i), t)) for u, i, t in
            zip(stream.users.tolist(), stream.items.tolist(), stream.ts.tolist(), strict=True)]
    with existing_or_local() as bootstrap:
        topic = f"soak-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic, f"{topic}.dlq"])
        http_port = free_port()
        env = {**os.environ, "NCF_STREAM_KAFKA_BOOTSTRAP": bootstrap,
               "NCF_STREAM_KAFKA_TOPIC": topic, "NCF_STREAM_DEVICE": "cpu",
               "NCF_STREAM_CHECKPOINT_DIR": tempfile.mkdtemp(prefix="ncf-soak-"),
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
    grown = max(end[2] - warm[2], 1)
    print(f"rss {samples[0][1]:.0f} -> {warm[1]:.0f} (warm) -> {end[1]:.0f} MB; "
          f"interactions {warm[2]:,} -> {end[2]:,}", file=sys.stderr)
    print(json.dumps({
        "minutes": minutes, "rate": args.rate, "events": n,
        "rss_start_mb": round(samples[0][1], 1), "rss_warm_mb": round(warm[1], 1),
        "rss_end_mb": round(end[1], 1), "interactions": end[2], "users": end[3],
        "items": end[4],
        "bytes_per_new_interaction": round((end[1] - warm[1]) * 2**20 / grown, 1),
    }))


if __name__ == "__main__":
    main()
