"""What a serving process needs around its HTTP app: the server on a thread, process
tuning, and a clean stop on SIGTERM/SIGINT.

Both serving processes use it: the daemon (``consumers.daemon``, trainer and servers)
and a replica (:mod:`ncf_stream.replica`, servers over exported snapshots).
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, start_http_server

from ncf_stream.threads import reader_thread

log = logging.getLogger(__name__)

# The trainer holds the GIL between kernels; with the default 5 ms switch interval a
# request waits up to 5 ms at every thread hand-off (a request against a thread running
# pure Python, as kafka-python's parser does: p50 4.9 ms at 0.1 ms, 3.2 ms at 20 us; at
# 5 us no better).
SWITCH_INTERVAL_S = 2e-5
BACKLOG = 2048  # uvicorn's default


class HttpServer:
    """uvicorn serving ``app`` on a socket bound at construction (so ``port`` is known,
    0 picking a free one), on a thread of its own once started."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._socket = bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        # httptools' C parser and uvloop: 178 instead of 285 us of server CPU per request,
        # all of it holding the GIL (h11 and asyncio's loop are pure Python;
        # bench/http_stack.py).
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                     access_log=False, http="httptools",
                                                     loop="uvloop"))
        self._thread = threading.Thread(target=self._serve, name="ncf-http", daemon=True)

    def _serve(self) -> None:
        reader_thread()  # handlers run on the event loop thread
        self._server.run(sockets=[self._socket])

    def start(self) -> None:
        self._thread.start()

    def stop(self, grace: float) -> None:
        self._server.should_exit = True
        self._thread.join(grace + 1)


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it. Without it, a response written in two parts
    # waits for the client's delayed ACK: 40 ms per request (uvicorn sets it only on
    # sockets it binds itself).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    # Listening from here on, not only once uvicorn's thread runs: the port is known (and
    # printed) before the servers start, and a client that connects in between waits in
    # the backlog instead of being refused (tests/test_observability.py's was, at times).
    sock.listen(BACKLOG)
    return sock


def serve_metrics(port: int | None, host: str, registry: CollectorRegistry) -> None:
    """/metrics alone on a port of its own (the ``metrics_port`` setting), if one is set."""
    if port is not None:
        start_http_server(port, host, registry=registry)


def tune_for_serving() -> None:
    """Short GIL hand-offs, and the objects alive at start-up frozen out of the garbage
    collector: full collections stopped every thread for 150-190 ms (bench/load.py
    p999): ~400k long-lived objects from the libraries (torch, FastAPI, grpc) were
    scanned each time. The engine's own data is numpy arrays, which form no cycles."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.collect()
    gc.freeze()


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call ``stop`` (from the main thread only, as Python requires)."""

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
