"""The HTTP stack's own cost per request: uvicorn's parsers and event loops, side by side.

    python bench/http_stack.py [--quick] [--requests N]

The daemon's FastAPI app (middlewares, validation, serialization) over a stub
recommender that answers at once, so what is measured is the stack, not the
model: one closed-loop client on a keep-alive connection posts
``/v1/recommend``, and the server's threads' CPU time per request is read from
``/proc``. Every request holds the GIL for that time, which the trainer then
waits for (or, worse, a request waits behind the trainer). Each configuration
runs in a process of its own, in turns (``--rounds``). The last line is one
JSON object with each stack's p50 / p99 latency and server CPU per request,
and the CPU ratio against h11 on asyncio (uvicorn's pure-Python default).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STACKS = [("h11", "asyncio"), ("httptools", "asyncio"), ("h11", "uvloop"),
          ("httptools", "uvloop")]


def thread_cpu_s(exclude: int) -> float:
    """CPU seconds of this process's threads, except ``exclude`` (a native id)."""
    ticks = 0
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        if int(tid) == exclude:
            continue
        fields = Path(f"/proc/{os.getpid()}/task/{tid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        ticks += int(utime) + int(stime)
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(parser: str, loop: str, requests: int) -> dict[str, float]:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from ncf_stream.http_app import create_app
    from ncf_stream.metrics import ServingMetrics
    from ncf_stream.recommend import Recommendation
    from ncf_stream.servers import bind

    class Stub:
        """Answers top k at once: the stack alone is measured."""

        max_k = 1000
        holder = None

        def recommend(self, user: str, k: int, exclude: str = "seen") -> Recommendation:
            return Recommendation(user, [f"item-{i}" for i in range(k)],
                                  [1.0 - i / 100 for i in range(k)], 1, False)

    registry = CollectorRegistry()
    app = create_app(Stub(), lambda: None, registry, ServingMetrics(registry))  # type: ignore[arg-type]
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                           http=parser, loop=loop))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=10)
    body, headers = json.dumps({"user": "u-1", "k": 10}), {"Content-Type": "application/json"}

    def call() -> None:
        conn.request("POST", "/v1/recommend", body, headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200 or len(json.loads(payload)["items"]) != 10:
            raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")

    for _ in range(min(500, requests)):  # warm-up
        call()
    me = threading.get_native_id()
    cpu = thread_cpu_s(me)
    latencies = np.empty(requests)
    for n in range(requests):
        start = time.perf_counter()
        call()
        latencies[n] = time.perf_counter() - start
    cpu = thread_cpu_s(me) - cpu
    server.should_exit = True
    thread.join(5)
    ms = latencies * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "server_cpu_us": round(cpu / requests * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stack", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.requests or (3000 if args.quick else 20_000)
    if args.stack:
        print(json.dumps(measure(*args.stack.split("/"), n)))
        return
    runs: dict[str, list[dict[str, float]]] = {f"{p}/{lo}": [] for p, lo in STACKS}
    for _ in range(args.rounds):
        for name in runs:
            out = subprocess.run([sys.executable, __file__, "--stack", name, "--requests",
                                  str(n)], check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, runs[name][-1], file=sys.stderr)
    result: dict[str, object] = {"requests": n, "rounds": args.rounds}
    base = float(np.median([r["server_cpu_us"] for r in runs["h11/asyncio"]]))
    for name, rs in runs.items():
        cpu = float(np.median([r["server_cpu_us"] for r in rs]))
        result[name] = {"p50_ms": round(float(np.median([r["p50_ms"] for r in rs])), 3),
                        "p99_ms": round(float(np.median([r["p99_ms"] for r in rs])), 3),
                        "server_cpu_us": cpu, "cpu_vs_h11_asyncio": round(cpu / base, 3)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
