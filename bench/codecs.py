"""Ingest by compression codec: the daemon's events/s from topics a non-Python producer wrote.

    python bench/codecs.py [--quick] [--events N]

The same synthetic events are published by kcat (librdkafka, as Java, Go and
.NET clients compress) to one topic per codec: none, gzip, snappy, lz4, zstd.
A real daemon (``ncf-stream serve``, defaults) then consumes each topic from
the start, and its own /v1/status gives events/s from the first consumed event
to the last (``bench/load.py``'s ingest measure, end to end: consume,
decompress, decode, train). Target: every codec >= 0.8x uncompressed.

The last line is one JSON object: ``events``, ``events_per_s`` and
``ratio_to_none`` by codec, ``target_met``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import daemon, ingest_rate  # noqa: E402 - the same daemon harness as bench/load.py

from consumers.broker import create_topics, existing_or_local  # noqa: E402
from ncf_stream.events import encode_event  # noqa: E402
from ncf_stream.synth import SynthConfig, generate  # noqa: E402

CODECS = ("none", "gzip", "snappy", "lz4", "zstd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int)
    args = parser.parse_args()
    kcat = shutil.which("kcat")
    if kcat is None:
        sys.exit("bench/codecs.py needs kcat (Debian: apt-get install kcat)")
    n = args.events or (150_000 if args.quick else 1_000_000)
    stream = generate(SynthConfig(users=max(1000, n // 10), items=max(1000, n // 10),
                                  events=n, seed=0, topics=50))
    lines = b"".join(
        str(u).encode() + b"\t" + encode_event(str(u), str(i), t) + b"\n"
        for u, i, t in zip(stream.users.tolist(), stream.items.tolist(), stream.ts.tolist(),
                           strict=True))
    rates: dict[str, float] = {}
    with existing_or_local() as bootstrap:
        run = uuid.uuid4().hex[:8]
        for codec in CODECS:
            topic = f"codec-{run}-{codec}"
            create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=1)
            subprocess.run([kcat, "-P", "-b", bootstrap, "-t", topic, "-z", codec, "-K", "\t",
                            "-X", "linger.ms=20"], input=lines, check=True, timeout=600)
            with daemon(bootstrap, topic, "codecs") as (http_port, _):
                rates[codec] = ingest_rate(http_port, n)
            print(f"{codec}: {rates[codec]:,.0f} events/s", file=sys.stderr)
    ratios = {c: round(rates[c] / rates["none"], 3) for c in CODECS}
    print(json.dumps({
        "events": n, "events_per_s": {c: round(r) for c, r in rates.items()},
        "ratio_to_none": ratios, "target_met": all(r >= 0.8 for r in ratios.values()),
    }))


if __name__ == "__main__":
    main()
