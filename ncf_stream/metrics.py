"""Prometheus metrics, on a registry the caller injects (tests pass a fresh one).

Names follow Prometheus conventions: prefix ``ncf_stream_``, ``_total`` for
counters, base units (seconds, bytes).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from ncf_stream.events import Reason

PREFIX = "ncf_stream"


class IngestMetrics:
    """What the event source reports: records in, rejected by reason, skipped, lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        self.consumed = Counter(
            f"{PREFIX}_events_consumed", "Records read from the source, valid or not",
            registry=registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_events_rejected", "Records sent to the dead-letter topic, by reason",
            ["reason"], registry=registry,
        )
        self.skipped = Counter(
            f"{PREFIX}_events_skipped", "Valid events dropped by the configured event filter",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag", "Records in the topic not yet consumed (all partitions)",
            registry=registry,
        )
        # Every reason exists from the start, so dashboards show 0 rather than no data.
        for reason in Reason:
            self.rejected.labels(reason=reason.value)
