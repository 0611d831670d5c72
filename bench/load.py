"""Serving under ingest: query latency over HTTP and gRPC while the daemon trains at full speed.

    python bench/load.py [--quick] [--events N] [--items I] [--clients C] [--qps Q]
                         [--unknown-share S] [--replicas N[,N...]]

A real daemon (``ncf-stream serve``, a subprocess) consumes a synthetic stream
from the real broker as fast as it can, twice: the events are published once,
to a topic of one partition, and read from the beginning by two daemons in
consumer groups of their own, one after the other: once alone (the ingest
baseline) and once while clients in other processes ask top-10 over HTTP and
over gRPC, one connection each.

Open loop, corrected for coordinated omission (as wrk2 / HdrHistogram): a
client works through a fixed schedule, request i due ``i / --qps`` seconds
after its start (default 100/s), and every request due within the window is
sent, however slow the answers: one that could not go on time (the previous
answer was late) goes as soon as the connection is free. Its **latency** is
completion - scheduled time, so a stall counts against every request it held
up, not only the one that was waiting. The **service time** (completion -
actual send, what a closed-loop client measures) is reported beside it; the
gap between the two is time spent queued behind slow answers. ``--qps 0``: no
schedule, one request after the other as fast as answers come (which on 2
cores takes CPU from training in proportion); there latency = service time.

Users: a request goes to a user the served model knows at that moment
(uniform over them), or with probability ``--unknown-share`` (default 0.05) to
a user never published (a cold start by construction). One partition keeps the
consumed events a prefix of the published order, so the daemon's
``snapshot_events`` (the consumed events its served snapshot includes) names
the users it knows: those whose first event lies within that many. Each client
polls ``/v1/status`` five times a second and picks among the users first seen
before that point (a snapshot is never replaced by an older one, so the value
read may lag the served one, never lead it). Under ingest the early users of the
stream are therefore asked about more often than the late ones. The share of
cold-start answers actually observed is reported per protocol, among all
requests and among those for known users (0 unless the rule above fails).

Percentiles are reported only where the number of requests carries them: at
least 10 requests above the quantile, i.e. n >= 1000 for a p99 and n >= 10000
for a p999; below that the value is null and ``requests`` says how many there
were (``max_ms`` is always there). The bootstrap 95% interval of the p99 goes
with the p99 (null when the p99 is).

JSON keys (the last stdout line):

* ``http`` / ``grpc``: under ingest, per protocol, all clients pooled.
  ``p50_ms``, ``p99_ms``, ``p999_ms``, ``max_ms``, ``over_10ms`` (share of
  requests whose latency exceeded 10 ms): latency from the scheduled send time.
  ``p99_ci95_ms``: bootstrap 95% interval of that p99. ``requests``: how many
  were sent. ``qps``: requests / (first scheduled send to last completion),
  summed over clients; below the target when the clients fell behind.
  ``service_time``: ``p50_ms``, ``p99_ms``, ``p999_ms``, ``max_ms``,
  ``over_10ms`` of completion - actual send. ``sent_late_share``: share of
  requests sent more than 1 ms after their scheduled time. ``unknown_share``:
  share of requests sent to never-published users. ``cold_start_share``: share
  of answers flagged ``cold_start`` (HTTP's JSON field, gRPC's
  ``RecommendResponse.cold_start``). ``cold_start_share_of_known``: the same
  among requests for users the served snapshot included when they were sent.
  ``sent_during_ingest_share``: share of requests sent while the daemon had yet
  to consume the whole stream (by the clients' last status poll, 0.2 s old at
  most); the rest of the window ran after ingest (with few events the clients'
  5 s outlast it).
* ``after_ingest``: the same clients once the stream is consumed (replay
  training only), long enough for 1000 requests per protocol at the target
  rate (5-10 s): ``p50_ms``, ``p99_ms``, ``p99_ci95_ms``, ``max_ms``,
  ``requests``, ``cold_start_share``.
* ``over_10ms_under_ingest``: per protocol, the share of requests over 10 ms
  under ingest at the client (``client``: latency from the schedule;
  ``client_service``: service time) and inside the server's handlers
  (``server``: the daemon's own histogram, diffed over the loaded phase). The
  difference between ``client_service`` and ``server`` is transport, dispatch
  and waiting to be run; between ``client`` and ``client_service``, waiting
  behind earlier answers.
* ``events``, ``items``, ``clients_per_protocol``, ``target_qps_per_client``,
  ``unknown_share_target``; ``ingest_alone_per_s``, ``ingest_under_load_per_s``
  and ``ingest_ratio_under_load`` (under load / alone).

**Serving replicas** (``--replicas 0,1,2,4``; issue #22): per count N, in this one
run after the ingest baseline, a trainer (the daemon above, exporting its snapshots
to a fresh directory on /dev/shm, else the temporary directory) reads the topic from
the beginning in a consumer group of its own at full speed, beside N
``ncf-stream serve-replica`` processes on that directory, in the trainer's
environment so that their serving settings are its. N = 0 is the baseline: the
clients query the trainer itself, which exports nothing, as without ``--replicas``.
Client i of each
protocol queries replica i % N and polls that replica's ``/v1/status``, whose
``snapshot_events`` is that of the export it serves: the users it knows, which may
lag the trainer's. Every count gets the same clients per protocol,
``max(--clients, largest N)``: the same offered load (``--qps`` each), so that the
counts compare, with every replica queried. The replicas and the clients start
before the trainer (their start-up, seconds of CPU per process, would otherwise
come out of the ingest measured); the clients' window starts once every replica
answers ``/readyz`` 200 and every client has seen a served snapshot, for all of
them at once. Two load shapes per count, each beside a trainer of its own at full
ingest (one ingest is too short for both): the open-loop schedule above, for the
daemon run's window under ingest (latency), and back to back for 5 s
(throughput: requests per second of all clients of a protocol, summed over the
replicas; both protocols at once, as in the latency window). The trainer's ingest
rate beside each says what the replicas and their clients cost it on a shared
machine. There is no after-ingest phase.

JSON keys with ``--replicas`` (the last stdout line):

* ``replicas``: one entry per count, in the order given: ``n``; ``http`` /
  ``grpc``: the latency window's figures per protocol, as ``http`` / ``grpc``
  above (``p50_ms``, ``p99_ms`` with ``p99_ci95_ms``, ``p999_ms``,
  ``sent_during_ingest_share``, ...; ``sent_during_ingest_share`` says how much
  of the window ran beside the ingest, as of the trainer's counts in the export
  the replica serves); ``throughput_rps``: ``http``, ``grpc``, requests/s summed
  over all clients of the protocol in the back-to-back window;
  ``ingest_under_load_per_s``, ``ingest_under_throughput_per_s``: the trainer's
  events/s over its whole ingest beside the latency and the throughput window.
* ``ingest_alone_per_s``: the trainer alone (no export, no replicas, no clients);
  ``events``, ``items``, ``clients_per_protocol``, ``target_qps_per_client``,
  ``unknown_share_target``, ``latency_seconds``, ``throughput_seconds`` (the
  windows).

``--quick --replicas``: 150k events, a 2 s window per shape, both beside one
trainer per count (its ingest is mostly over before the clients start, so the
figures are those of replicas beside replay training; the two ingest rates are one);
about two minutes on 2 cores for 0,1,2,4, mostly process start-up. At 1M events
the ingest lasts about as long as the latency window: ``sent_during_ingest_share``
says how much of it ran beside the ingest; ``--events`` lengthens both.

``--quick`` (under a minute on 2 cores): 150k events over 100k items, so ingest
is over within the 5 s the clients run under it and the p99s under ingest are
null (500 requests per protocol); the p99s after ingest are carried. Full: 1M
events. The last line is one JSON object; progress, with the seconds since the
start, goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from kafka import KafkaProducer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consumers.broker import create_topics, existing_or_local, free_port  # noqa: E402
from consumers.kafka_source import producer_config  # noqa: E402
from consumers.produce import publish  # noqa: E402
from ncf_stream.events import encode_event  # noqa: E402
from ncf_stream.metrics import LATENCY_BUCKETS, PREFIX  # noqa: E402
from ncf_stream.settings import Settings  # noqa: E402
from ncf_stream.synth import SynthConfig, generate  # noqa: E402

START = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - START:5.1f} s] {text}", file=sys.stderr, flush=True)


def serving_env(bootstrap: str, topic: str, settings: Mapping[str, str] | None = None,
                snapshot_dir: str | None = None, **own: str) -> dict[str, str]:
    """The environment of a daemon (``own``: its checkpoints and consumer group) and of its
    replicas: the same ``settings`` for both, so a replica answers with the trainer's
    serving settings (docs/operations.md, "Serving replicas")."""
    return {**os.environ, "NCF_STREAM_KAFKA_BOOTSTRAP": bootstrap, "NCF_STREAM_KAFKA_TOPIC": topic,
            **({"NCF_STREAM_SNAPSHOT_DIR": snapshot_dir} if snapshot_dir else {}), **own,
            "NCF_STREAM_DEVICE": "cpu", **(settings or {})}


@contextlib.contextmanager
def server_process(command: str, http_port: int, grpc_port: int, env: Mapping[str, str],
                   log_name: str) -> Iterator[None]:
    """``ncf-stream <command>`` on these ports as a subprocess, its stderr in
    /tmp/ncf-load-<log_name>.log; stopped with SIGTERM, killed if it takes over 30 s."""
    log = open(f"/tmp/ncf-load-{log_name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "consumers.cli", command, "--http-port",
                             str(http_port), "--grpc-port", str(grpc_port)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def daemon(bootstrap: str, topic: str, name: str, settings: Mapping[str, str] | None = None,
           snapshot_dir: str | None = None,
           ports: tuple[int, int] | None = None) -> Iterator[tuple[int, int]]:
    """A daemon reading ``topic`` from the beginning in a consumer group of its own;
    ``settings``: more ``NCF_STREAM_*`` environment variables (bench/quality_daemon.py);
    ``snapshot_dir``: where it exports its snapshots for replicas (none unless given);
    ``ports``: its HTTP and gRPC ports (free ones unless given)."""
    http_port, grpc_port = ports or (free_port(), free_port())
    # Each run leaves two state copies: removed once the daemon has stopped.
    with tempfile.TemporaryDirectory(prefix="ncf-load-ckpt-") as checkpoints:
        env = serving_env(bootstrap, topic, settings, snapshot_dir,
                          NCF_STREAM_CHECKPOINT_DIR=checkpoints,
                          NCF_STREAM_KAFKA_GROUP_ID=f"{topic}-{name}")
        with server_process("serve", http_port, grpc_port, env, f"{topic}-{name}"):
            yield http_port, grpc_port


def export_dir() -> tempfile.TemporaryDirectory[str]:
    """A fresh directory for a trainer's snapshot exports: on /dev/shm where there is one,
    as docs/operations.md advises on one machine (memory: no disk in the figures)."""
    shm = Path("/dev/shm")
    return tempfile.TemporaryDirectory(prefix="ncf-load-snap-",
                                       dir=shm if shm.is_dir() else None)


@contextlib.contextmanager
def replica(bootstrap: str, topic: str, name: str, snapshot_dir: str,
            settings: Mapping[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """``ncf-stream serve-replica`` on ``snapshot_dir``, in the environment a daemon of the
    same ``settings`` gets; yields its (HTTP, gRPC) ports as soon as it is started."""
    http_port, grpc_port = free_port(), free_port()
    with server_process("serve-replica", http_port, grpc_port,
                        serving_env(bootstrap, topic, settings, snapshot_dir),
                        f"{topic}-{name}"):
        yield http_port, grpc_port


def http_code(http_port: int, path: str) -> int | None:
    """The status code of a GET, or None while nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_http(http_port: int, path: str = "/readyz", want: int | None = None,
              timeout: float = 180.0) -> None:
    """Until the server on ``http_port`` answers ``path`` (with ``want``, when given)."""
    deadline = time.monotonic() + timeout
    while (code := http_code(http_port, path)) is None or want not in (None, code):
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {http_port}: GET {path} gave {code} for {timeout:g} s "
                               "(see its log in /tmp/ncf-load-*.log)")
        time.sleep(0.1)


def get(http_port: int, path: str, timeout: float = 10.0) -> bytes:
    """GET from the daemon with the standard library, on a fresh connection.

    Not httpx.get: it builds an SSL context per call, 21 ms of CPU, so polling the
    status ten times a second took a fifth of a core from the daemon under test.
    """
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise http.client.HTTPException(f"GET {path}: HTTP {response.status}")
        return body
    finally:
        conn.close()


def status(http_port: int) -> dict[str, float] | None:
    try:
        return json.loads(get(http_port, "/v1/status", timeout=5))
    except (OSError, http.client.HTTPException, ValueError):
        return None


ENDPOINTS = {"http": "/v1/recommend", "grpc": "Recommend"}
SLOW_S = 0.010
assert SLOW_S in LATENCY_BUCKETS, "the server side is read from that histogram bucket"


def server_counts(http_port: int) -> dict[str, tuple[float, float]]:
    """(requests, requests over SLOW_S) per protocol, from the daemon's own latency histogram:
    the time inside the handler, without transport, queueing on the server's loop or the
    client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = get(http_port, "/metrics").decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name != f"{PREFIX}_request_duration_seconds":
            continue
        for protocol, endpoint in ENDPOINTS.items():
            mine = [x for x in family.samples if x.labels.get("protocol") == protocol
                    and x.labels.get("endpoint") == endpoint]
            total = next(x.value for x in mine if x.name.endswith("_count"))
            fast = next(x.value for x in mine if x.name.endswith("_bucket")
                        and float(x.labels["le"]) == SLOW_S)
            out[protocol] = (total, total - fast)
    return out


def slow_shares(client: dict[str, dict[str, Any]], before: dict[str, tuple[float, float]],
                after: dict[str, tuple[float, float]]) -> dict[str, dict[str, float | None]]:
    """Share of requests over SLOW_S as the client saw them (from the schedule and as
    service time) and inside the server."""
    out = {}
    for protocol in ENDPOINTS:
        n, slow = (a - b for a, b in zip(after[protocol], before[protocol], strict=True))
        out[protocol] = {"client": client[protocol]["over_10ms"],
                         "client_service": client[protocol]["service_time"]["over_10ms"],
                         "server": round(slow / n, 4) if n else 0.0}
    return out


def ingest_rate(http_port: int, total: int, on_ready: threading.Event | None = None) -> float:
    """Events/s from the first consumed event to the last; sets ``on_ready`` when serving."""
    first_t: float | None = None
    first_n = 0.0
    deadline = time.monotonic() + 600
    while True:
        s = status(http_port)
        now = time.monotonic()
        if s is not None:
            if on_ready is not None and s["model_version"] > 0:
                on_ready.set()
            if first_t is None and s["events_consumed"] > 0:
                first_t, first_n = now, s["events_consumed"]
            if s["events_consumed"] >= total and first_t is not None:
                return (total - first_n) / max(now - first_t, 1e-9)
        if now > deadline or (s is None and first_t is not None):
            raise RuntimeError(f"ingest did not finish (the daemon stopped answering): {s}")
        time.sleep(0.1)


@contextlib.contextmanager
def ingest_watch(http_port: int, total: int) -> Iterator[dict[str, float]]:
    """``ingest_rate`` on a thread of its own: entered once the daemon serves, left once it
    has consumed the whole stream; the rate is then the yielded dict's ``rate``."""
    ready = threading.Event()
    result: dict[str, float] = {}
    # A daemon thread: a failure in the body must not leave the bench waiting on it.
    watcher = threading.Thread(target=lambda: result.update(rate=ingest_rate(http_port, total,
                                                                            ready)),
                               daemon=True)
    watcher.start()
    ready.wait(300)
    yield result
    watcher.join()


@contextlib.contextmanager
def trainer_with_replicas(
        bootstrap: str, topic: str, name: str, replicas: int, total: int,
        launch: Callable[[list[tuple[int, int]]], Clients],
) -> Iterator[tuple[list[tuple[int, int]], Clients, dict[str, float]]]:
    """A daemon reading ``topic`` from the beginning (``daemon``) and ``replicas`` replicas
    on its exports, every one serving. ``launch`` starts clients on the (HTTP, gRPC) ports
    they are to query (the replicas', or with none the trainer's) before the trainer
    starts. Yields those ports, what ``launch`` returned and the trainer's
    ``ingest_watch``, left once it has consumed all ``total`` events."""
    trainer = free_port(), free_port()
    with contextlib.ExitStack() as stack:
        snapshot_dir = stack.enter_context(export_dir()) if replicas else None
        servers = [stack.enter_context(replica(bootstrap, topic, f"{name}-replica{i}",
                                               str(snapshot_dir)))
                   for i in range(replicas)]
        # Replicas and clients are up before the trainer starts: their start-up (imports,
        # mostly; seconds of CPU each) would otherwise come out of the ingest measured.
        # Replicas answer 503 until the first export loads, clients wait for a snapshot.
        for http_port, _ in servers:
            wait_http(http_port)
        clients = launch(servers or [trainer])
        stack.callback(kill_left, clients)  # none left unless something failed
        stack.enter_context(daemon(bootstrap, topic, name, snapshot_dir=snapshot_dir,
                                   ports=trainer))
        ingest = stack.enter_context(ingest_watch(trainer[0], total))
        for http_port, _ in servers:
            wait_http(http_port, want=200)
        yield servers or [trainer], clients, ingest


MIN_ABOVE = 10  # requests above a quantile needed before it is reported
LATE_S = 0.001  # a send this long after its scheduled time counts as late


def min_requests(pct: float, above: int = MIN_ABOVE) -> int:
    """The fewest requests that put ``above`` of them over the ``pct`` percentile:
    1000 for a p99, 10000 for a p999."""
    if not 0 <= pct < 100:
        raise ValueError(f"percentile must lie in [0, 100), got {pct}")
    return math.ceil(round(above * 100 / (100 - pct), 6))


def percentile_ms(ms: np.ndarray, pct: float) -> float | None:
    """The ``pct`` percentile, or None when there are too few requests to carry it."""
    if len(ms) < min_requests(pct):
        return None
    return round(float(np.percentile(ms, pct)), 2)


def due_times(qps: float, seconds: float) -> np.ndarray:
    """Open-loop schedule: request i is due ``i / qps`` s after the start, for every i due
    before ``seconds``."""
    if qps <= 0 or seconds < 0:
        raise ValueError(f"qps must be > 0 and seconds >= 0, got {qps}, {seconds}")
    return np.arange(math.ceil(round(seconds * qps, 6))) / qps


def first_seen(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct users of a stream in the order of their first event, and the index
    of that event in the stream."""
    distinct, first = np.unique(users, return_index=True)
    order = np.argsort(first, kind="stable")
    return distinct[order], first[order]


def covered_users(first: np.ndarray, covered: int) -> int:
    """How many users (in ``first_seen`` order) the first ``covered`` events of the
    stream name: those whose first event's index is below ``covered``."""
    return int(np.searchsorted(first, covered, side="left"))


def pick_known(rng: np.random.Generator, users: np.ndarray, first: np.ndarray,
               covered: int) -> Any:
    """A user drawn uniformly from those the first ``covered`` events name (``users`` and
    ``first`` as ``first_seen`` returns them)."""
    known = covered_users(first, covered)
    if known == 0:
        raise ValueError(f"the first {covered} events name no user")
    return users[rng.integers(known)]


class Covered:
    """The daemon's ``snapshot_events``, polled on a thread of its own every
    ``every_s`` with the standard library: the prefix of the published events that the
    served snapshot includes. Only ever raised, so a late read errs on the safe side.
    ``consumed``: its ``events_consumed`` at the same poll."""

    def __init__(self, http_port: int, every_s: float = 0.2, wait_s: float = 60.0) -> None:
        self.http_port, self.every_s, self.value, self.consumed = http_port, every_s, 0, 0
        deadline = time.monotonic() + wait_s
        while not self._poll():
            if time.monotonic() > deadline:
                raise RuntimeError("the daemon served no snapshot of any event")
            time.sleep(every_s)
        threading.Thread(target=self._run, name="covered", daemon=True).start()

    def _poll(self) -> int:
        s = status(self.http_port)
        if s is not None:
            self.value = max(self.value, int(s["snapshot_events"]))
            self.consumed = max(self.consumed, int(s["events_consumed"]))
        return self.value

    def _run(self) -> None:
        while True:
            time.sleep(self.every_s)
            self._poll()


def client_main(protocol: str, port: int, status_port: int, users_file: str, seconds: float,
                qps: float, unknown_share: float, seed: int, together: bool = False) -> None:
    """One connection, one request at a time, on the open-loop schedule of ``due_times``
    (``qps`` 0: back to back for ``seconds``), each to a user the served snapshot knows
    (``Covered``, ``pick_known``) or, at ``unknown_share``, to one never published.
    Prints, per request, the scheduled, send and completion times (s after the start),
    whether the user was never published, whether the answer was a cold start and
    whether the daemon had yet to consume the whole stream when it was sent (as of the
    last poll). ``together``: says "ready" on stdout once set up and starts when a line
    comes in on stdin (``run_clients``)."""
    rng = np.random.default_rng(seed)
    published = np.load(users_file)
    users, first, events = published["users"], published["first"], int(published["events"])
    call: Callable[[str], bool]
    if protocol == "http":
        # The standard library's client on one keep-alive connection: httpx spent 1-1.5 ms
        # of its own per request at p50 and ~3 ms at p99 here (a GET /healthz under ingest:
        # p50 2.3 vs 0.8 ms, p99 9.2 vs 6.3 ms against a bare socket), which the latencies
        # would have counted as the server's.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json"}

        def call(user: str) -> bool:
            conn.request("POST", "/v1/recommend", json.dumps({"user": user, "k": 10}), headers)
            response = conn.getresponse()
            body = response.read()
            answer = json.loads(body) if response.status == 200 else {}
            if not answer.get("items"):
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
            return bool(answer["cold_start"])
    else:
        import grpc

        from ncf_stream.proto import recommender_pb2 as pb
        from ncf_stream.proto import recommender_pb2_grpc as pb_grpc

        stub = pb_grpc.RecommenderStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def call(user: str) -> bool:
            return bool(stub.Recommend(pb.RecommendRequest(user=user, k=10),
                                       timeout=10).cold_start)

    schedule = due_times(qps, seconds).tolist() if qps else []
    out: dict[str, list[float]] = {"due": [], "sent": [], "done": [], "unknown": [], "cold": [],
                                   "ingesting": []}
    covered = Covered(status_port)
    if together:
        print("ready", flush=True)
        sys.stdin.readline()
    begin = time.perf_counter()
    i = 0
    while (i < len(schedule)) if qps else (time.perf_counter() < begin + seconds):
        if qps:
            ahead = begin + schedule[i] - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        unknown = bool(rng.random() < unknown_share)
        user = (f"unknown-{seed}-{i}" if unknown else
                str(pick_known(rng, users, first, covered.value)))
        ingesting = covered.consumed < events
        sent = time.perf_counter() - begin
        cold = call(user)
        done = time.perf_counter() - begin
        out["due"].append(schedule[i] if qps else sent)
        out["sent"].append(sent)
        out["done"].append(done)
        out["unknown"].append(float(unknown))
        out["cold"].append(float(cold))
        out["ingesting"].append(float(ingesting))
        i += 1
    print(json.dumps(out))


def spread(clients: int, servers: int) -> list[int]:
    """The server each of ``clients`` clients (of one protocol) queries: client i the
    i % ``servers``-th, so the load is spread evenly and the same way for both protocols."""
    if clients < 0 or servers < 1:
        raise ValueError(f"need clients >= 0 and servers >= 1, got {clients}, {servers}")
    return [c % servers for c in range(clients)]


Clients = list[tuple[str, "subprocess.Popen[str]"]]


def launch_clients(servers: Sequence[tuple[int, int]], users_file: str, seconds: float,
                   clients: int, qps: float, unknown_share: float,
                   together: bool = False) -> Clients:
    """``clients`` client processes per protocol, spread over ``servers`` (HTTP, gRPC
    ports) by ``spread``, each polling the status of the server it queries (a replica
    knows the users of the snapshot it serves, which may lag the trainer's).
    ``together``: each waits, once set up (imports, a served snapshot seen), for
    ``collect_clients`` to start them all at once."""
    procs: Clients = []
    for protocol in ENDPOINTS:
        for c, server in enumerate(spread(clients, len(servers))):
            http_port, grpc_port = servers[server]
            seed = (1 if protocol == "http" else 2) + 1000 * c
            procs.append((protocol, subprocess.Popen(
                [sys.executable, __file__, "--client", protocol,
                 "--port", str(http_port if protocol == "http" else grpc_port),
                 "--status-port", str(http_port), "--users-file", users_file,
                 "--seconds", str(seconds), "--qps", str(qps),
                 "--unknown-share", str(unknown_share), "--seed", str(seed),
                 *(["--together"] if together else [])],
                stdin=subprocess.PIPE if together else None, stdout=subprocess.PIPE,
                text=True)))
    return procs


def kill_left(procs: Clients) -> None:
    for _, p in procs:
        if p.poll() is None:
            p.kill()


def collect_clients(procs: Clients, seconds: float) -> dict[str, dict[str, Any]]:
    """Start clients launched ``together`` (the others started themselves), wait for their
    windows of ``seconds`` and summarize them per protocol."""
    waiting = [(protocol, p) for protocol, p in procs if p.stdin is not None]
    # Each says "ready" once set up and waits for a line: a start staggered by process
    # start-up would leave fewer clients running at the ends of the window, which a
    # closed-loop throughput would count as more per client.
    for protocol, p in waiting:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {protocol} client failed to start ({p.wait()})")
    for _, p in waiting:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    runs: dict[str, list[dict[str, list[float]]]] = {"http": [], "grpc": []}
    for protocol, p in procs:
        stdout, _ = p.communicate(timeout=seconds + 120)
        if p.returncode:
            raise RuntimeError(f"{protocol} client exited with {p.returncode}")
        runs[protocol].append(json.loads(stdout.strip().splitlines()[-1]))
    return {protocol: summarize(r) for protocol, r in runs.items()}


def run_clients(servers: Sequence[tuple[int, int]], users_file: str, seconds: float,
                clients: int, qps: float, unknown_share: float,
                together: bool = False) -> dict[str, dict[str, Any]]:
    """``launch_clients``, then ``collect_clients``."""
    return collect_clients(launch_clients(servers, users_file, seconds, clients, qps,
                                          unknown_share, together), seconds)


def summarize(runs: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Latency (completion - scheduled) and service time (completion - send) of one
    protocol's requests, all clients pooled."""
    cat = {k: np.concatenate([np.asarray(r[k], dtype=float) for r in runs]) for k in runs[0]}
    latency = (cat["done"] - cat["due"]) * 1000
    service = (cat["done"] - cat["sent"]) * 1000
    unknown, cold = cat["unknown"] > 0, cat["cold"] > 0
    known = ~unknown
    p99 = percentile_ms(latency, 99)
    return {
        "qps": round(sum(len(r["done"]) / max(r["done"][-1], 1e-9) for r in runs if r["done"]), 1),
        **tail(latency),
        "p99_ci95_ms": p99_interval(latency) if p99 is not None else None,
        "requests": len(latency),
        "service_time": tail(service),
        "sent_late_share": share((cat["sent"] - cat["due"]) > LATE_S),
        "unknown_share": share(unknown),
        "cold_start_share": share(cold),
        "cold_start_share_of_known": share(cold[known]),
        "sent_during_ingest_share": share(cat["ingesting"] > 0),
    }


def tail(ms: np.ndarray) -> dict[str, float | None]:
    return {"p50_ms": percentile_ms(ms, 50), "p99_ms": percentile_ms(ms, 99),
            "p999_ms": percentile_ms(ms, 99.9),
            "max_ms": round(float(ms.max()), 2) if len(ms) else None,
            "over_10ms": share(ms > SLOW_S * 1000)}


def share(flags: np.ndarray) -> float | None:
    return round(float(np.mean(flags)), 4) if len(flags) else None


def p99_interval(ms: np.ndarray, resamples: int = 2000) -> list[float]:
    """Bootstrap 95% interval of the p99: at 1000 requests the p99 is the 10th worst, and
    two identical runs on this box differ by more than the gap to a 10 ms target."""
    rng = np.random.default_rng(0)
    p99 = np.percentile(ms[rng.integers(0, len(ms), (resamples, len(ms)))], 99, axis=1)
    return [round(float(v), 2) for v in np.percentile(p99, [2.5, 97.5])]


def unit_share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a share lies in [0, 1], got {text}")
    return value


def under_ingest_seconds(events: int, rate_alone: float) -> float:
    """The clients' window under ingest: most of it (it is slower under load than alone),
    and at 1M events enough requests to carry a p99 (0.8 of it gave 983 of the 1000
    needed)."""
    return max(5.0, 0.9 * events / rate_alone)


def replica_counts(text: str) -> list[int]:
    """``--replicas``: replica counts, comma-separated, each >= 0 (0: the clients query the
    trainer itself, as without ``--replicas``)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated counts, got {text!r}") from None
    if any(c < 0 for c in counts):
        raise argparse.ArgumentTypeError(f"a replica count is >= 0, got {text!r}")
    return counts


def replica_clients(clients: int, counts: Sequence[int]) -> int:
    """Clients per protocol in replica mode: the same for every count, so every count gets
    the same offered load and their figures compare, and at least the largest count, so
    every replica is queried."""
    return max(clients, *counts)


QUICK_WINDOW_S = 2.0  # --quick --replicas: each load shape's client window
THROUGHPUT_S = 5.0  # the closed-loop window of a full run


def replica_runs(bootstrap: str, topic: str, n: int, users_file: str, counts: Sequence[int],
                 clients: int, qps: float, unknown_share: float, windows: tuple[float, float],
                 one_trainer: bool = False) -> list[dict[str, Any]]:
    """Per replica count, the clients on the open-loop schedule at ``qps`` each (latency),
    then back to back (throughput), for ``windows`` seconds each. Each beside a trainer of
    its own at full ingest (one ingest is too short for both windows); ``one_trainer``:
    both beside one trainer (``--quick``, whose ingest is mostly over before the clients
    start anyway)."""
    def launch(servers: Sequence[tuple[int, int]], rate: float, seconds: float) -> Clients:
        # Together: the window is the same for every client, which the summed per-client
        # rates of a throughput need.
        return launch_clients(servers, users_file, seconds, clients, rate, unknown_share,
                              together=True)

    shapes = (("latency", qps, windows[0]), ("throughput", 0.0, windows[1]))
    groups = [shapes] if one_trainer else [shapes[:1], shapes[1:]]
    out = []
    for count in counts:
        summaries, rates = {}, {}
        for group in groups:
            name = f"n{count}-" + "-".join(shape for shape, _, _ in group)
            first = functools.partial(launch, rate=group[0][1], seconds=group[0][2])
            with trainer_with_replicas(bootstrap, topic, name, count, n, first) as (
                    servers, procs, ingest):
                for i, (shape, rate, seconds) in enumerate(group):
                    progress(f"{count} replicas: {shape}, {clients} clients per protocol")
                    summaries[shape] = collect_clients(
                        procs if i == 0 else launch(servers, rate, seconds), seconds)
            rates.update({shape: round(ingest["rate"]) for shape, _, _ in group})
        latency = summaries["latency"]
        out.append({"n": count, **latency,
                    "throughput_rps": {p: summaries["throughput"][p]["qps"] for p in ENDPOINTS},
                    "ingest_under_load_per_s": rates["latency"],
                    "ingest_under_throughput_per_s": rates["throughput"]})
        progress(f"{count} replicas: p99 {latency['http']['p99_ms']} / "
                 f"{latency['grpc']['p99_ms']} ms, {out[-1]['throughput_rps']} requests/s")
    return out


IDLE_REQUESTS = 1000  # after ingest: enough per protocol to carry a p99
QUICK_EVENTS = 150_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--events", type=int)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=1, help="clients (connections) per protocol")
    parser.add_argument("--qps", type=float, default=100.0,
                        help="each client's schedule, requests/s (0: back to back, no schedule)")
    parser.add_argument("--unknown-share", type=unit_share, default=0.05,
                        help="share of requests for users never published (cold starts)")
    parser.add_argument("--replicas", type=replica_counts,
                        help="replica counts to compare, e.g. 0,1,2,4 (see the docstring)")
    parser.add_argument("--client", choices=["http", "grpc"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--status-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--users-file", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--together", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client_main(args.client, args.port, args.status_port, args.users_file, args.seconds,
                    args.qps, args.unknown_share, args.seed, args.together)
        return
    n = args.events or (QUICK_EVENTS if args.quick else 1_000_000)
    users = max(1000, n // 10)
    stream = generate(SynthConfig(users=users, items=args.items, events=n, seed=0, topics=50))
    msgs: list[tuple[bytes | None, bytes]] = [
        (str(u).encode(), encode_event(str(u), str(i), t)) for u, i, t in
        zip(stream.users.tolist(), stream.items.tolist(), stream.ts.tolist(), strict=True)]
    workdir = tempfile.TemporaryDirectory(prefix="ncf-load-users-")
    users_file = str(Path(workdir.name) / "published.npz")
    by_first, first = first_seen(stream.users)  # the users requests go to, unknown aside
    np.savez(users_file, users=by_first, first=first, events=n)
    rate = args.qps * args.clients
    idle_seconds = min(10.0, max(5.0, IDLE_REQUESTS / rate)) if rate else 5.0
    progress(f"generated {n:,} events")
    with workdir, existing_or_local() as bootstrap:
        progress(f"broker at {bootstrap}")
        # One partition: the order the daemons consume in is the order published, which
        # is what tells the clients which users the served snapshot knows.
        topic = f"load-{uuid.uuid4().hex[:8]}"
        create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=1)
        settings = Settings(kafka_bootstrap=bootstrap)
        producer = KafkaProducer(**{**producer_config(settings), "linger_ms": 50,
                                    "batch_size": 1 << 20})  # 27 vs 31 us a record here
        try:
            sent, failed, _ = publish(msgs, settings, topic, producer=producer)
        finally:
            producer.close(timeout=10)
        if failed or sent != n:
            raise RuntimeError(f"published {sent} of {n} events ({failed} failed)")
        del msgs
        progress(f"published {n:,} events ({args.items:,} items) to {topic}")

        with daemon(bootstrap, topic, "alone") as (http_port, _):
            rate_alone = ingest_rate(http_port, n)
            progress(f"ingest alone: {rate_alone:,.0f} events/s")
        if args.replicas is not None:
            clients = replica_clients(args.clients, args.replicas)
            windows = ((QUICK_WINDOW_S, QUICK_WINDOW_S) if args.quick else
                       (under_ingest_seconds(n, rate_alone), THROUGHPUT_S))
            runs = replica_runs(bootstrap, topic, n, users_file, args.replicas, clients,
                                args.qps, args.unknown_share, windows, one_trainer=args.quick)
            print(json.dumps({
                "events": n, "items": args.items, "clients_per_protocol": clients,
                "target_qps_per_client": args.qps, "unknown_share_target": args.unknown_share,
                "latency_seconds": round(windows[0], 1), "throughput_seconds": windows[1],
                "ingest_alone_per_s": round(rate_alone), "replicas": runs}))
            return

        with daemon(bootstrap, topic, "loaded") as ports:
            with ingest_watch(ports[0], n) as result:
                progress("serving: clients under ingest")
                before = server_counts(ports[0])
                latency = run_clients([ports], users_file, under_ingest_seconds(n, rate_alone),
                                      args.clients, args.qps, args.unknown_share)
                shares = slow_shares(latency, before, server_counts(ports[0]))
            progress("stream consumed: clients after ingest")
            # The same clients once the stream is consumed (replay training goes on):
            # what ingest adds to the latencies.
            idle = run_clients([ports], users_file, idle_seconds, args.clients, args.qps,
                               args.unknown_share)
        rate_loaded = result["rate"]
    print(f"ingest under load: {rate_loaded:,.0f} events/s; {latency}", file=sys.stderr)
    print(f"after the stream is consumed: {idle}", file=sys.stderr)
    print(f"share of requests over {SLOW_S * 1000:.0f} ms under ingest, at the client (from "
          f"the schedule; service time) and inside the server's handler: {shares}",
          file=sys.stderr)
    print(json.dumps({
        "events": n, "items": args.items, "clients_per_protocol": args.clients,
        "target_qps_per_client": args.qps, "unknown_share_target": args.unknown_share,
        "http": latency["http"], "grpc": latency["grpc"],
        "after_ingest": {p: {k: idle[p][k] for k in ("p50_ms", "p99_ms", "p99_ci95_ms", "max_ms",
                                                     "requests", "cold_start_share")}
                         for p in idle},
        "over_10ms_under_ingest": shares,
        "ingest_alone_per_s": round(rate_alone), "ingest_under_load_per_s": round(rate_loaded),
        "ingest_ratio_under_load": round(rate_loaded / rate_alone, 3),
    }))


if __name__ == "__main__":
    main()
