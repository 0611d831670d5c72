"""A serving replica (``ncf-stream serve-replica``): the HTTP and gRPC servers over the
snapshots a trainer exports (:mod:`ncf_stream.export`), with no Kafka and no training.

:class:`SnapshotWatcher` checks the export directory's LATEST every
:data:`POLL_S` (a stat; the file is read only when it changed), loads a new export
on its own thread and swaps it into the replica's :class:`SnapshotHolder`: requests
go on being answered from the previous snapshot meanwhile. An export it cannot use
(corrupt, another format) is rejected once, logged and counted, and the last good
snapshot keeps serving; one deleted while it was read is simply retried from
LATEST.

:class:`Replica` wires the same :class:`Recommender`, HTTP app and gRPC server as
the daemon. A ``snapshot_dir`` without a LATEST of its own but with ``rank-<r>/``
directories is a group of trainers' (:mod:`ncf_stream.routing`): a watcher and a
Recommender per rank, and a router in front that answers each user from its rank.
What needs the trainer is not served: evaluation, the status page and its history
answer 404 ``not_served``, the admin deletions 404 (gRPC UNIMPLEMENTED), each
saying to ask the trainer.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry

from ncf_stream import export
from ncf_stream.admin import Admin
from ncf_stream.api import Status
from ncf_stream.engine import resolve_device
from ncf_stream.errors import ConfigError
from ncf_stream.grpc_server import GrpcServer
from ncf_stream.http_app import create_app
from ncf_stream.metrics import ReplicaMetrics, ServingMetrics
from ncf_stream.recommend import Recommender
from ncf_stream.routing import Group, Rank, Router
from ncf_stream.servers import HttpServer, serve_metrics, tune_for_serving
from ncf_stream.settings import Settings, default
from ncf_stream.snapshot import SnapshotHolder
from ncf_stream.threads import reader_thread

log = logging.getLogger(__name__)

POLL_S = 0.15  # how often LATEST is checked: a stat, so cheap; a new export shows within it
NO_DELETIONS = ("a serving replica applies no deletions: send them to the trainer "
                "(ncf-stream serve) or publish a delete event on the topic")


class SnapshotWatcher:
    """Loads each new export of ``directory`` into ``holder``, on a thread of its own."""

    def __init__(self, directory: str | Path, holder: SnapshotHolder, metrics: ReplicaMetrics,
                 device: str = "cpu", stale_s: float = default("replica_stale_s"),
                 poll_s: float = POLL_S, rank: int | None = None) -> None:
        self.directory, self.holder, self.metrics = Path(directory), holder, metrics
        self.rank = rank  # a trainer of a group's (ncf_stream.routing); None: the only one
        self.device = resolve_device(device)
        self.stale_s, self.poll_s = stale_s, poll_s
        self.on_load: list[Callable[[int], None]] = []  # called with each new version
        self.failure = ""  # why the newest export was rejected ("" once one loads)
        self.unreadable = ""  # why the directory cannot be read ("" while it can)
        self._loaded: export.Loaded | None = None  # the export served
        self._tried: str | None = None  # the export last loaded or rejected
        self._seen: tuple[int, int] | None = None  # LATEST's (inode, mtime) when last read
        self._stop = threading.Event()
        name = "ncf-replica-loader" if rank is None else f"ncf-replica-loader-{rank}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        if rank is None:
            metrics.age.set_function(self._age)
        else:  # the group's gauges are the replica's (ncf_stream.routing)
            metrics.rank_age.labels(rank=str(rank)).set_function(self._age)
            metrics.rank_version.labels(rank=str(rank)).set(0)

    def _age(self) -> float:
        snap = self.holder.get()
        return 0.0 if snap is None else snap.age()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        reader_thread()  # single-threaded kernels, as the request threads'
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.poll_s)

    def check(self) -> None:
        """One turn of the thread: :meth:`poll`, noting (not raising) a directory it
        cannot read, which it tries again at the next turn."""
        try:
            self.poll()
            self.unreadable = ""
        except OSError as e:  # permissions, a lost network mount
            unreadable = f"cannot read {self.directory / export.LATEST}: {e}"
            if unreadable != self.unreadable:
                log.error("%s; retrying every %g s", unreadable, self.poll_s)
            self.unreadable, self._seen = unreadable, None

    def poll(self) -> bool:
        """Load the export LATEST names if it is new; returns whether one was swapped in."""
        try:
            st = os.stat(self.directory / export.LATEST)
        except FileNotFoundError:
            return False  # no export yet
        if (st.st_ino, st.st_mtime_ns) == self._seen:
            return False
        self._seen = (st.st_ino, st.st_mtime_ns)
        name = export.latest(self.directory)
        if name is None or name == self._tried:
            return False
        return self._load(name)

    def _load(self, name: str) -> bool:
        path = self.directory / name
        start = time.perf_counter()
        try:
            loaded = export.read(path, self.device, self._loaded)
        except FileNotFoundError as e:
            if not path.exists():  # deleted while read (KEEP newer ones since): read LATEST
                self._seen = None  # again at the next poll
                return False
            return self._rejected(name, "corrupt", f"{name}: {e}")
        except export.CorruptExport as e:
            return self._rejected(name, "corrupt", str(e))
        except export.ExportFormatError as e:
            return self._rejected(name, "format", str(e))
        except Exception as e:  # anything else about one export must not stop the replica
            return self._rejected(name, "error", f"{name}: {type(e).__name__}: {e}")
        self._tried, self._loaded, self.failure = name, loaded, ""
        snapshot = loaded.snapshot
        self.holder.set(snapshot)
        m = self.metrics
        m.loads.inc()
        m.load_seconds.observe(time.perf_counter() - start)
        if self.rank is None:
            m.version.set(snapshot.version)
        else:
            m.rank_version.labels(rank=str(self.rank)).set(snapshot.version)
        log.info("serving snapshot version %d from %s", snapshot.version,
                 name if self.rank is None else f"{self.directory.name}/{name}")
        for listener in self.on_load:
            listener(snapshot.version)
        return True

    def _rejected(self, name: str, reason: str, detail: str) -> bool:
        self._tried = name  # once: the next export gets the next try
        self.failure = f"rejected export {detail}"
        self.metrics.load_failures.labels(reason=reason).inc()
        snap = self.holder.get()
        log.error("%s; still serving %s", self.failure,
                  "nothing yet" if snap is None else f"version {snap.version}")
        return False

    def status(self) -> Status:
        """The trainer's counts as of the served export; the snapshot fields and ingest
        health are the replica's own."""
        snap = self.holder.get()
        reasons = [r for r in (self.unreadable, self.failure) if r]
        if snap is None:
            reasons.insert(0, f"no snapshot loaded yet from {self.directory}")
        elif snap.age() > self.stale_s:
            reasons.insert(0, f"the served snapshot is {snap.age():.0f} s old (replica_stale_s "
                              f"{self.stale_s:g}): is the trainer running and exporting to "
                              f"{self.directory}?")
        exported = Status() if self._loaded is None else self._loaded.status
        return dataclasses.replace(
            exported, model_version=0 if snap is None else snap.version,
            snapshot_events=0 if snap is None else snap.events,
            snapshot_age_seconds=0.0 if snap is None else round(snap.age(), 3),
            ingest="degraded" if reasons else "ok", ingest_reason="; ".join(reasons),
            role="replica")


class Replica:
    """The servers over a :class:`SnapshotWatcher`; ``settings.snapshot_dir`` is required.

    Build, :meth:`start`, :meth:`stop`; or :meth:`run` until a stop event is set."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        s = self.settings = settings
        if not s.snapshot_dir:
            raise ConfigError("a replica needs snapshot_dir (--snapshot-dir): the directory "
                              "the trainer exports its snapshots to")
        self.registry = registry if registry is not None else CollectorRegistry()
        self.serving = ServingMetrics(self.registry)
        self.metrics = ReplicaMetrics(self.registry)
        self.holder = SnapshotHolder()
        self.watcher = SnapshotWatcher(s.snapshot_dir, self.holder, self.metrics, s.device,
                                       s.replica_stale_s)
        self.recommender = Recommender.from_settings(self.holder, s)
        # One trainer's exports, or a group's: one rank directory each (ncf_stream.routing).
        self.group = Group(Rank(None, Path(s.snapshot_dir), self.holder, self.watcher,
                                self.recommender), self._rank, POLL_S)
        self.router = Router(self.group, self.metrics)
        self.metrics.age.set_function(self.group.age)
        self.metrics.version.set_function(self.group.version)
        admin = Admin.off(NO_DELETIONS)
        app = create_app(self.router, self.group.status, self.registry, self.serving,
                         admin=admin, replica=True)
        self.http = HttpServer(app, s.http_host, s.http_port)
        self.grpc = GrpcServer(self.router, self.group.status, self.serving,
                               s.grpc_host, s.grpc_port, admin=admin)
        self.watcher.on_load.append(lambda version: self.grpc.ready())
        self.group.on_ready.append(self.grpc.ready)

    def _rank(self, rank: int, directory: Path) -> Rank:
        """Rank ``rank`` of a group, exporting to ``directory``: its watcher (not started),
        holder and Recommender."""
        s, holder = self.settings, SnapshotHolder()
        watcher = SnapshotWatcher(directory, holder, self.metrics, s.device, s.replica_stale_s,
                                  rank=rank)
        return Rank(rank, directory, holder, watcher, Recommender.from_settings(holder, s))

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    def start(self) -> None:
        serve_metrics(self.settings.metrics_port, self.settings.http_host, self.registry)
        self.http.start()
        self.grpc.start()
        self.watcher.start()
        self.group.start()
        log.info("replica serving HTTP on %s:%d, gRPC on %s:%d from %s",
                 self.settings.http_host, self.http_port, self.settings.grpc_host,
                 self.grpc_port, self.settings.snapshot_dir)

    def stop(self) -> None:
        grace = self.settings.shutdown_grace_s
        self.watcher.stop()
        self.group.stop()
        self.grpc.stop(grace)
        self.http.stop(grace)

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
        tune_for_serving()
        self.start()
        try:
            while not stop.wait(0.5):  # the main thread stays free for signal handlers
                pass
        finally:
            self.stop()
            gc.unfreeze()  # let interpreter exit see (and free) everything
