"""Prometheus metrics, on a registry the caller injects (tests pass a fresh one).

Names follow Prometheus conventions: prefix ``ncf_stream_``, ``_total`` for
counters, base units (seconds, bytes). Every labelled series that a dashboard
plots exists from the start (at 0), so a panel shows 0 rather than no data.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from ncf_stream.evaluate import KS
from ncf_stream.events import Reason
from ncf_stream.status_page import LatencyWindow

PREFIX = "ncf_stream"
KINDS = ("sampled", "full")
# Request latencies: the serving target is p99 <= 10 ms, so resolve below it finely.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5)
FRESHNESS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def _registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    return REGISTRY if registry is None else registry


class IngestMetrics:
    """What the event source reports: records in, rejected by reason, skipped, lag."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = _registry(registry)
        self.consumed = Counter(f"{PREFIX}_events_consumed",
                                "Records read from the source, valid or not", registry=r)
        self.rejected = Counter(f"{PREFIX}_events_rejected",
                                "Records sent to the dead-letter topic, by reason", ["reason"],
                                registry=r)
        self.skipped = Counter(f"{PREFIX}_events_skipped",
                               "Valid events dropped by the configured event filter", registry=r)
        self.consumer_lag = Gauge(f"{PREFIX}_consumer_lag",
                                  "Records in the topic not yet consumed (all partitions)",
                                  registry=r)
        self.source_up = Gauge(f"{PREFIX}_source_up",
                               "1 while the event source works; 0 while it is being rebuilt",
                               registry=r)
        self.source_restarts = Counter(f"{PREFIX}_source_restarts",
                                       "Source failures, each followed by a rebuild, by when "
                                       "it failed (start, poll, flush, lag)", ["reason"],
                                       registry=r)
        self.partition_blocked = Gauge(
            f"{PREFIX}_partition_blocked",
            "1 while a partition is stopped at a batch the client cannot decode; the "
            "others flow on", ["partition", "reason"], registry=r)
        for reason in Reason:
            self.rejected.labels(reason=reason.value)
        for during in ("start", "poll", "flush", "lag"):
            self.source_restarts.labels(reason=during)


class EngineMetrics:
    """Training, store, snapshots, evaluation."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = _registry(registry)
        self.trained = Counter(f"{PREFIX}_events_trained",
                               "Fresh positives trained on (held-out ones are not)", registry=r)
        self.train_samples = Counter(f"{PREFIX}_train_samples",
                                     "Training samples (positives and negatives)", registry=r)
        self.train_steps = Counter(f"{PREFIX}_train_steps", "Optimizer steps", registry=r)
        self.replayed = Counter(f"{PREFIX}_replayed_positives",
                                "Positives replayed from the store", registry=r)
        self.replay_budget = Gauge(
            f"{PREFIX}_replay_budget_samples",
            "Replay samples left before idle replay stops until new events earn more "
            "(replay_ratio; +Inf without one); computed at scrape time", registry=r)
        self.loss = Gauge(f"{PREFIX}_train_loss", "Mean BCE loss of recent steps", registry=r)
        self.diverged = Counter(
            f"{PREFIX}_train_diverged",
            "Times training was found diverged (a non-finite loss): training, publishing "
            "and checkpoints stop, and the last good snapshot serves on", registry=r)
        self.negatives = Counter(f"{PREFIX}_negatives_drawn",
                                 "Negative candidates drawn, rejected ones included", registry=r)
        self.negatives_rejected = Counter(f"{PREFIX}_negatives_rejected",
                                          "Drawn negatives the user had touched", registry=r)
        self.negatives_short = Counter(
            f"{PREFIX}_negatives_short",
            "Negatives the device step left out: not found in its fixed rounds", registry=r)
        self.device_mirror_bytes = Gauge(
            f"{PREFIX}_device_mirror_bytes",
            "Device memory of the device step's mirror and fresh queue", registry=r)
        self.interactions = Gauge(f"{PREFIX}_store_interactions",
                                  "Distinct (user, item) pairs in the store", registry=r)
        self.store_bytes = Gauge(f"{PREFIX}_store_bytes", "Memory held by the store", registry=r)
        self.repeats = Counter(f"{PREFIX}_interaction_repeats",
                               "Events repeating a stored (user, item)", registry=r)
        self.split_users = Counter(
            f"{PREFIX}_users_in_several_partitions", "Users whose events arrived in more than "
            "one Kafka partition (counted once each, since start): events not keyed by user",
            registry=r)
        self.group_exchanges = Counter(
            f"{PREFIX}_group_exchanges", "Exchanges with the other trainers of the group "
            "(ncf_stream.group)", registry=r)
        self.group_exchange_seconds = Histogram(
            f"{PREFIX}_group_exchange_seconds", "Each exchange with the group, waiting for the "
            "others included: time the trainer did not train",
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0), registry=r)
        self.group_exchange_bytes = Counter(
            f"{PREFIX}_group_exchange_bytes", "Bytes of updates this trainer sent to the group "
            "(item rows it changed, and the tower)", registry=r)
        self.group_epoch = Gauge(
            f"{PREFIX}_group_epoch", "Exchanges the group has made since it started from "
            "nothing (checkpoints are tagged with it)", registry=r)
        self.users = Gauge(f"{PREFIX}_users", "Known users", registry=r)
        self.items = Gauge(f"{PREFIX}_items", "Known items", registry=r)
        self.holdouts = Gauge(f"{PREFIX}_holdouts", "Users with a held-out interaction",
                              registry=r)
        self.deletions = Counter(
            f"{PREFIX}_deletions", "Deletions applied, by kind (user, item) and outcome "
            "(deleted; unknown: the id was not known, a no-op)",
            ["kind", "outcome"], registry=r)
        self.expired = Counter(f"{PREFIX}_store_expired",
                               "Interactions dropped by retention (retention_s)", registry=r)
        self.expire_seconds = Histogram(f"{PREFIX}_store_expire_seconds",
                                        "Duration of one retention sweep", registry=r)
        self.snapshot_version = Gauge(f"{PREFIX}_snapshot_version", "Served snapshot version",
                                      registry=r)
        self.snapshot_events = Gauge(f"{PREFIX}_snapshot_events",
                                     "Consumed events the served snapshot includes", registry=r)
        self.snapshot_age = Gauge(f"{PREFIX}_snapshot_age_seconds",
                                  "Seconds since the served snapshot was published", registry=r)
        self.model_age = Gauge(f"{PREFIX}_model_age_seconds",
                               "Seconds since the served snapshot last took in new events "
                               "(replay-only publishes do not count); computed at scrape time",
                               registry=r)
        self.publish_seconds = Histogram(f"{PREFIX}_snapshot_publish_seconds",
                                         "Time to take and swap in a snapshot", registry=r)
        self.freshness = Histogram(
            f"{PREFIX}_freshness_seconds",
            "From consuming an event to serving the first snapshot that includes it",
            buckets=FRESHNESS_BUCKETS, registry=r)
        self.checkpoint_seconds = Histogram(f"{PREFIX}_checkpoint_seconds",
                                            "Time to write a checkpoint", registry=r,
                                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.index_items = Gauge(f"{PREFIX}_index_items", "Items in the candidate index",
                                 registry=r)
        self.exports = Counter(f"{PREFIX}_snapshot_exports",
                               "Snapshots exported to snapshot_dir for replicas", registry=r)
        self.export_failures = Counter(
            f"{PREFIX}_snapshot_export_failures",
            "Snapshot exports that failed, by reason (the errno name, or the exception's "
            "type); training and serving go on", ["reason"], registry=r)
        self.export_seconds = Histogram(f"{PREFIX}_snapshot_export_seconds",
                                        "Time to write one snapshot export (off the training "
                                        "thread)", registry=r,
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.candidate_recall = Gauge(
            f"{PREFIX}_candidate_recall",
            "Recall@10 of candidates + rescoring against the exact ranking (sampled users)",
            registry=r)
        self.eval_hit_ratio = Gauge(f"{PREFIX}_eval_hit_ratio", "HR@K on the rolling hold-out",
                                    ["k", "kind"], registry=r)
        self.eval_ndcg = Gauge(f"{PREFIX}_eval_ndcg", "NDCG@K on the rolling hold-out",
                               ["k", "kind"], registry=r)
        self.eval_seconds = Histogram(f"{PREFIX}_eval_duration_seconds",
                                      "Wall time of one evaluation", registry=r,
                                      buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.eval_users = Gauge(f"{PREFIX}_eval_users", "Hold-outs in the last evaluation",
                                registry=r)
        self.online_hit_ratio = Gauge(f"{PREFIX}_online_hit_ratio",
                                      "Share of probed events whose item was in the served "
                                      "top K before training on it", ["k"], registry=r)
        self.online_probes = Gauge(f"{PREFIX}_online_probes",
                                   "Events probed for the online hit ratio", registry=r)
        for k in KS:
            self.online_hit_ratio.labels(k=str(k))
            for kind in KINDS:
                self.eval_hit_ratio.labels(k=str(k), kind=kind)
                self.eval_ndcg.labels(k=str(k), kind=kind)


QUERY_ENDPOINTS = frozenset({"/v1/recommend", "Recommend"})


class ServingMetrics:
    """Requests by protocol and endpoint; top-k queries also feed a recent-latency window."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = _registry(registry)
        self.window = LatencyWindow()
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "Request latency, by protocol and endpoint",
                                  ["protocol", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Requests by protocol, endpoint, code",
                                ["protocol", "endpoint", "code"], registry=r)
        for protocol, endpoints, ok in (
                ("http", ("/v1/recommend", "/v1/recommend/batch", "/v1/score", "/v1/similar",
                          "/v1/popular", "/v1/users/{user}/items"), "200"),
                ("grpc", ("Recommend", "RecommendBatch", "Score", "Similar", "Popular",
                          "UserItems"), "OK")):
            for endpoint in endpoints:
                self.duration.labels(protocol=protocol, endpoint=endpoint)
                self.requests.labels(protocol=protocol, endpoint=endpoint, code=ok)

    def observe(self, protocol: str, endpoint: str, code: str, seconds: float) -> None:
        self.duration.labels(protocol=protocol, endpoint=endpoint).observe(seconds)
        self.requests.labels(protocol=protocol, endpoint=endpoint, code=code).inc()
        if endpoint in QUERY_ENDPOINTS:
            self.window.add(seconds)


class ReplicaMetrics:
    """A serving replica's snapshots (ncf-stream serve-replica; ncf_stream.replica)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = _registry(registry)
        self.version = Gauge(f"{PREFIX}_replica_snapshot_version",
                             "Version of the snapshot the replica serves (0: none yet; over "
                             "a group of trainers, the lowest loaded rank's)",
                             registry=r)
        self.age = Gauge(f"{PREFIX}_replica_snapshot_age_seconds",
                         "Seconds since the trainer published the snapshot the replica serves "
                         "(wall clocks of two machines, when they are two; over a group of "
                         "trainers, the oldest rank's); computed at scrape time", registry=r)
        self.loads = Counter(f"{PREFIX}_replica_snapshot_loads",
                             "Exported snapshots loaded and swapped in", registry=r)
        self.load_failures = Counter(
            f"{PREFIX}_replica_snapshot_load_failures",
            "Exported snapshots rejected (corrupt: a checksum or a file that does not "
            "match; format: a format this replica cannot read; error: anything else); the "
            "last good one keeps serving", ["reason"], registry=r)
        self.load_seconds = Histogram(f"{PREFIX}_replica_snapshot_load_seconds",
                                      "Time to read, check and build one exported snapshot",
                                      registry=r,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        for reason in ("corrupt", "format", "error"):
            self.load_failures.labels(reason=reason)
        # A replica over a group of trainers (ncf_stream.routing): one series per rank.
        self.rank_version = Gauge(f"{PREFIX}_replica_rank_snapshot_version",
                                  "A replica over a group of trainers: the version of each "
                                  "rank's snapshot it serves (0: none yet)", ["rank"],
                                  registry=r)
        self.rank_age = Gauge(f"{PREFIX}_replica_rank_snapshot_age_seconds",
                              "A replica over a group of trainers: seconds since each rank "
                              "published the snapshot the replica serves; computed at scrape "
                              "time", ["rank"], registry=r)
        self.users_in_several_ranks = Counter(
            f"{PREFIX}_replica_users_in_several_ranks",
            "A replica over a group of trainers: users answered whom more than one rank's "
            "snapshot knows (their events arrived in partitions of two trainers: events not "
            "keyed by user), each from the newest of those snapshots; counted per user "
            "answered", registry=r)


class Metrics:
    """All of them on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = _registry(registry)
        self.ingest = IngestMetrics(self.registry)
        self.engine = EngineMetrics(self.registry)
        self.serving = ServingMetrics(self.registry)
