"""The engine: poll -> ingest -> train -> publish -> checkpoint -> commit, on one thread.

The daemon (``consumers.daemon``), the benchmarks and the tests all run this
loop; only the :class:`~ncf_stream.source.EventSource` differs (Kafka in
production, :class:`~ncf_stream.source.MemorySource` elsewhere).

Scheduling. Fresh positives are trained before anything else, each poll's
until drained (bounded by ``max_pending_positives``; see ``FRESH_SLICE_MAX_STEPS``),
so the order of polls and steps follows the data, not the machine's speed.
Once they are drained the stream is idle, and replay from the store takes
``replay_duty`` of the wall time: the engine trains a slice, then rests inside
``source.poll`` for the rest of the duty cycle, so records that arrive meanwhile
wake it at once. The rest is whatever keeps the replay share at the duty, counted
over the whole idle period: publishing, gauges and a source's poll latency use
the rest budget instead of stretching it.

Durability: the state (model, optimizer, store, ids) is checkpointed every
``checkpoint_every_s`` and at :meth:`Engine.close`, with the offsets it
includes; only then are those offsets committed to the source. On start the
newest valid checkpoint is restored and the source starts from its offsets, so
after a crash the events since the checkpoint are applied once more to the
restored state: every event's effect on the store happens exactly once.

What a snapshot includes: ``snapshot_events`` counts the consumed events whose
positives were all trained when the snapshot was taken (the *trained
watermark*). A snapshot published while fresh positives still wait (the
publisher never lets one wait longer than twice its interval) covers fewer
events than were consumed, so a reader that sees ``snapshot_events`` reach a
count knows later snapshots add nothing for those events.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from prometheus_client import CollectorRegistry

from ncf_stream import checkpoint
from ncf_stream.api import RankStatus, Status
from ncf_stream.catalogue import Catalogue, RecentCounts
from ncf_stream.errors import ConfigError, GroupError, NcfStreamError
from ncf_stream.evaluator import EvalConfig, EvalReport, Evaluator, OnlineHitRate
from ncf_stream.events import Availability, Deletions, Events, segments
from ncf_stream.export import Exporter
from ncf_stream.faults import crash_point
from ncf_stream.group import Group, Header, rank_dir, read_manifest, write_manifest
from ncf_stream.ids import IdMap, MappedEvents
from ncf_stream.metrics import IngestMetrics, Metrics
from ncf_stream.recommend import Recommender
from ncf_stream.reshard import merge_partitions, merge_trainers
from ncf_stream.retrieval import IndexConfig
from ncf_stream.settings import Settings
from ncf_stream.snapshot import Publisher, SnapshotHolder
from ncf_stream.source import (
    LAG_EVERY_S,
    Blocked,
    EventBatch,
    EventSource,
    Partition,
    SourceError,
    UserPartitions,
    owns,
)
from ncf_stream.status_page import History, Sample
from ncf_stream.trainer import StepStats, Trainer, TrainerConfig

log = logging.getLogger(__name__)

TRAIN_SLICE_S = 0.05  # replay this long between polls, so consumption never stalls
# Fresh positives are trained until drained, not for a slice of wall time: when the
# next poll comes then depends on the data alone, not on the machine's speed, so a run
# over the same events repeats step for step (sliced by time, two in-process fits of
# one seed differed by up to 0.017 full HR@10). The backlog is bounded
# (max_pending_positives plus one poll), and so is the drain; this cap, in steps so
# that it too follows the data, is for a bound raised far above one poll, where
# publishing and admin requests would otherwise wait on the drain (64 steps: about
# 1 s at the quality profile on 2 CPU cores).
FRESH_SLICE_MAX_STEPS = 64
# A failed source is rebuilt after RESTART_FIRST_S, doubling up to RESTART_MAX_S while it
# keeps failing; one that stays up RESTART_RESET_S starts the doubling over.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
RESTART_RESET_S = 60.0
SPLIT_WARN_EVERY_S = 60.0  # users in several partitions: a warning at most this often
HISTORY_EVERY_S = 2.0  # one point of the status page's charts
# Retention sweeps run each time the newest event time moves on by this share of
# retention_s: the store then holds at most 1 + 1/8 of the window, and a sweep's cost
# (a pass over the stored pairs) is spread over an eighth of the window's events.
EXPIRE_EVERY = 1 / 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Counters:
    consumed: int = 0  # records read, rejected ones included
    rejected: int = 0
    trained: int = 0  # fresh positives trained
    lag: int = 0


@dataclass(frozen=True)
class Resume:
    """Where a source starts: the state's next offset per partition (a live mapping
    that the engine advances with every batch) and its id maps; and the metrics
    it reports ingest to."""

    positions: Mapping[Partition, int]
    user_ids: IdMap
    item_ids: IdMap
    metrics: IngestMetrics
    # A trainer of a group (even of one, on a group's checkpoints): the engine maps ids
    # itself, so the source must deliver them unmapped (ncf_stream.group).
    grouped: bool = False


class SourceFactory(Protocol):
    def __call__(self, resume: Resume) -> EventSource: ...


class TrainedWatermark:
    """The consumed-event count up to which every released positive has been trained."""

    def __init__(self, consumed: int) -> None:
        self.value = consumed
        self._queued = 0  # fresh positives released to training, ever
        self._marks: deque[tuple[int, int]] = deque()  # (queued after a batch, consumed)

    def ingested(self, queued: int, consumed: int) -> None:
        self._queued += queued
        self._marks.append((self._queued, consumed))

    def trained(self, pending: int) -> int:
        """Advance past every batch whose positives are trained; ``pending`` is what waits."""
        done = self._queued - pending
        while self._marks and self._marks[0][0] <= done:
            self.value = self._marks.popleft()[1]
        return self.value


@dataclass
class SourceHealth:
    """Whether the source is up; if not, why, and when the next rebuild is due."""

    up: bool = True
    reason: str = ""  # why it is down ("" when up)
    attempts: int = 0  # rebuilds since the last stable period
    backoff: float = RESTART_FIRST_S
    retry_at: float = 0.0  # time.monotonic() of the next rebuild
    up_since: float = field(default_factory=time.monotonic)

    def failed(self, reason: str) -> None:
        now = time.monotonic()
        if self.up and now - self.up_since >= RESTART_RESET_S:
            self.backoff, self.attempts = RESTART_FIRST_S, 0  # stable for a while: start over
        elif not self.up or self.attempts:
            self.backoff = min(2 * self.backoff, RESTART_MAX_S)
        self.up, self.reason = False, reason
        self.retry_at = now + self.backoff

    def restarted(self) -> None:
        self.up, self.reason = True, ""
        self.attempts += 1
        self.up_since = time.monotonic()


def _segments(events: Events | MappedEvents, deletions: Deletions
              ) -> list[tuple[Events | MappedEvents, Deletions]]:
    """The batch in stream order: runs of interactions, each followed by the deletions
    that came after it (Deletions.at)."""
    if not len(deletions):
        return [(events, deletions)]
    if isinstance(events, MappedEvents):
        raise NcfStreamError("a batch with deletions must carry unmapped events: rows mapped "
                             "past a deletion would not match this engine's maps")
    return list(segments(events, deletions))


def _offsets(positions: Mapping[Partition, int]) -> str:
    return ", ".join(f"{t}[{p}] offset {o}" for (t, p), o in sorted(positions.items())) or (
        "the start of the topic")


class Engine:
    """The learning state, its loop, and what serving and monitoring read from it.

    ``source`` is an :class:`EventSource`, or a factory that builds one from
    where the restored state resumes (:class:`Resume`).
    """

    def __init__(self, settings: Settings, source: EventSource | SourceFactory,
                 registry: CollectorRegistry | None = None) -> None:
        self.settings = s = settings
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.device = resolve_device(s.device)
        self.trainer = Trainer(TrainerConfig.from_settings(s), self.device)
        self.holder = SnapshotHolder()
        # Item availability and recent popularity: stream state for serving, never trained on.
        self.catalogue = Catalogue(popular_window_s=s.popular_window_s)
        self.counters = Counters()
        # Next offset per partition that the state includes: the checkpoint's, then
        # advanced by every ingested batch. The source starts here.
        self.positions: dict[Partition, int] = {}
        # A trainer of a group keeps its checkpoints and exports under rank-<r>/ and
        # restores the epoch the group last checkpointed as a whole (ncf_stream.group). A
        # daemon whose checkpoint_dir holds a group's checkpoints stays in that layout,
        # even as a group of one: that is how a group's partitions move to fewer trainers.
        manifest = read_manifest(s.checkpoint_dir) if s.checkpoint_dir else None
        self._grouped = grouped = s.group_size > 1 or manifest is not None
        self._checkpoint_dir = s.checkpoint_dir and (
            str(rank_dir(s.checkpoint_dir, s.group_rank)) if grouped else s.checkpoint_dir)
        restored_partitions = UserPartitions()
        restored_epoch: int | None = None
        self._shrunk_from: int | None = None  # resharded from a larger group (_reshard)
        if self._checkpoint_dir:
            restored = self._restore(manifest)
            if manifest is not None:
                restored_epoch = int(manifest["epoch"])
            if restored is not None:
                self.positions = dict(restored.offsets)
                self.counters = Counters(**{k: v for k, v in restored.counters.items()
                                            if k in Counters.__dataclass_fields__})
                self.catalogue = restored.catalogue
                restored_partitions = restored.partitions
                if self.catalogue.recent.window_s != s.popular_window_s:
                    log.warning("popular_window_s changed from %s to %s: recent popularity "
                                "starts over", self.catalogue.recent.window_s,
                                s.popular_window_s)
                    self.catalogue.recent = RecentCounts(s.popular_window_s)
        self.publisher = Publisher(
            self.trainer, self.holder,
            IndexConfig.from_settings(s),
            every_s=s.publish_every_s, every_events=s.publish_every_events,
            index_refresh_s=s.index_refresh_s, catalogue=self.catalogue)
        self.recommender = Recommender.from_settings(self.holder, s)
        # Published snapshots written to snapshot_dir for replicas, off this thread.
        self.exporter = (Exporter(rank_dir(s.snapshot_dir, s.group_rank) if grouped
                                  else s.snapshot_dir, s.snapshot_export_every_s,
                                  self.metrics.engine, s.background_policy)
                         if s.snapshot_dir else None)
        self.evaluator = Evaluator(
            self.holder, EvalConfig.from_settings(s), on_report=self._export_eval)
        self.online = OnlineHitRate(s.online_fraction, candidates=s.candidates,
                                    exact_items=s.exact_items, seed=s.seed)
        self.watermark = TrainedWatermark(self.counters.consumed)
        self.history = History()
        self.on_publish: list[Callable[[int], None]] = []  # called with each new version
        self._checkpointed = dict(self.positions)
        self._last_checkpoint = time.monotonic()
        self._last_gauges = 0.0
        self._last_sample: Sample | None = None
        self._last_query_count = 0
        self._drawn = (0, 0)
        self._short = 0  # the device step's shortfall at the last gauges
        self._unpublished_since: float | None = None
        # When a snapshot last took in new events; the gauge is read at scrape time, so
        # it grows even if this loop stops (what the stale-model alert needs).
        self._fresh_at = time.time()
        self.metrics.engine.model_age.set_function(lambda: time.time() - self._fresh_at)
        self.metrics.engine.replay_budget.set_function(lambda: self.trainer.replay_budget)
        self._idle_since: float | None = None  # start of the current idle period
        self._idle_replay_s = 0.0  # the trainer thread's CPU spent replaying within it
        self.health = SourceHealth()
        self.diverged = ""  # why training stopped on a non-finite loss ("" while it is fine)
        self._last_loss: torch.Tensor | None = None
        self.blocked: dict[Partition, Blocked] = {}  # as the source last reported
        self._blocks_logged: set[tuple[Partition, int]] = set()  # once each, across rebuilds
        # Deletions asked for through the admin API: request threads only enqueue, the
        # loop applies them between batches (the engine's state has one writer).
        self._requested: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._dirty = False  # state changed by an admin request since the last checkpoint
        self._newest_ts: float | None = None  # the newest event time seen (retention)
        self.user_partitions = restored_partitions
        self.split_users = 0  # users seen in more than one partition since start
        self._split_warned_at = -SPLIT_WARN_EVERY_S
        self._expired_at: float | None = None  # the newest event time at the last sweep
        # A factory's source is rebuilt when it fails (None meanwhile); a given one is not.
        self._factory: SourceFactory | None = None
        self.source: EventSource | None
        if callable(source):
            self._factory, self.source = source, self._open_source(source)
        else:
            self.source = source
        self.metrics.ingest.source_up.set(1)
        # The group (group_size > 1): a batch with items new to the group waits here for
        # the next exchange, which gives them rows, and every batch after it too, so each
        # user's events keep their order; item deletions wait for the exchange as well.
        self.group: Group | None = None
        self._held: list[EventBatch] = []
        self._held_records = 0
        self._held_items: set[str] = set()
        self._group_deletes: list[str] = []
        self._group_availability: list[tuple[str, bool]] = []
        self._group_done = False  # the group decided to stop: the loop ends
        self._aligned: dict[str, int] | None = (  # the last epoch every trainer checkpointed
            None if restored_epoch is None or manifest is None
            else {"epoch": restored_epoch, "size": int(manifest["size"])})
        if grouped:
            self.group = Group(s, self.trainer)
            self.group.join(restored_epoch)
            self.metrics.engine.group_epoch.set(self.group.epoch)
            log.info("rank %d of a group of %d trainers, at epoch %d", s.group_rank,
                     s.group_size, self.group.epoch)

    def _restore(self, manifest: dict[str, Any] | None) -> checkpoint.Restored | None:
        """Load the state to resume from into ``self.trainer``: the newest checkpoint of
        a single trainer; a group's at the epoch its manifest names (none: start afresh);
        or, when the group was of another size, this rank's share of every old rank's
        users, re-dealt by partition (ncf_stream.reshard)."""
        s = self.settings
        assert self._checkpoint_dir and s.checkpoint_dir
        if manifest is None:
            if s.group_size == 1:
                return checkpoint.load_latest(self._checkpoint_dir, self.trainer)
            if any(Path(s.checkpoint_dir).glob("ckpt-*")):
                # Starting afresh would silently drop that state (and replay the topic).
                raise ConfigError(
                    f"{s.checkpoint_dir} holds a single trainer's checkpoints: a group of "
                    f"{s.group_size} cannot start from them yet. Run the group on a new "
                    "checkpoint_dir (it replays the topic from its start), or run one trainer "
                    "(docs/group.md)")
            return None  # no epoch every trainer wrote: the group starts afresh
        epoch, old_size = int(manifest["epoch"]), int(manifest["size"])
        if old_size == s.group_size:
            restored = checkpoint.load_latest(self._checkpoint_dir, self.trainer,
                                              group={"epoch": epoch, "size": old_size})
            if restored is None:
                raise GroupError(f"rank {s.group_rank} has no checkpoint of the group's epoch "
                                 f"{epoch} in {self._checkpoint_dir}")
            return restored
        return self._reshard(epoch, old_size)

    def _reshard(self, epoch: int, old_size: int) -> checkpoint.Restored:
        """Resume a group that checkpointed with ``old_size`` trainers as rank r of
        ``group_size``: every old rank's checkpoint of ``epoch`` is read, and the users
        of the partitions p with p % group_size == r are kept (a user whose partition is
        unknown stays with its old rank's share). The item side is identical in all of
        them (an aligned epoch); the offsets are those of the partitions now owned."""
        s = self.settings
        assert s.checkpoint_dir
        size, rank = s.group_size, s.group_rank
        tag = {"epoch": epoch, "size": old_size}
        parts: list[tuple[Trainer, np.ndarray]] = []
        partitions: list[UserPartitions] = []
        offsets: dict[Partition, int] = {}
        counters: dict[str, int] = {}
        catalogue: Catalogue | None = None
        taken: set[str] = set()
        for old in range(old_size):
            trainer = Trainer(self.trainer.cfg, self.device)
            restored = checkpoint.load_latest(rank_dir(s.checkpoint_dir, old), trainer, group=tag)
            if restored is None:
                raise GroupError(f"the group's epoch {epoch} has no checkpoint of its rank "
                                 f"{old} in {rank_dir(s.checkpoint_dir, old)}")
            rows = np.arange(len(trainer.user_ids))
            of = restored.partitions.partition_of(rows)
            mine = np.where(of >= 0, of % size == rank, old % size == rank)
            # A user whose events reached two old ranks (not keyed by user) has a partial
            # state in each: the first one taken is kept, the others are dropped, counted.
            ids = trainer.user_ids.ids(rows)
            live = np.array([i is not None for i in ids.tolist()], dtype=bool)
            again = np.array([i in taken for i in ids.tolist()], dtype=bool)
            keep = rows[mine & live & ~again]
            if (mine & live & again).any():
                log.warning("resharding: %d users had state on more than one old trainer "
                            "(events in several partitions); kept the first one's",
                            int((mine & live & again).sum()))
            taken.update(ids[keep].tolist())
            parts.append((trainer, keep))
            partitions.append(restored.partitions)
            offsets |= {tp: o for tp, o in restored.offsets.items() if owns(tp[1], size, rank)}
            if old % size == rank:  # counted per trainer, not per partition: an estimate
                for k, v in restored.counters.items():
                    counters[k] = counters.get(k, 0) + v
            catalogue = catalogue or restored.catalogue  # availability is the group's
        self.trainer, moved = merge_trainers(parts, self.trainer.cfg, self.device)
        self._shrunk_from = old_size if old_size > size else None
        log.info("resharded the group's epoch %d from %d trainers to %d: rank %d takes %d "
                 "users and partitions %s", epoch, old_size, size, rank,
                 len(self.trainer.user_ids), sorted(p for _, p in offsets))
        assert catalogue is not None
        return checkpoint.Restored(Path(s.checkpoint_dir), offsets, counters, catalogue,
                                   merge_partitions(partitions, moved))

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None,
            until: Callable[[], bool] | None = None) -> None:
        """Run the loop on this thread until ``stop`` is set or ``until()`` holds."""
        stop = stop or threading.Event()
        if self.group is not None:  # the group stops together, at an exchange
            while not self._group_done:
                self.cycle(stop, done=until is not None and until())
            return
        while not stop.is_set() and not (until is not None and until()):
            self.cycle(stop)

    def cycle(self, stop: threading.Event | None = None, done: bool = False) -> None:
        """One turn: poll (resting there while idle), ingest, train a slice, then
        whatever is due (the group's exchange, publish, checkpoint, gauges). ``done``
        (a group's trainer): this one has nothing left; the group stops when all have."""
        self._apply_requested()
        batch = self._poll(stop)
        if batch is not None:
            if self.group is not None and self._hold(batch):
                pass  # ingested at the next exchange
            else:
                self._ingest(batch)
                self._maybe_expire()
        self._train(stop)
        stopping = stop is not None and stop.is_set()
        if self.group is not None and (self.group.due() or stopping or done):
            self._exchange(stopping, done)
        self._maybe_publish()
        now = time.monotonic()
        # A group's checkpoints are taken at its exchanges, aligned (_exchange).
        if self.group is None and now - self._last_checkpoint >= self.settings.checkpoint_every_s:
            self._last_checkpoint = now
            self.checkpoint()
        if now - self._last_gauges >= LAG_EVERY_S:
            self._last_gauges = now
            self._gauges()

    # ---- the source, and its restarts --------------------------------------------------------

    def _open_source(self, factory: SourceFactory) -> EventSource:
        return factory(Resume(self.positions, self.trainer.user_ids, self.trainer.item_ids,
                              self.metrics.ingest, self._grouped))

    def _poll(self, stop: threading.Event | None) -> EventBatch | None:
        """The source's next batch; while it is down, rest and rebuild it when due.
        Training, publishing and serving go on either way."""
        rest = self._rest()
        if self._held_records >= self.settings.max_pending_positives:
            if rest > 0:  # enough waits for the exchange already: the rest waits in the source
                (stop.wait if stop is not None else time.sleep)(rest)
            return None
        if self.trainer.pending >= self.settings.max_pending_positives:
            return None  # backpressure: the burst waits in the source, not in memory
        if self.source is None:
            if self._factory is None:  # _source_failed raises for these: never here
                raise SourceError("the source failed and cannot be rebuilt")
            if time.monotonic() < self.health.retry_at:
                wait = min(rest, self.health.retry_at - time.monotonic())
                if stop is not None:
                    stop.wait(wait)
                else:
                    time.sleep(wait)
                return None
            try:
                self.source = self._open_source(self._factory)
            except SourceError as e:
                self._source_failed(e, "start")
                return None
            self.health.restarted()
            self.metrics.ingest.source_up.set(1)
            log.warning("source restarted (attempt %d); resuming at %s", self.health.attempts,
                        _offsets(self.positions))
        try:
            batch = self.source.poll(rest)
        except SourceError as e:
            self._source_failed(e, "poll")
            return None
        self._note_blocked(self.source.blocked())
        return batch

    def _note_blocked(self, blocked: Mapping[Partition, Blocked]) -> None:
        """Export and log partitions the source stopped at an undecodable batch."""
        if blocked == self.blocked:
            return
        gauge = self.metrics.ingest.partition_blocked
        for (_, p), b in self.blocked.items():
            gauge.labels(partition=str(p), reason=b.reason).set(0)
        for (t, p), b in blocked.items():
            gauge.labels(partition=str(p), reason=b.reason).set(1)
            if ((t, p), b.offset) not in self._blocks_logged:
                self._blocks_logged.add(((t, p), b.offset))
                log.error("%s[%d] offset %d: the client cannot decode this batch (%s: %s). "
                          "The partition is paused, the others flow on, serving goes on. "
                          "Install what the codec needs and restart, or set "
                          "dead_letter_undecodable to skip the batch's range "
                          "(docs/operations.md).", t, p, b.offset, b.reason, b.detail)
        self.blocked = dict(blocked)

    def _source_failed(self, error: SourceError, during: str) -> None:
        """Serve on from the last snapshot and rebuild the source later: the state's
        positions are where the new one starts, so nothing is lost or applied twice."""
        if self._factory is None:
            raise error  # a source given as an instance cannot be rebuilt
        first = self.health.up
        # Batches held for the group's next exchange (never ingested: the state's positions
        # are before them) come again from the rebuilt source, which starts there.
        self._held, self._held_records, self._held_items = [], 0, set()
        self.health.failed(f"{during}: {error}")
        self.metrics.ingest.source_up.set(0)
        self.metrics.ingest.source_restarts.labels(reason=during).inc()
        if first:  # once per outage: the retries of a crash loop are counted, not logged
            log.error("source failed during %s at %s; serving the last snapshot, rebuilding "
                      "the source in %.1f s", during, _offsets(self.positions),
                      self.health.backoff, exc_info=error)
        if self.source is not None:
            source, self.source = self.source, None
            try:
                source.close()
            except Exception as e:  # already broken: its close may fail too
                log.debug("closing the failed source: %s", e)

    def _rest(self) -> float:
        """How long the next poll may wait: 0 with fresh work; while idle, what keeps
        replay at ``replay_duty`` of the idle period's wall time."""
        if self.trainer.pending:
            return 0.0
        if self._idle_since is None:  # idle, and nothing to replay
            rest = self.settings.kafka_poll_timeout_s
        else:
            elapsed = time.monotonic() - self._idle_since
            rest = max(0.0, self._idle_replay_s / self.settings.replay_duty - elapsed)
        if self.group is not None:  # never past the next exchange: the others wait for it
            rest = min(rest, max(0.0, self.group.last_sync + self.group.every_s
                                 - time.monotonic()))
        return rest

    def _train(self, stop: threading.Event | None) -> None:
        """Train for up to one slice: fresh positives until drained, else replay."""
        if self.diverged:  # nothing to do until a restart; ingest stops at backpressure
            (stop.wait if stop is not None else time.sleep)(TRAIN_SLICE_S)
            return
        fresh, steps = self.trainer.pending > 0, 0
        start, cpu = time.perf_counter(), time.thread_time()
        while not (stop and stop.is_set()):
            if fresh and steps == FRESH_SLICE_MAX_STEPS:
                break
            if not fresh and time.perf_counter() - start >= TRAIN_SLICE_S:
                break
            if steps and self.group is not None and self.group.due():
                # The others wait for this trainer's exchange: train on after it. (Not
                # before one step: a rest may end just as the exchange falls due, and
                # idle replay would then never start.)
                break
            stats = self.trainer.step()
            if stats is None:
                break
            steps += 1
            self._count(stats)
            if fresh and self.trainer.pending == 0:
                break  # drained: back to the source before replaying
        # The duty counts the trainer's own CPU: time it spent preempted by requests or
        # waiting for their GIL is not replay (by wall time, 100 qps cut the idle rate
        # to 0.16 of the trainer's, bench/idle.py).
        worked = time.thread_time() - cpu
        self.watermark.trained(self.trainer.pending)
        if fresh or steps == 0:  # busy, or nothing to replay: not an idle replay period
            self._idle_since = None
        elif self._idle_since is None:  # the first replay slice of an idle period
            self._idle_since = time.monotonic() - (time.perf_counter() - start)
            self._idle_replay_s = worked
        else:
            self._idle_replay_s += worked

    def _ingest(self, batch: EventBatch) -> None:
        # Availability is not an interaction: it reaches the catalogue only, never the
        # store, training or the online hit rate; the next snapshot publishes it. Its
        # order matters only against deletions (of the same item), so it is applied
        # between them, each event after the deletions that preceded it.
        avail, done = batch.availability, 0
        queued, at, where = 0, 0, batch.partitions
        for part, deletions in _segments(batch.events, batch.deletions):
            queued += self._ingest_events(
                part, None if where is None else where[at: at + len(part)])
            at += len(part)
            for kind, external_id in zip(deletions.kinds.tolist(), deletions.ids.tolist(),
                                         strict=True):
                self._availability(avail.take(np.flatnonzero(avail.after == done)))
                self.forget(kind, external_id)
                done += 1
        self._availability(avail.take(np.flatnonzero(avail.after >= done)))
        crash_point("ingest")
        self.positions.update(batch.commit_offsets())
        c = self.counters
        c.consumed += batch.records
        c.rejected += batch.rejected
        self.watermark.ingested(queued, c.consumed)
        if self._unpublished_since is None:
            self._unpublished_since = time.monotonic()

    def _availability(self, events: Availability) -> None:
        """Apply availability events; in a group every trainer serves every item, so all
        apply them at the next exchange (before its item deletions)."""
        if self.group is not None:
            self._group_availability += zip(events.items.tolist(), events.available.tolist(),
                                            strict=True)
        else:
            self.catalogue.availability.apply(events)

    def _ingest_events(self, events: Events | MappedEvents,
                       partitions: np.ndarray | None = None) -> int:
        """Ingest interactions (``partitions``: each one's, when the source knows them);
        returns the positives queued for training."""
        if not len(events):
            return 0
        users, items = self.trainer.rows(events)
        if partitions is not None:
            self._check_partitions(users, partitions)
        self.catalogue.recent.add(items, events.ts)
        self.online.observe(self.holder.get(), users, items)  # before training on them
        result = self.trainer.ingest_rows(users, items, events.ts)
        self.metrics.engine.repeats.inc(result.repeats)
        newest = float(np.max(events.ts))
        self._newest_ts = newest if self._newest_ts is None else max(self._newest_ts, newest)
        return len(result.train_users)

    def _check_partitions(self, users: np.ndarray, partitions: np.ndarray) -> None:
        """Count users whose events arrive in more than one partition (UserPartitions);
        warn at most every SPLIT_WARN_EVERY_S. Never the ids: logs outlive deletions."""
        split = self.user_partitions.observe(users, partitions)
        if not split:
            return
        self.split_users += split
        self.metrics.engine.split_users.inc(split)
        now = time.monotonic()
        if now - self._split_warned_at >= SPLIT_WARN_EVERY_S:
            self._split_warned_at = now
            log.warning("%d more users have events in more than one partition (%d since "
                        "start): the producer is not keying events by user, or partitions were "
                        "added to the topic; one worker of a group would not hold all of such "
                        "a user's state (docs/operations.md, \"Events keyed by user\")", split,
                        self.split_users)

    # ---- the group (ncf_stream.group) ----------------------------------------------------------

    def _hold(self, batch: EventBatch) -> bool:
        """Keep a batch with items new to the group for the next exchange; False: ingest it."""
        assert self.group is not None
        if isinstance(batch.events, MappedEvents):
            raise NcfStreamError("a trainer of a group maps ids itself: its source must "
                                 "deliver ids, not rows")
        new = self.group.unknown_items(batch.events)
        if not new and not self._held:
            return False
        self._held.append(batch)
        self._held_records += batch.records
        self._held_items.update(new)
        return True

    def _exchange(self, stopping: bool, done: bool) -> None:
        """One exchange of the group: shared updates summed, new items given rows, the
        held batch ingested, item deletions applied; then an aligned checkpoint when
        decided, and the loop's end when the group stops."""
        g, s = self.group, self.settings
        assert g is not None
        start = time.perf_counter()
        sent_deletes, sent_availability = len(self._group_deletes), len(self._group_availability)
        header = Header(
            epoch=g.epoch, new_items=sorted(self._held_items),
            delete_items=self._group_deletes[:sent_deletes],
            availability=self._group_availability[:sent_availability],
            checkpoint=bool(self._checkpoint_dir) and g.rank == 0
            and time.monotonic() - self._last_checkpoint >= s.checkpoint_every_s,
            dirty=bool(self._checkpoint_dir) and (self.positions != self._checkpointed
                                                  or self._dirty),
            stop=stopping, done=done and not self._held and not self.trainer.pending,
            finite=self._check_finite())
        decision = g.exchange(header)
        if decision.diverged and not self.diverged:
            self.diverged = ("training diverged on another trainer of the group; serving the "
                             "last good snapshot, restart the group to resume from the last "
                             "checkpoint (a lower lr helps)")
            self.metrics.engine.diverged.inc()
            log.error("%s", self.diverged)
        g.assign(decision.new_items)
        held, self._held, self._held_records, self._held_items = self._held, [], 0, set()
        for batch in held:
            self._ingest(batch)
            self._maybe_expire()
        del self._group_deletes[:sent_deletes]
        del self._group_availability[:sent_availability]
        deletes, availability = decision.delete_items, decision.availability
        if (decision.checkpoint or decision.stop) and not decision.diverged:
            # The held batches just ingested may carry item deletions and availability
            # events, and the checkpoint below covers their offsets: they must be in it
            # (a deletion past the checkpoint's offsets would be lost to a restart).
            more_deletes, more_availability = g.pending(self._group_deletes,
                                                        self._group_availability)
            deletes = sorted({*deletes, *more_deletes})
            availability = availability + more_availability
            self._group_deletes, self._group_availability = [], []
        if availability:
            self.catalogue.availability.apply(Availability.from_rows(availability))
            self._changed()
        for item in deletes:
            self._forget("item", item)
        if deletes:
            g.forgotten()
        if deletes or availability or self._group_deletes or self._group_availability:
            self._dirty = True  # applied, or consumed and waiting: a checkpoint follows
        m = self.metrics.engine
        m.group_exchanges.inc()
        m.group_epoch.set(g.epoch)
        m.group_exchange_bytes.inc(g.bytes_sent)
        m.group_exchange_seconds.observe(time.perf_counter() - start)
        if decision.checkpoint:
            self._last_checkpoint = time.monotonic()
            self._group_checkpoint()
        if decision.stop:
            self._group_done = True
        g.synced()

    def _group_checkpoint(self) -> None:
        """Every trainer writes its checkpoint of this epoch; once all have, rank 0
        records the epoch in the manifest and each commits its offsets."""
        g, s = self.group, self.settings
        assert g is not None and s.checkpoint_dir
        tag = {"epoch": g.epoch, "size": g.size}
        try:
            written = self._save(group=tag)
        except Exception as e:  # any: the others wait in the collective below for this one
            log.error("could not write the checkpoint of epoch %d: %s", g.epoch, e)
            written = False
        if not g.checkpointed(written):
            log.warning("epoch %d was not checkpointed by every trainer: the group's last "
                        "aligned checkpoint stays the previous one", g.epoch)
            return
        if g.rank == 0:
            write_manifest(s.checkpoint_dir, g.epoch, g.size)
            self._remove_shrunk_ranks()
        # Only now, and never the previous aligned epoch: until rank 0's manifest names
        # this one, a restart resumes from that.
        assert self._checkpoint_dir
        checkpoint.prune(self._checkpoint_dir, s.checkpoint_keep,
                         protect=[tag] + ([self._aligned] if self._aligned else []))
        self._aligned = tag
        self._commit()

    def _remove_shrunk_ranks(self) -> None:
        """Once a group that shrank has checkpointed at its new size, the old ranks beyond
        it are history: their checkpoints are never restored again, and their last
        exports would have replicas answer users deleted since by their new owners."""
        s, old = self.settings, self._shrunk_from
        if old is None:
            return
        self._shrunk_from = None
        for rank in range(s.group_size, old):
            for root in (s.checkpoint_dir, s.snapshot_dir):
                if root:
                    shutil.rmtree(rank_dir(root, rank), ignore_errors=True)
        log.info("the group shrank from %d to %d trainers: removed ranks %d-%d's checkpoints "
                 "and exports", old, s.group_size, s.group_size, old - 1)

    # ---- forgetting and retention --------------------------------------------------------------

    def forget(self, kind: str, external_id: str) -> bool:
        """Delete a user or an item now, on the loop's thread (a Kafka delete event, or an
        admin request taken off the queue); returns whether the id was known. An unknown
        id is a no-op, counted: it may be a repeat, or name an id the stream never showed.

        In a group an item's rows are shared, so every trainer deletes it at the next
        exchange instead (with the interactions consumed until then)."""
        if kind == "item" and self.group is not None:
            self._group_deletes.append(external_id)
            return external_id in self.trainer.item_ids
        return self._forget(kind, external_id)

    def _forget(self, kind: str, external_id: str) -> bool:
        if kind == "user":
            removed = self.trainer.forget_user(external_id)
        elif kind == "item":
            row = int(self.trainer.item_ids.rows([external_id], add=False)[0])
            removed = self.trainer.forget_item(external_id)
            self.catalogue.forget_item(external_id, row)  # known to the catalogue alone too
        else:
            raise ValueError(f"kind must be 'user' or 'item', not {kind!r}")
        known = removed >= 0
        self.metrics.engine.deletions.labels(kind=kind,
                                             outcome="deleted" if known else "unknown").inc()
        if known:
            log.info("deleted %s row with %d interactions; gone from the next snapshot",
                     kind, removed)  # never the id: logs outlive the deletion
            self._changed(items_removed=kind == "item")
        return known

    def request_delete(self, kind: str, external_id: str) -> None:
        """Ask the loop to delete a user or an item (any thread; the admin API). It is
        applied before the next batch and served from the next snapshot; it is in the
        next checkpoint, but not in Kafka: a restart from an older checkpoint replays
        the topic without it (docs/operations.md, "Forgetting")."""
        if kind not in ("user", "item"):
            raise ValueError(f"kind must be 'user' or 'item', not {kind!r}")
        self._requested.put((kind, external_id))

    def knows(self, kind: str, external_id: str) -> bool:
        """Whether the served snapshot knows a user or an item (any thread)."""
        snap = self.holder.get()
        if snap is None:
            return False
        if kind == "user":
            return snap.user_row(external_id) is not None
        return bool(snap.item_rows([external_id])[0] >= 0)

    def _apply_requested(self) -> None:
        while True:
            try:
                kind, external_id = self._requested.get_nowait()
            except queue.Empty:
                return
            if self.forget(kind, external_id):
                # No batch moved the offsets: the next checkpoint must be written anyway.
                self._dirty = True
                self._reopen_mapping_source()

    def _reopen_mapping_source(self) -> None:
        """A source that maps ids ahead of the engine (the daemon's source process) keeps
        maps of its own, which a deletion outside the stream leaves behind: it would go
        on mapping the deleted id to the tombstone. Reopen it from the engine's maps and
        positions, as after a failure: nothing is lost or applied twice, and ingest
        pauses for the child's start (admin deletions are rare; delete events on the
        topic reach both maps in order and need none of this)."""
        if self._factory is None or not getattr(self.source, "maps_ids", False):
            return
        old, self.source = self.source, None
        try:
            if old is not None:
                old.close()
            self.source = self._open_source(self._factory)
        except SourceError as e:
            self._source_failed(e, "start")
    def _changed(self, items_removed: bool = False) -> None:
        """The state changed outside training: publish soon even if no event trains."""
        self.publisher.touch(items_removed)
        if self._unpublished_since is None:
            self._unpublished_since = time.monotonic()

    def _maybe_expire(self) -> None:
        """A retention sweep when the newest event time has moved on by EXPIRE_EVERY of
        retention_s since the last one."""
        keep_s = self.settings.retention_s
        if keep_s is None or self._newest_ts is None:
            return
        if self._expired_at is not None and (
                self._newest_ts - self._expired_at < keep_s * EXPIRE_EVERY):
            return
        self._expired_at = self._newest_ts
        start = time.perf_counter()
        dropped = self.trainer.store.expire(self._newest_ts - keep_s)
        m = self.metrics.engine
        m.expired.inc(dropped)
        m.expire_seconds.observe(time.perf_counter() - start)
        if dropped:
            self._changed()

    def _count(self, stats: StepStats) -> None:
        m = self.metrics.engine
        self.counters.trained += stats.fresh
        m.trained.inc(stats.fresh)
        m.replayed.inc(stats.replayed)
        m.train_samples.inc(stats.samples)
        m.train_steps.inc()
        self._last_loss = stats.loss
        if self.trainer.steps % 20 == 0:
            m.loss.set(float(stats.loss))  # a device sync, so not every step
            self._check_finite()

    def _check_finite(self) -> bool:
        """Whether training is sound: the last step's loss is finite. A NaN spreads
        through the shared tower to every later loss, so the last one tells. Once not,
        training, publishing and checkpoints stop for good: the last good snapshot serves
        on and the last good checkpoint is what a restart resumes from."""
        if self.diverged:
            return False
        if self._last_loss is None or bool(torch.isfinite(self._last_loss)):
            return True
        self.diverged = (f"training diverged: non-finite loss at step {self.trainer.steps}; "
                         "serving the last good snapshot, restart to resume from the last "
                         "checkpoint (a lower lr helps)")
        self.metrics.engine.diverged.inc()
        log.error("%s", self.diverged)
        return False

    def _maybe_publish(self) -> None:
        events = self.watermark.value
        overdue = self.publisher.since_last() > 2 * self.publisher.every_s
        if not self.publisher.due(events) or (self.trainer.pending and not overdue):
            return
        if not self._check_finite():
            return
        served = self.holder.get()
        fresh = served is None or events != served.events  # new events, not replay alone
        stats = self.publisher.publish(events)
        if fresh:
            self._fresh_at = time.time()
        m = self.metrics.engine
        m.publish_seconds.observe(stats.seconds)
        m.snapshot_version.set(stats.version)
        m.snapshot_events.set(events)
        if self._unpublished_since is not None and events == self.counters.consumed:
            m.freshness.observe(time.monotonic() - self._unpublished_since)
            self._unpublished_since = None
        snap = self.holder.get()
        if snap is not None:
            m.index_items.set(snap.index.size)
            if self.exporter is not None:
                self.exporter.offer(snap, self.status())
        if stats.version == 1:
            log.info("first snapshot published: ready")
        for listener in self.on_publish:
            listener(stats.version)

    # ---- durability --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Write a checkpoint of the state and the offsets it covers; then commit them.
        (A trainer of a group checkpoints at the group's exchanges only: _group_checkpoint.)"""
        if self.group is not None or not self._checkpoint_dir or (
                self.positions == self._checkpointed and not self._dirty):
            return
        if self._save():
            self._commit()

    def _save(self, group: dict[str, int] | None = None) -> bool:
        """Write the checkpoint; whether it was written."""
        assert self._checkpoint_dir
        if not self._check_finite():
            return False  # never over a good checkpoint with a broken model
        if self.source is None:
            return False  # its dead letters may be unwritten: checkpoint once a source is back
        start = time.perf_counter()
        try:
            self.source.flush()  # dead letters first: a checkpoint must not cover unwritten ones
        except SourceError as e:
            self._source_failed(e, "flush")
            return False
        counters = {"consumed": self.counters.consumed, "rejected": self.counters.rejected,
                    "trained": self.counters.trained}
        # A trainer of a group prunes only once every trainer has written (_group_checkpoint):
        # pruning here could remove the epoch the group's manifest names.
        checkpoint.save(self._checkpoint_dir, self.trainer, self.positions, counters,
                        keep=self.settings.checkpoint_keep if group is None else None,
                        catalogue=self.catalogue, group=group, partitions=self.user_partitions)
        self._checkpointed, self._dirty = dict(self.positions), False
        self.metrics.engine.checkpoint_seconds.observe(time.perf_counter() - start)
        return True

    def _commit(self) -> None:
        if self.source is None:
            return
        try:
            self.source.commit(self.positions)
        except SourceError as e:  # the checkpoint holds the truth; a commit is a courtesy
            log.warning("could not commit offsets at %s: %s", _offsets(self.positions), e)

    def close(self, final_checkpoint: bool = True) -> None:
        """Stop the evaluator, checkpoint (a clean restart then replays nothing), and
        close the publisher and the source."""
        self.evaluator.stop()
        try:
            if final_checkpoint:
                self.checkpoint()  # a group's last one was taken at its stopping exchange
        finally:
            if self.group is not None:
                self.group.close()
            self.publisher.close()
            if self.exporter is not None:
                self.exporter.close()
            if self.source is not None:
                self.source.close()

    # ---- what serving and monitoring read ------------------------------------------------------

    def status(self) -> Status:
        snap = self.holder.get()
        c = self.counters
        return Status(
            events_consumed=c.consumed, events_rejected=c.rejected, events_trained=c.trained,
            consumer_lag=c.lag, users=self.trainer.user_ids.live,
            items=self.trainer.item_ids.live, interactions=len(self.trainer.store),
            model_version=0 if snap is None else snap.version,
            snapshot_events=0 if snap is None else snap.events,
            snapshot_age_seconds=0.0 if snap is None else round(snap.age(), 3),
            ingest="ok" if self.health.up and not self.blocked and not self.diverged
            else "degraded",
            ingest_reason=self._ingest_reason(),
            # A trainer of a group reports its own rank: which part of the group this is.
            ranks=() if self.group is None else (RankStatus(
                self.group.rank, 0 if snap is None else snap.version,
                0 if snap is None else snap.events,
                0.0 if snap is None else round(snap.age(), 3)),))

    def _ingest_reason(self) -> str:
        """Why ingest is degraded: the source down, training diverged, partitions
        blocked ("" when none)."""
        reasons = [] if self.health.up else [self.health.reason]
        reasons += [self.diverged] if self.diverged else []
        reasons += [f"{t}[{p}] blocked at offset {b.offset}: {b.reason}: {b.detail}"
                    for (t, p), b in sorted(self.blocked.items())]
        return "; ".join(reasons)

    def _gauges(self) -> None:
        m, store = self.metrics.engine, self.trainer.store
        if self.source is not None:
            try:
                self.counters.lag = self.source.lag()
            except SourceError as e:
                self._source_failed(e, "lag")
        m.interactions.set(len(store))
        m.users.set(self.trainer.user_ids.live)
        m.items.set(self.trainer.item_ids.live)
        m.holdouts.set(len(store.holdout().users))
        m.store_bytes.set(store.nbytes())
        sampler = self.trainer.sampler
        m.negatives.inc(sampler.drawn - self._drawn[0])
        m.negatives_rejected.inc(sampler.rejected - self._drawn[1])
        self._drawn = (sampler.drawn, sampler.rejected)
        if self.trainer.device_step is not None:  # a device read, so here and not per step
            short, _ = self.trainer.negative_shortfall()
            m.negatives_short.inc(short - self._short)
            self._short = short
            m.device_mirror_bytes.set(self.trainer.device_step.nbytes())
        snap = self.holder.get()
        if snap is not None:
            m.snapshot_age.set(snap.age())
        for k, v in self.online.rates().items():
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
        dt = now - last.t if last is not None else None
        sample = Sample(
            t=now, events_consumed=status.events_consumed,
            events_per_s=None if last is None or not dt
            else (status.events_consumed - last.events_consumed) / dt,
            requests_per_s=None if last is None or not dt
            else (window.count - self._last_query_count) / dt,
            latency_p50_ms=p50, latency_p99_ms=p99,
            hr10_sampled=report.sampled.hr[10] if report else None,
            hr10_full=report.full.hr[10] if report and report.full else None,
            eval_users=report.users if report else None,
            eval_users_full=report.users_full if report and report.full else None,
            candidate_recall=report.candidate_recall if report else None,
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
        if report.candidate_recall is not None:
            m.candidate_recall.set(report.candidate_recall)
