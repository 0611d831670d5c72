"""``ncf-stream serve``: the source, trainer, publisher, evaluator, HTTP and gRPC in one process.

One thread consumes and trains: poll, probe the online hit rate, ingest, train
until the fresh positives are drained (then replay, at ``replay_duty`` of the
time while the stream is idle), publish a snapshot when due. The evaluator,
the HTTP server (uvicorn) and the gRPC server run on their own threads and
read snapshots only. SIGTERM/SIGINT stop consuming, finish the step, and stop
the servers with a grace period.

Durability: the state (model, optimizer, store, ids) is checkpointed every
``checkpoint_every_s`` and at shutdown, with the offsets it includes; only then
are those offsets committed to Kafka. On start the newest valid checkpoint is
restored and the consumer seeks to its offsets, so after a crash the events
since the checkpoint are applied once more to the restored state: every
event's effect on the store happens exactly once.
"""

from __future__ import annotations

import gc
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
import uvicorn
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, start_http_server

from consumers.kafka_source import KafkaSource
from consumers.source_process import ProcessSource
from ncf_stream import checkpoint
from ncf_stream.api import Status
from ncf_stream.evaluator import EvalConfig, EvalReport, Evaluator, OnlineHitRate
from ncf_stream.grpc_server import GrpcServer
from ncf_stream.http_app import create_app
from ncf_stream.metrics import Metrics
from ncf_stream.recommend import Recommender
from ncf_stream.retrieval import IndexConfig
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.source import LAG_EVERY_S, EventBatch, EventSource, Partition
from ncf_stream.status_page import History, Sample
from ncf_stream.threads import background_thread, reader_thread, tune_malloc
from ncf_stream.trainer import StepStats, Trainer, TrainerConfig

log = logging.getLogger(__name__)

TRAIN_SLICE_S = 0.05  # train this long between polls, so consumption never stalls
HISTORY_EVERY_S = 2.0
SWITCH_INTERVAL_S = 2e-5


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Counters:
    consumed: int = 0
    rejected: int = 0
    trained: int = 0
    lag: int = 0


class Daemon:
    def __init__(self, settings: Settings, source: EventSource | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        tune_malloc()  # before the big allocations: see threads.tune_malloc
        self.settings = s = settings
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.device = resolve_device(s.device)
        self.trainer = Trainer(TrainerConfig.from_settings(s), self.device)
        self.holder = SnapshotHolder()
        self.publisher = Publisher(
            self.trainer, self.holder,
            IndexConfig.from_settings(s),
            every_s=s.publish_every_s, every_events=s.publish_every_events,
            index_refresh_s=s.index_refresh_s)
        self.recommender = Recommender(self.holder, s.candidates, s.max_k)
        self.evaluator = Evaluator(
            self.holder, EvalConfig.from_settings(s),
            on_report=self._export_eval)
        self.online = OnlineHitRate(s.online_fraction, candidates=s.candidates, seed=s.seed)
        self.counters = Counters()
        # Next offset per partition that the state includes: the checkpoint's, then
        # advanced by every ingested batch. The source seeks here on assignment.
        self.positions: dict[Partition, int] = {}
        self.restored = None
        if s.checkpoint_dir:
            self.restored = checkpoint.load_latest(s.checkpoint_dir, self.trainer)
        if self.restored is not None:
            self.positions = dict(self.restored.offsets)
            self.counters = Counters(**{k: v for k, v in self.restored.counters.items()
                                        if k in Counters.__dataclass_fields__})
        self._last_checkpoint = time.monotonic()
        self._checkpointed_positions = dict(self.positions)
        self._unpublished_since: float | None = None
        self._drawn = (0, 0)
        self._last_query_count = 0
        self._stop = threading.Event()
        self.source = source or (
            ProcessSource(s, metrics=self.metrics.ingest, positions=self.positions,
                          background=s.background_policy,  # ingest work: requests first
                          id_maps=(self.trainer.user_ids, self.trainer.item_ids))
            if s.kafka_source_process else
            KafkaSource(s, metrics=self.metrics.ingest, positions=lambda: self.positions))
        self._http_socket = _bind(s.http_host, s.http_port)
        self.http_port = self._http_socket.getsockname()[1]
        self.history = History()
        self._last_sample: Sample | None = None
        app = create_app(self.recommender, self.status, self.metrics.registry,
                         self.metrics.serving, self.evaluator, self.history)
        # httptools' C parser and uvloop: 178 instead of 285 us of server CPU per request,
        # all of it holding the GIL (h11 and asyncio's loop are pure Python;
        # bench/http_stack.py).
        self._http = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   http="httptools", loop="uvloop"))
        self._http_thread = threading.Thread(target=self._serve_http, name="ncf-http",
                                             daemon=True)
        self.grpc = GrpcServer(self.recommender, self.status, self.metrics.serving,
                               s.grpc_host, s.grpc_port)

    def _serve_http(self) -> None:
        reader_thread()  # handlers run on the event loop thread
        self._http.run(sockets=[self._http_socket])

    # ---- status --------------------------------------------------------------------------

    def status(self) -> Status:
        snap = self.holder.get()
        c = self.counters
        return Status(
            events_consumed=c.consumed, events_rejected=c.rejected, events_trained=c.trained,
            consumer_lag=c.lag, users=len(self.trainer.user_ids),
            items=len(self.trainer.item_ids), interactions=len(self.trainer.store),
            model_version=0 if snap is None else snap.version,
            snapshot_events=0 if snap is None else snap.events,
            snapshot_age_seconds=0.0 if snap is None else round(snap.age(), 3))

    # ---- lifecycle -------------------------------------------------------------------------

    def start_servers(self) -> None:
        if self.settings.metrics_port is not None:  # /metrics alone, on a port of its own
            start_http_server(self.settings.metrics_port, self.settings.http_host,
                              registry=self.metrics.registry)
        self._http_thread.start()
        self.grpc.start()
        self.evaluator.start()
        log.info("serving HTTP on %s:%d, gRPC on %s:%d", self.settings.http_host,
                 self.http_port, self.settings.grpc_host, self.grpc.port)

    def run(self) -> None:
        """Serve and train until :meth:`stop`; then shut down cleanly."""
        # The trainer thread holds the GIL between kernels; with the default 5 ms
        # switch interval a request waits up to 5 ms at every thread hand-off
        # (a request against a thread running pure Python, as kafka-python's
        # parser does: p50 4.9 ms at 0.1 ms, 3.2 ms at 20 us; at 5 us no better).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        _quiet_gc()
        self.start_servers()
        failure: list[BaseException] = []

        def train() -> None:
            # Before its first kernel: the OpenMP team inherits the policy.
            background_thread(self.settings.background_policy)
            try:
                self._loop()
            except BaseException as e:  # re-raised on the calling thread
                failure.append(e)
                self._stop.set()

        trainer = threading.Thread(target=train, name="ncf-trainer")
        trainer.start()
        try:
            while trainer.is_alive():
                trainer.join(0.5)  # the main thread stays free for signal handlers
        finally:
            self._stop.set()
            trainer.join()
            try:
                if not failure:
                    self.checkpoint()  # the final one: a clean restart replays nothing
            finally:
                self.shutdown()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        self._stop.set()

    def checkpoint(self) -> None:
        """Write a checkpoint of the state and the offsets it covers; then commit them."""
        if not self.settings.checkpoint_dir or self.positions == self._checkpointed_positions:
            return
        start = time.perf_counter()
        flush = getattr(self.source, "flush", None)
        if flush is not None:
            flush()  # dead letters first: the checkpoint must not cover an unwritten one
        counters = {"consumed": self.counters.consumed, "rejected": self.counters.rejected,
                    "trained": self.counters.trained}
        path = checkpoint.save(self.settings.checkpoint_dir, self.trainer, self.positions,
                               counters, keep=self.settings.checkpoint_keep)
        self._checkpointed_positions = dict(self.positions)
        self.metrics.engine.checkpoint_seconds.observe(time.perf_counter() - start)
        try:
            self.source.commit(self.positions)
        except KafkaError as e:  # the checkpoint holds the truth; a commit is a courtesy
            log.warning("could not commit offsets after %s: %s", path.name, e)

    def shutdown(self) -> None:
        grace = self.settings.shutdown_grace_s
        self.evaluator.stop()
        self.grpc.stop(grace)
        self._http.should_exit = True
        self._http_thread.join(grace + 1)
        self.publisher.close()
        self.source.close()
        gc.unfreeze()  # let interpreter exit see (and free) everything

    # ---- the consumer/trainer loop -----------------------------------------------------------

    def _loop(self) -> None:
        last_lag = 0.0
        idle_wait = self.settings.kafka_poll_timeout_s
        while not self._stop.is_set():
            busy = self.trainer.pending > 0
            batch = self.source.poll(0.0 if busy else idle_wait)
            if batch is not None:
                self._ingest(batch)
            worked = self._train()
            if not busy and batch is None and worked > 0:
                # Idle: replay was the work; rest so that replay takes replay_duty.
                self._stop.wait(worked * (1 / self.settings.replay_duty - 1))
            self._maybe_publish()
            now = time.monotonic()
            if now - self._last_checkpoint >= self.settings.checkpoint_every_s:
                self._last_checkpoint = now
                self.checkpoint()
            if now - last_lag >= LAG_EVERY_S:
                last_lag = now
                self._gauges()

    def _ingest(self, batch: EventBatch) -> None:
        users, items = self.trainer.rows(batch.events)
        self.online.observe(self.holder.get(), users, items)  # before training on them
        result = self.trainer.ingest_rows(users, items, batch.events.ts)
        self.positions.update(batch.commit_offsets())
        c = self.counters
        c.consumed += batch.records
        c.rejected += batch.rejected
        m = self.metrics.engine
        m.repeats.inc(result.repeats)
        if self._unpublished_since is None:
            self._unpublished_since = time.monotonic()

    def _train(self) -> float:
        """Train for up to one slice; returns the seconds spent."""
        start = time.perf_counter()
        while time.perf_counter() - start < TRAIN_SLICE_S and not self._stop.is_set():
            stats = self.trainer.step()
            if stats is None:
                break
            self._count(stats)
            if self.trainer.pending == 0 and stats.fresh > 0:
                break  # drained: go back and poll
        return time.perf_counter() - start

    def _count(self, stats: StepStats) -> None:
        m = self.metrics.engine
        self.counters.trained += stats.fresh
        m.trained.inc(stats.fresh)
        m.replayed.inc(stats.replayed)
        m.train_samples.inc(stats.samples)
        m.train_steps.inc()
        if self.trainer.steps % 20 == 0:
            m.loss.set(float(stats.loss))  # a device sync, so not every step

    def _maybe_publish(self) -> None:
        consumed = self.counters.consumed
        overdue = self.publisher.since_last() > 2 * self.publisher.every_s
        if not self.publisher.due(consumed) or (self.trainer.pending and not overdue):
            return
        stats = self.publisher.publish(consumed)
        m = self.metrics.engine
        m.publish_seconds.observe(stats.seconds)
        m.snapshot_version.set(stats.version)
        m.snapshot_events.set(consumed)
        if self._unpublished_since is not None:
            m.freshness.observe(time.monotonic() - self._unpublished_since)
            self._unpublished_since = None
        snap = self.holder.get()
        if snap is not None:
            m.index_items.set(snap.index.size)
        if stats.version == 1:
            self.grpc.ready()
            log.info("first snapshot published: ready")

    def _gauges(self) -> None:
        m, store = self.metrics.engine, self.trainer.store
        lag = getattr(self.source, "lag", None)
        if lag is not None:
            self.counters.lag = lag()
        m.interactions.set(len(store))
        m.users.set(len(self.trainer.user_ids))
        m.items.set(len(self.trainer.item_ids))
        m.holdouts.set(int((store.user_counts() >= store.min_history).sum()))
        m.store_bytes.set(store.nbytes())
        sampler = self.trainer.sampler
        m.negatives.inc(sampler.drawn - self._drawn[0])
        m.negatives_rejected.inc(sampler.rejected - self._drawn[1])
        self._drawn = (sampler.drawn, sampler.rejected)
        snap = self.holder.get()
        if snap is not None:
            m.snapshot_age.set(snap.age())
        rates = self.online.rates()
        for k, v in rates.items():
            m.online_hit_ratio.labels(k=str(k)).set(v)
        m.online_probes.set(self.online.probes)
        self._sample()

    def _sample(self) -> None:
        """One point of the status page's charts, every HISTORY_EVERY_S."""
        now, last = time.time(), self._last_sample
        if last is not None and now - last.t < HISTORY_EVERY_S:
            return
        status, window = self.status(), self.metrics.serving.window
        p50, p99 = window.percentiles()
        report = self.evaluator.latest
        dt = now - last.t if last is not None else 0.0
        consumed_before = last.events_consumed if last is not None else 0
        sample = Sample(
            t=now, events_consumed=status.events_consumed,
            events_per_s=(status.events_consumed - consumed_before) / dt if dt else 0.0,
            requests_per_s=(window.count - self._last_query_count) / dt if dt else 0.0,
            latency_p50_ms=p50, latency_p99_ms=p99,
            hr10_sampled=report.sampled.hr[10] if report else None,
            hr10_full=report.full.hr[10] if report and report.full else None,
            model_version=status.model_version, users=status.users, items=status.items,
            interactions=status.interactions)
        self._last_query_count = window.count
        self._last_sample = sample
        self.history.add(sample)

    def _export_eval(self, report: EvalReport) -> None:
        m = self.metrics.engine
        for kind, r in (("sampled", report.sampled), ("full", report.full)):
            if r is None:
                continue
            for k in r.hr:
                m.eval_hit_ratio.labels(k=str(k), kind=kind).set(r.hr[k])
                m.eval_ndcg.labels(k=str(k), kind=kind).set(r.ndcg[k])
        m.eval_seconds.observe(report.seconds)
        m.eval_users.set(report.users)


def _quiet_gc() -> None:
    """Full collections stopped every thread for 150-190 ms (bench/load.py p999):
    ~400k long-lived objects from the libraries (torch, FastAPI, grpc) were scanned
    each time. Freeze what exists at start-up out of the scan; the engine's own
    data is numpy arrays, which form no reference cycles."""
    gc.collect()
    gc.freeze()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. Without it, a response written in two parts
    # waits for the client's delayed ACK: 40 ms per request (uvicorn sets it only on
    # sockets it binds itself).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def serve_until_signalled(daemon: Daemon) -> None:
    """Run in the main thread; SIGTERM or SIGINT stops consuming and shuts down cleanly."""
    import signal

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        daemon.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    s = daemon.settings
    print(f"ncf-stream serving on http://{s.http_host}:{daemon.http_port} "
          f"(status page /, API /v1/..., metrics /metrics, OpenAPI /openapi.json) and "
          f"gRPC {s.grpc_host}:{daemon.grpc.port}; consuming {s.kafka_topic} from "
          f"{s.kafka_bootstrap}", flush=True)
    daemon.run()
