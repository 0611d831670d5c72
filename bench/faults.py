"""Ingest failures, as a user meets them: how long ingest stops, and what serving loses.

    python bench/faults.py [--quick] [--events N] [--bad N]

A real daemon (``ncf-stream serve``, defaults) on a real broker, with one HTTP
client querying it at 100 qps on an open-loop schedule throughout:

1. **The source process killed** (SIGKILL) while it consumes a backlog of
   ``--events`` on two partitions. ``resume_s``: from the kill until
   ``events_consumed`` grows past its value when the rebuilt source is up
   (the engine notices, backs off, starts a new source process, which rejoins
   the group and fetches).
2. **An undecodable batch.** A daemon whose source process lacks the lz4
   module (as the project's environment once did), started with
   ``dead_letter_undecodable``, meets ``--bad`` records that kcat compressed
   with lz4 in partition 1, between plain records; partition 0 is plain.
   ``skip_s``: from the moment partition 1's plain head is about consumed
   (a quarter of the stream) until the whole stream is, the range
   dead-lettered (one probe fetch per offset of the range). Without the
   setting the partition stops instead; ``block_s`` is the same moment to
   ingest degraded (one probe finds the partition).

Targets (issue 18): no request fails (``failed_requests`` 0).

The last line is one JSON object: per scenario ``resume_s`` / ``skip_s`` /
``block_s``, ``failed_requests``, ``requests`` and ``p99_ms`` of the queries
during it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import daemon, get, status  # noqa: E402 - the same daemon harness as bench/load.py

from consumers.broker import create_topics, existing_or_local  # noqa: E402
from ncf_stream.metrics import PREFIX  # noqa: E402

QPS = 100.0


class Client:
    """Queries at QPS on an open-loop schedule until stopped; failures are counted."""

    def __init__(self, http_port: int, users: list[str]) -> None:
        self.port, self.users = http_port, users
        self.latencies: list[float] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        begin, i = time.perf_counter(), 0
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            due = begin + i / QPS
            i += 1
            if (ahead := due - time.perf_counter()) > 0:
                time.sleep(ahead)
            body = json.dumps({"user": self.users[rng.integers(len(self.users))], "k": 10})
            try:
                conn.request("POST", "/v1/recommend", body,
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            if ok:
                self.latencies.append(time.perf_counter() - due)
            else:
                self.failed += 1
        conn.close()

    def stop(self) -> dict[str, object]:
        self._stop.set()
        self._thread.join(15)
        ms = np.array(self.latencies) * 1000
        return {"requests": len(ms) + self.failed, "failed_requests": self.failed,
                "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) >= 1000 else None}


def wait(what: str, until: Callable[[dict], bool], port: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (s := status(port)) is None or not until(s):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not in {timeout:.0f} s; status {s}")
        time.sleep(0.01)
    return s


def restarts(port: int) -> float:
    """ncf_stream_source_restarts_total, all reasons."""
    text = get(port, "/metrics").decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f"{PREFIX}_source_restarts_total{{"))


def kcat(bootstrap: str, topic: str, lines: bytes, codec: str, partition: int) -> None:
    subprocess.run([shutil.which("kcat") or "kcat", "-P", "-b", bootstrap, "-t", topic,
                    "-z", codec, "-K", "\t", "-p", str(partition), "-X", "linger.ms=20",
                    "-X", "batch.num.messages=100000"], input=lines, check=True, timeout=600)


def events(tag: str, n: int, users: int) -> bytes:
    return b"".join(
        f'{tag}{i % users}\t{{"user": "{tag}{i % users}", "item": "i{(i * 7) % 997}", '
        f'"ts": {1.7e9 + i}}}\n'.encode() for i in range(n))


def source_pid(http_port: int) -> int:
    """The source process of the daemon serving ``http_port``."""
    def cmdline(pid: str) -> list[bytes]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return []

    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and b"consumers.source_process" in cmdline(entry.name):
            parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            if str(http_port).encode() in cmdline(parent):
                return int(entry.name)
    raise RuntimeError(f"no source process under the daemon on port {http_port}")


def killed_source(bootstrap: str, n: int) -> dict[str, object]:
    topic = f"faults-kill-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    for p in (0, 1):
        kcat(bootstrap, topic, events(f"u{p}-", n // 2, 2000), "none", p)
    with daemon(bootstrap, topic, "kill") as (port, _):
        wait("first snapshot", lambda s: s["model_version"] > 0, port)
        client = Client(port, [f"u0-{i}" for i in range(50)])
        wait("a quarter consumed", lambda s: s["events_consumed"] >= n // 4, port)
        os.kill(source_pid(port), signal.SIGKILL)
        killed = time.monotonic()
        # The rebuild is seen in the restart counter: the degraded status lasts about
        # a second, and a status poll can miss it.
        while restarts(port) < 1:
            if time.monotonic() - killed > 300:
                raise RuntimeError("the killed source process was not rebuilt in 300 s")
            time.sleep(0.01)
        up = wait("the new source up", lambda s: s["ingest"] == "ok", port)
        wait("ingest resumed", lambda s: s["events_consumed"] > up["events_consumed"], port)
        resumed = time.monotonic() - killed
        done = wait("all consumed", lambda s: s["events_consumed"] >= n, port)
        return {"resume_s": round(resumed, 2), "events_consumed": done["events_consumed"],
                **client.stop()}


def undecodable(bootstrap: str, n: int, bad: int, dead_letter: bool) -> dict[str, object]:
    topic = f"faults-lz4-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    kcat(bootstrap, topic, events("u0-", n // 2, 2000), "none", 0)
    kcat(bootstrap, topic, events("u1-", n // 4, 2000), "none", 1)
    kcat(bootstrap, topic, events("lz4-", bad, 200), "lz4", 1)
    kcat(bootstrap, topic, events("v1-", n // 4, 2000), "none", 1)
    with tempfile.TemporaryDirectory() as hide:
        (Path(hide) / "lz4").mkdir()
        (Path(hide) / "lz4" / "__init__.py").write_text("raise ImportError('hidden')\n")
        env = {"PYTHONPATH": hide, "NCF_STREAM_DEAD_LETTER_UNDECODABLE": str(dead_letter).lower()}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with daemon(bootstrap, topic, "lz4") as (port, _):
                wait("first snapshot", lambda s: s["model_version"] > 0, port)
                client = Client(port, [f"u0-{i}" for i in range(50)])
                # Partition 1 fails once its plain head is consumed, about when the total
                # reaches it (partition 0 flows alongside).
                wait("the plain head", lambda s: s["events_consumed"] >= n // 4, port)
                start = time.monotonic()
                if dead_letter:
                    done = wait("dead-lettered", lambda s: s["events_consumed"] >= n + bad,
                                port)
                    figure = {"skip_s": round(time.monotonic() - start, 2),
                              "events_rejected": done["events_rejected"]}
                else:
                    wait("blocked", lambda s: s["ingest"] == "degraded", port)
                    figure = {"block_s": round(time.monotonic() - start, 2)}
                return {**figure, **client.stop()}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int)
    parser.add_argument("--bad", type=int, help="records in the undecodable range")
    args = parser.parse_args()
    if shutil.which("kcat") is None:
        sys.exit("bench/faults.py needs kcat (Debian: apt-get install kcat)")
    n = args.events or (100_000 if args.quick else 400_000)
    bad = args.bad or (200 if args.quick else 2000)
    with existing_or_local() as bootstrap:
        out = {"events": n, "bad": bad,
               "killed_source": killed_source(bootstrap, n),
               "undecodable_blocked": undecodable(bootstrap, n, bad, dead_letter=False),
               "undecodable_dead_lettered": undecodable(bootstrap, n, bad, dead_letter=True)}
    out["target_met"] = all(v["failed_requests"] == 0 for v in out.values()
                            if isinstance(v, dict))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
