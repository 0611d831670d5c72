"""deploy/kafka/kafka.sh: start, status, idempotent start, stop, restart on kept state."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

from consumers.broker import KAFKA_SH, LocalBroker, port_open, reachable


def status(broker: LocalBroker) -> int:
    return subprocess.run(
        [str(KAFKA_SH), "status", "--port", str(broker.port), "--state-dir", str(broker.state_dir)],
        capture_output=True, check=False,
    ).returncode


@pytest.mark.slow
def test_broker_lifecycle(tmp_path: Path) -> None:
    broker = LocalBroker(state_dir=tmp_path / "state")
    assert status(broker) == 1
    broker.start()
    try:
        assert status(broker) == 0 and reachable(broker.bootstrap)
        broker.start()  # a second start leaves the running broker alone
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        producer.send("lifecycle", b"x").get(timeout=30)
        producer.close()
    finally:
        broker.stop()
    assert status(broker) == 1 and not port_open("127.0.0.1", broker.port)
    assert (tmp_path / "state" / "data" / "meta.properties").exists()  # kept: restartable
    # Restart on the formatted state, from a job of its own as a terminal runs it: a Ctrl-C
    # there (SIGINT to the job's process group) leaves the broker to whoever stops it.
    subprocess.run([str(KAFKA_SH), "start", "--port", str(broker.port), "--state-dir",
                    str(broker.state_dir)], check=True, capture_output=True,
                   start_new_session=True)
    try:
        pid = int((broker.state_dir / "broker.pid").read_text())
        os.killpg(os.getpgid(pid), signal.SIGINT)
        time.sleep(3)
        assert status(broker) == 0 and reachable(broker.bootstrap)
    finally:
        broker.stop()
    assert status(broker) == 1


def test_start_refuses_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        broker = LocalBroker(port=s.getsockname()[1], state_dir=tmp_path / "s")
        with pytest.raises(Exception, match="taken"):
            broker.start()


def test_free_port_is_outside_the_ephemeral_range_and_free_with_its_neighbour() -> None:
    import random
    import socket

    from consumers.broker import _ephemeral_range, free_port

    lo, hi = _ephemeral_range()
    rng = random.Random(3)
    ports = [free_port(rng) for _ in range(20)]
    assert all(not lo <= p <= hi + 1 and 10_000 <= p < 65_534 for p in ports), (ports, lo, hi)
    assert len(set(ports)) > 10  # spread out, so concurrent callers rarely collide
    with socket.socket() as taken:  # a taken port is never handed out
        taken.bind(("127.0.0.1", ports[0]))
        assert ports[0] not in {free_port(random.Random(3)) for _ in range(3)}
