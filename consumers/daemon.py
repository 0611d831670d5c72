"""``ncf-stream serve``: the Kafka source, the engine, HTTP and gRPC in one process.

Thin wiring: the engine (:mod:`ncf_stream.engine`) owns the loop and the
learning state and runs on a background thread of its own; the evaluator, the
HTTP server (uvicorn) and the gRPC server run on their own threads and read
snapshots only. SIGTERM/SIGINT stop consuming, finish the step, checkpoint,
and stop the servers with a grace period.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server

from consumers.kafka_source import KafkaSource
from consumers.parallel_source import ParallelSource
from consumers.source_process import ProcessSource
from ncf_stream.admin import Admin
from ncf_stream.engine import Engine, Resume, SourceFactory
from ncf_stream.grpc_server import GrpcServer
from ncf_stream.http_app import create_app
from ncf_stream.settings import Settings
from ncf_stream.source import EventSource
from ncf_stream.threads import background_thread, reader_thread, trainer_thread, tune_malloc

log = logging.getLogger(__name__)

# The trainer holds the GIL between kernels; with the default 5 ms switch interval a
# request waits up to 5 ms at every thread hand-off (a request against a thread running
# pure Python, as kafka-python's parser does: p50 4.9 ms at 0.1 ms, 3.2 ms at 20 us; at
# 5 us no better).
SWITCH_INTERVAL_S = 2e-5


class Daemon:
    """A source (Kafka unless given), an :class:`Engine`, and the servers over it.

    The Kafka source is given to the engine as a factory, so the engine rebuilds it
    when it fails while the servers answer from the last snapshot."""

    def __init__(self, settings: Settings, source: EventSource | SourceFactory | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        tune_malloc()  # before the big allocations: see threads.tune_malloc
        if not settings.kafka_group_instance_id:  # see the setting: rebuilds resume at once
            settings = settings.model_copy(update={
                "kafka_group_instance_id": f"ncf-stream-{socket.gethostname()}-{os.getpid()}"})
        self.settings = s = settings
        self.engine = Engine(s, source if source is not None else self._kafka_source,
                             registry)
        self.metrics = self.engine.metrics
        self._stop = threading.Event()
        self._http_socket = _bind(s.http_host, s.http_port)
        self.http_port = self._http_socket.getsockname()[1]
        token = s.admin_token.get_secret_value() if s.admin_token is not None else None
        admin = Admin(token, self.engine.request_delete, self.engine.knows)
        app = create_app(self.engine.recommender, self.engine.status, self.metrics.registry,
                         self.metrics.serving, self.engine.evaluator, self.engine.history,
                         admin=admin)
        # httptools' C parser and uvloop: 178 instead of 285 us of server CPU per request,
        # all of it holding the GIL (h11 and asyncio's loop are pure Python;
        # bench/http_stack.py).
        self._http = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   http="httptools", loop="uvloop"))
        self._http_thread = threading.Thread(target=self._serve_http, name="ncf-http",
                                             daemon=True)
        self.grpc = GrpcServer(self.engine.recommender, self.engine.status,
                               self.metrics.serving, s.grpc_host, s.grpc_port, admin=admin)
        self.engine.on_publish.append(self._published)

    def _published(self, version: int) -> None:
        if version == 1:
            self.grpc.ready()  # gRPC health: SERVING from the first snapshot on

    def _kafka_source(self, resume: Resume) -> EventSource:
        s = self.settings
        if s.kafka_sources > 1:  # several processes; they send ids, the engine maps them
            return ParallelSource(s, metrics=resume.metrics, positions=resume.positions,
                                  background=s.background_policy)
        if s.kafka_source_process:
            return ProcessSource(s, metrics=resume.metrics, positions=resume.positions,
                                 background=s.background_policy,  # ingest work: requests first
                                 id_maps=(resume.user_ids, resume.item_ids))
        return KafkaSource(s, metrics=resume.metrics, positions=lambda: resume.positions)

    def _serve_http(self) -> None:
        reader_thread()  # handlers run on the event loop thread
        self._http.run(sockets=[self._http_socket])

    def start_servers(self) -> None:
        if self.settings.metrics_port is not None:  # /metrics alone, on a port of its own
            start_http_server(self.settings.metrics_port, self.settings.http_host,
                              registry=self.metrics.registry)
        self._http_thread.start()
        self.grpc.start()
        self.engine.evaluator.start()
        log.info("serving HTTP on %s:%d, gRPC on %s:%d", self.settings.http_host,
                 self.http_port, self.settings.grpc_host, self.grpc.port)

    def run(self) -> None:
        """Serve and train until :meth:`stop`; then shut down cleanly."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        _quiet_gc()
        self.start_servers()
        failure: list[BaseException] = []

        def train() -> None:
            # Before its first kernel: the OpenMP team inherits the policy.
            background_thread(self.settings.background_policy)
            trainer_thread(self.settings.trainer_threads)  # readers started first set 1
            try:
                self.engine.run(self._stop)
            except BaseException as e:  # re-raised on the calling thread
                failure.append(e)
                self._stop.set()
            finally:
                # On this thread: a source rebuilt here dies with it (source_process.die_with).
                self.engine.close(final_checkpoint=not failure)

        trainer = threading.Thread(target=train, name="ncf-trainer")
        trainer.start()
        try:
            while trainer.is_alive():
                trainer.join(0.5)  # the main thread stays free for signal handlers
        finally:
            self._stop.set()
            trainer.join()
            self._shutdown_servers()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        self._stop.set()

    def _shutdown_servers(self) -> None:
        grace = self.settings.shutdown_grace_s
        self.grpc.stop(grace)
        self._http.should_exit = True
        self._http_thread.join(grace + 1)
        gc.unfreeze()  # let interpreter exit see (and free) everything


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
