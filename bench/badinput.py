"""The daemon's ingest rate on a stream with 10% malformed records, against a clean one.

    python bench/badinput.py [--quick] [--events N]

Two topics hold the same good events; one also has a malformed record of
every kind interleaved at one in ten. A real daemon (subprocess) consumes each
from the real broker, training as it goes; the rate is records consumed per
second from the first to the last. Every bad record costs a dead-letter send
(kafka-python, ~40 us of Python each) and the good ones cost training, so the
comparison is end to end. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from kafka_io import BAD  # noqa: E402
from load import daemon, ingest_rate  # noqa: E402

from consumers.broker import create_topics, existing_or_local  # noqa: E402
from consumers.produce import publish  # noqa: E402
from ncf_stream.events import encode_event  # noqa: E402
from ncf_stream.settings import Settings  # noqa: E402
from ncf_stream.synth import SynthConfig, generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int)
    args = parser.parse_args()
    n = args.events or (200_000 if args.quick else 1_000_000)
    stream = generate(SynthConfig(users=max(1000, n // 10), items=max(500, n // 20), events=n,
                                  seed=0, topics=50))
    good = [(str(u).encode(), encode_event(str(u), str(i), t)) for u, i, t in
            zip(stream.users.tolist(), stream.items.tolist(), stream.ts.tolist(), strict=True)]
    rng = np.random.default_rng(0)
    mixed = list(good)
    for j, at in enumerate(np.sort(rng.integers(0, n, n // 9))[::-1].tolist()):
        mixed.insert(at, (None, BAD[j % len(BAD)]))  # 10% of all records
    with existing_or_local() as bootstrap:
        clean, dirty = (f"bad-{uuid.uuid4().hex[:8]}-{x}" for x in ("clean", "dirty"))
        create_topics(bootstrap, [clean, dirty, f"{clean}.dlq", f"{dirty}.dlq"])
        s = Settings(kafka_bootstrap=bootstrap)
        publish(good, s, clean)
        publish(mixed, s, dirty)
        rates = {}
        for name, topic, total in (("clean", clean, len(good)), ("dirty", dirty, len(mixed))):
            with daemon(bootstrap, topic, "badinput") as (http_port, _):
                rates[name] = ingest_rate(http_port, total)
            print(f"{name}: {rates[name]:,.0f} records/s", file=sys.stderr)
    print(json.dumps({
        "good_events": n, "bad_records": len(mixed) - n,
        "clean_records_per_s": round(rates["clean"]),
        "bad_10pct_records_per_s": round(rates["dirty"]),
        "ratio": round(rates["dirty"] / rates["clean"], 3),
    }))


if __name__ == "__main__":
    main()
