"""The producer tool: publish a ratings file to Kafka in timestamp order, keyed by user."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TextIO

from kafka import KafkaProducer

from consumers.kafka_source import producer_config
from ncf_stream.events import encode_event
from ncf_stream.readers import BadLine, iter_raw_lines, read_events
from ncf_stream.settings import Settings

MAX_REPORTED_BAD_LINES = 1000


@dataclass(frozen=True)
class ProduceSummary:
    sent: int
    failed: int
    skipped: int  # bad lines, each reported with its number
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def describe(self, topic: str) -> str:
        text = (f"sent {self.sent} events to {topic} in {self.seconds:.1f} s "
                f"({self.rate:,.0f}/s); skipped {self.skipped} bad lines")
        return text + (f"; {self.failed} FAILED to send" if self.failed else "")


class _BadLineReporter:
    def __init__(self, path: Path, out: TextIO) -> None:
        self.path, self.out, self.count = path, out, 0

    def __call__(self, bad: BadLine) -> None:
        self.count += 1
        if self.count <= MAX_REPORTED_BAD_LINES:
            print(f"{self.path}:{bad.line}: skipped: {bad.reason}", file=self.out)
        elif self.count == MAX_REPORTED_BAD_LINES + 1:
            print(f"{self.path}: more bad lines; counting them without listing", file=self.out)


class Progress:
    """A one-line progress report on a terminal, a line every few seconds elsewhere."""

    def __init__(self, total: int, out: TextIO, enabled: bool = True) -> None:
        self.total, self.out, self.enabled = total, out, enabled
        self.tty = out.isatty()
        self.start = self.last = time.monotonic()

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.25 if self.tty else 5.0)):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        pct = 100.0 * done / self.total if self.total else 100.0
        line = f"{done}/{self.total} events ({pct:5.1f}%) {rate:,.0f}/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n",
              file=self.out, flush=True)

    def close(self, done: int) -> None:
        self.update(done, force=True)
        if self.enabled and self.tty:
            print(file=self.out)


def file_messages(
    path: Path, fmt: str | None, limit: int | None, raw: bool, reporter: _BadLineReporter
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) pairs to publish: validated events in timestamp order, or raw lines."""
    if raw:
        return [(None, line) for _, line in islice(iter_raw_lines(path), limit)]
    result = read_events(path, fmt, limit=limit, on_bad_line=reporter)
    ev = result.events
    return [
        (u.encode(), encode_event(u, i, t, ty, w))
        for u, i, t, ty, w in zip(ev.users.tolist(), ev.items.tolist(), ev.ts.tolist(),
                                  ev.types.tolist(), ev.weights.tolist(), strict=True)
    ]


def publish(
    messages: list[tuple[bytes | None, bytes]],
    settings: Settings,
    topic: str,
    rate: float | None = None,
    progress: Progress | None = None,
    producer: KafkaProducer | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, int, float]:
    """Send all messages, at most ``rate`` per second, or those before ``stop`` is set;
    returns (sent, failed, seconds)."""
    own = producer is None
    producer = producer or KafkaProducer(**producer_config(settings))
    failed = 0

    def on_error(_exc: BaseException) -> None:
        nonlocal failed
        failed += 1

    start = time.monotonic()
    sent = 0
    try:
        for key, value in messages:
            if stop is not None and stop.is_set():
                break
            producer.send(topic, value=value, key=key).add_errback(on_error)
            sent += 1
            if rate and sent % max(1, int(rate) // 100) == 0:
                _pace(start, sent, rate)
            if progress is not None and sent % 1000 == 0:
                progress.update(sent)
        producer.flush()
    finally:
        if own:
            producer.close(timeout=10)
    seconds = time.monotonic() - start
    if progress is not None:
        progress.close(sent)
    return sent - failed, failed, seconds


def _pace(start: float, sent: int, rate: float) -> None:
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)


def produce_file(
    path: str | Path,
    settings: Settings,
    *,
    topic: str | None = None,
    fmt: str | None = None,
    rate: float | None = None,
    limit: int | None = None,
    raw: bool = False,
    out: TextIO = sys.stderr,
    show_progress: bool = True,
) -> ProduceSummary:
    path = Path(path)
    reporter = _BadLineReporter(path, out)
    messages = file_messages(path, fmt, limit, raw, reporter)
    progress = Progress(len(messages), out, enabled=show_progress)
    sent, failed, seconds = publish(
        messages, settings, topic or settings.kafka_topic, rate, progress
    )
    return ProduceSummary(sent, failed, reporter.count, seconds)
