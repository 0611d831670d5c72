"""Start and stop the local development broker (``deploy/kafka/kafka.sh``) from Python.

Used by the demo, the test fixture and the benchmarks, so each gets a real
broker the same way a developer does.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from ncf_stream.errors import NcfStreamError

KAFKA_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "kafka.sh"


class BrokerError(NcfStreamError):
    pass


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux), or the IANA range."""
    try:
        lo, hi = map(int, EPHEMERAL.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(rng: random.Random | None = None) -> int:
    """A port that, with the next one (the controller's), is free now and outside the
    ephemeral range: a port the kernel gave us would be handed to the next outgoing
    connection as well (a broker once failed to start that way, "Address already in
    use", when a client took it between our check and the broker's bind)."""
    rng = rng or random.Random()
    lo, hi = _ephemeral_range()
    spans = [(a, b) for a, b in ((10_000, lo - 2), (hi + 1, 65_533)) if b > a]
    for _ in range(200):
        a, b = rng.choice(spans)
        port = rng.randrange(a, b)
        if _bindable(port) and _bindable(port + 1):
            return port
    raise BrokerError("no free port pair found outside the ephemeral range")


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return port.isdigit() and port_open(host or "127.0.0.1", int(port))


class LocalBroker:
    """A single-node KRaft broker on 127.0.0.1 in its own state directory.

    ``keep_state=False`` removes the state directory on stop (tests and benchmarks).
    """

    def __init__(self, port: int | None = None, state_dir: str | Path | None = None,
                 keep_state: bool | None = None) -> None:
        if not KAFKA_SH.exists():
            raise BrokerError(f"{KAFKA_SH} not found: the local broker runs from a source checkout")
        self.port = port or free_port()
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="ncf-kafka-"))
        self.keep_state = (not self._own_dir) if keep_state is None else keep_state

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, action: str) -> None:
        proc = subprocess.run(
            [str(KAFKA_SH), action, "--port", str(self.port), "--state-dir", str(self.state_dir)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise BrokerError(f"kafka.sh {action} failed:\n{proc.stdout}{proc.stderr}")

    def start(self) -> LocalBroker:
        self._run("start")
        return self

    def stop(self) -> None:
        self._run("stop")
        if not self.keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def create_topics(bootstrap: str, names: list[str], partitions: int = 4) -> None:
    """Create topics that do not exist yet (one replica: a development broker)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="ncf-stream-admin")
    try:
        existing = set(admin.list_topics())
        new = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new, wait_for_metadata=True)
    finally:
        admin.close()


@contextlib.contextmanager
def existing_or_local() -> Iterator[str]:
    """The broker named by NCF_STREAM_KAFKA_BOOTSTRAP, else a fresh local one for the
    duration (removed afterwards). Yields its bootstrap address."""
    existing = os.environ.get("NCF_STREAM_KAFKA_BOOTSTRAP")
    if existing:
        yield existing
        return
    with LocalBroker() as broker:
        yield broker.bootstrap
