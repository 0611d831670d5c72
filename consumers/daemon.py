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
import threading

from prometheus_client import CollectorRegistry

from consumers.kafka_source import KafkaSource
from consumers.parallel_source import ParallelSource
from consumers.source_process import ProcessSource
from ncf_stream.admin import Admin
from ncf_stream.engine import Engine, Resume, SourceFactory
from ncf_stream.grpc_server import GrpcServer
from ncf_stream.http_app import create_app
from ncf_stream.servers import HttpServer, serve_metrics, stop_on_signals, tune_for_serving
from ncf_stream.settings import Settings, check_group
from ncf_stream.source import EventSource
from ncf_stream.threads import background_thread, trainer_thread, tune_malloc
from ncf_stream.trainer import TrainerConfig

log = logging.getLogger(__name__)


class Daemon:
    """A source (Kafka unless given), an :class:`Engine`, and the servers over it.

    The Kafka source is given to the engine as a factory, so the engine rebuilds it
    when it fails while the servers answer from the last snapshot."""

    def __init__(self, settings: Settings, source: EventSource | SourceFactory | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        check_group(settings)
        # Before the big allocations: see threads.tune_malloc.
        tune_malloc(TrainerConfig.from_settings(settings).step_tensor_bytes)
        if not settings.kafka_group_instance_id:  # see the setting: rebuilds resume at once
            settings = settings.model_copy(update={
                "kafka_group_instance_id": f"ncf-stream-{socket.gethostname()}-{os.getpid()}"})
        self.settings = s = settings
        self.engine = Engine(s, source if source is not None else self._kafka_source,
                             registry)
        self.metrics = self.engine.metrics
        self._stop = threading.Event()
        token = s.admin_token.get_secret_value() if s.admin_token is not None else None
        admin = Admin(token, self.engine.request_delete, self.engine.knows)
        app = create_app(self.engine.recommender, self.engine.status, self.metrics.registry,
                         self.metrics.serving, self.engine.evaluator, self.engine.history,
                         admin=admin)
        self.http = HttpServer(app, s.http_host, s.http_port)
        self.http_port = self.http.port
        self.grpc = GrpcServer(self.engine.recommender, self.engine.status,
                               self.metrics.serving, s.grpc_host, s.grpc_port, admin=admin)
        self.engine.on_publish.append(self._published)

    def _published(self, version: int) -> None:
        if version == 1:
            self.grpc.ready()  # gRPC health: SERVING from the first snapshot on

    def _kafka_source(self, resume: Resume) -> EventSource:
        s = self.settings
        if resume.grouped:  # its partitions by rank; the engine maps ids (ncf_stream.group)
            if s.kafka_source_process:
                return ProcessSource(s, metrics=resume.metrics, positions=resume.positions,
                                     background=s.background_policy)
            return KafkaSource(s, metrics=resume.metrics, positions=lambda: resume.positions)
        if s.kafka_sources > 1:  # several processes; they send ids, the engine maps them
            return ParallelSource(s, metrics=resume.metrics, positions=resume.positions,
                                  background=s.background_policy)
        if s.kafka_source_process:
            return ProcessSource(s, metrics=resume.metrics, positions=resume.positions,
                                 background=s.background_policy,  # ingest work: requests first
                                 id_maps=(resume.user_ids, resume.item_ids))
        return KafkaSource(s, metrics=resume.metrics, positions=lambda: resume.positions)

    def start_servers(self) -> None:
        serve_metrics(self.settings.metrics_port, self.settings.http_host,
                      self.metrics.registry)
        self.http.start()
        self.grpc.start()
        self.engine.evaluator.start()
        log.info("serving HTTP on %s:%d, gRPC on %s:%d", self.settings.http_host,
                 self.http_port, self.settings.grpc_host, self.grpc.port)

    def run(self) -> None:
        """Serve and train until :meth:`stop`; then shut down cleanly."""
        tune_for_serving()
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
        self.http.stop(grace)
        gc.unfreeze()  # let interpreter exit see (and free) everything


def serve_until_signalled(daemon: Daemon) -> None:
    """Run in the main thread; SIGTERM or SIGINT stops consuming and shuts down cleanly."""
    stop_on_signals(daemon.stop)
    s = daemon.settings
    print(f"ncf-stream serving on http://{s.http_host}:{daemon.http_port} "
          f"(status page /, API /v1/..., metrics /metrics, OpenAPI /openapi.json) and "
          f"gRPC {s.grpc_host}:{daemon.grpc.port}; consuming {s.kafka_topic} from "
          f"{s.kafka_bootstrap}", flush=True)
    daemon.run()
