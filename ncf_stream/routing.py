"""A serving replica over a group of trainers: one :class:`Recommender` per rank, and a
router in front of them that answers each user from the rank that owns it.

In a group (``group_size`` N) rank r exports to ``{snapshot_dir}/rank-{r}/``, a normal
export directory with its own LATEST, and owns the users of the partitions it
consumes. When ``snapshot_dir`` has no LATEST of its own, :class:`Group` looks for
``rank-<r>`` directories at every turn and watches each one it finds with a
:class:`~ncf_stream.replica.SnapshotWatcher` of its own (its own thread, holder and
Recommender over it). With a LATEST at the top it is one trainer's directory and
the replica serves it exactly as it always did: a group of one, the router handing
every call straight to its Recommender.

Ownership is what the ranks publish, not Kafka's partitioner: a user belongs to the
rank whose served snapshot knows it (has its row). A user no snapshot knows (a cold
start) and the requests without a user (anonymous sessions, similar items, popular
items) go to one fixed rank, the lowest one with a snapshot: item rows are synced
across the group, so any rank answers them, and one answers them consistently. A
user two ranks' snapshots know (its events arrived in partitions of two trainers:
events not keyed by user) is answered from the newer snapshot and counted
(``ncf_stream_replica_users_in_several_ranks_total``). A batch is split by owner,
each part answered by its owner's Recommender in one call, and put back in the
request's order. A rank with no snapshot yet owns nobody yet; the replica is ready
once every rank directory present has one.

The owner is decided on the snapshots current when the request starts and the
answer comes from the owner's snapshot current a moment later: a newer export
loaded in between still knows the user (a user leaves a rank's snapshots only when
deleted, and then its owner answers with a cold start).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ncf_stream import export
from ncf_stream.api import DEFAULT_K, DEFAULT_PAGE, Exclude, RankStatus, Status
from ncf_stream.metrics import ReplicaMetrics
from ncf_stream.recommend import (
    NO_FILTERS,
    Filters,
    KnownItems,
    NotReady,
    Popular,
    Recommendation,
    Recommender,
    Scores,
    Similar,
)
from ncf_stream.snapshot import Snapshot, SnapshotHolder

if TYPE_CHECKING:
    from ncf_stream.replica import SnapshotWatcher

log = logging.getLogger(__name__)

RANK_DIR = re.compile(r"rank-(\d+)")  # {snapshot_dir}/rank-{r}/: rank r's exports


@dataclass(frozen=True)
class Rank:
    """One trainer's exports as the replica serves them."""

    rank: int | None  # None: snapshot_dir's own exports (a single trainer)
    directory: Path
    holder: SnapshotHolder
    watcher: SnapshotWatcher
    recommender: Recommender


class Group:
    """The trainers a replica serves: ``top`` (snapshot_dir's own exports), or the rank
    directories found beside it while it has none (see the module's docstring).

    ``make`` builds a rank's :class:`Rank` (its watcher not started). A thread of its
    own looks for new rank directories every ``poll_s`` and calls ``on_ready`` with the
    group's readiness whenever it changes (the gRPC health)."""

    def __init__(self, top: Rank, make: Callable[[int, Path], Rank], poll_s: float) -> None:
        self.top, self.make, self.poll_s = top, make, poll_s
        self.ranks: tuple[Rank, ...] = ()  # by rank; replaced whole, so readers need no lock
        self.on_ready: list[Callable[[bool], None]] = []
        self._ready: bool | None = None  # as last told to on_ready (group mode only)
        self._warned = False  # both a LATEST and rank directories: said once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ncf-replica-group",
                                        daemon=True)

    # ---- discovery ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for member in self.ranks:
            member.watcher.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.discover()
            self._notify()
            self._stop.wait(self.poll_s)

    def discover(self) -> list[Rank]:
        """Watch the rank directories not watched yet (none while the top directory has
        an export of its own); returns the new ones, their watchers started."""
        if (self.top.holder.get() is not None
                or os.path.exists(self.top.directory / export.LATEST)):
            if self.ranks and not self._warned:
                self._warned = True
                log.warning("%s has an export of its own (LATEST) and rank directories: "
                            "serving its own, as a single trainer's", self.top.directory)
            return []
        try:
            with os.scandir(self.top.directory) as entries:
                found = {int(m[1]): Path(e.path) for e in entries
                         if (m := RANK_DIR.fullmatch(e.name)) and e.is_dir()}
        except OSError:  # not there yet, or unreadable: the top watcher reports it
            return []
        # A rank whose directory is gone (a group that shrank removes the ones beyond its
        # size) is dropped: its last snapshot may know users deleted since by their new
        # owner, and would otherwise go on answering them.
        gone = [member for member in self.ranks if member.rank not in found]
        for member in gone:
            member.watcher.stop()
            log.info("rank %d's exports are gone from %s: no longer served", member.rank,
                     member.directory)
        known = {member.rank for member in self.ranks}
        new = [self.make(rank, path) for rank, path in sorted(found.items())
               if rank not in known]
        for member in new:
            member.watcher.start()
            log.info("watching rank %d's exports in %s", member.rank, member.directory)
        if new or gone:
            dropped = {m.rank for m in gone}
            self.ranks = tuple(sorted((*(m for m in self.ranks if m.rank not in dropped), *new),
                                      key=lambda m: m.rank or 0))
        return new

    def _notify(self) -> None:
        if self.members()[0].rank is None:
            return  # a single trainer's: its watcher tells the first load (as it always did)
        ready = self.ready() is not None
        if ready != self._ready:
            self._ready = ready
            for listener in self.on_ready:
                listener(ready)

    # ---- what requests and status read ----------------------------------------------------

    def members(self) -> tuple[Rank, ...]:
        """Who answers: the top directory while it serves a snapshot or no rank directory
        was found, else the ranks."""
        ranks = self.ranks
        if not ranks or self.top.holder.get() is not None:
            return (self.top,)
        return ranks

    def loaded(self) -> list[tuple[Rank, Snapshot]]:
        """The members with a snapshot, by rank, each with it."""
        return [(m, snap) for m in self.members() if (snap := m.holder.get()) is not None]

    def ready(self) -> Snapshot | None:
        """The fixed rank's snapshot once every member has one (/readyz); else None."""
        snaps = [m.holder.get() for m in self.members()]
        return None if any(s is None for s in snaps) else snaps[0]

    def age(self) -> float:
        """The oldest served snapshot's age (0 while none): the replica's age gauge."""
        return max((snap.age() for _, snap in self.loaded()), default=0.0)

    def version(self) -> int:
        """The fixed rank's snapshot version (0 while none): the replica's version gauge."""
        loaded = self.loaded()
        return loaded[0][1].version if loaded else 0

    def status(self) -> Status:
        """A single trainer's: its watcher's. A group's: the trainers' counts summed (items,
        which they share, the largest), the fixed rank's version, the oldest snapshot's
        age, every rank's reasons to be degraded, and each rank's snapshot in ``ranks``."""
        members = self.members()
        if members[0].rank is None:
            return members[0].watcher.status()
        each = [(m.rank or 0, m.watcher.status(), m.holder.get()) for m in members]
        reasons = [f"rank {rank}: {st.ingest_reason}" for rank, st, _ in each
                   if st.ingest != "ok"]
        loaded = [st for _, st, snap in each if snap is not None]
        return Status(
            events_consumed=sum(st.events_consumed for _, st, _ in each),
            events_rejected=sum(st.events_rejected for _, st, _ in each),
            events_trained=sum(st.events_trained for _, st, _ in each),
            consumer_lag=sum(st.consumer_lag for _, st, _ in each),
            users=sum(st.users for _, st, _ in each),
            items=max((st.items for _, st, _ in each), default=0),
            interactions=sum(st.interactions for _, st, _ in each),
            model_version=loaded[0].model_version if loaded else 0,
            snapshot_events=sum(st.snapshot_events for st in loaded),
            snapshot_age_seconds=max((st.snapshot_age_seconds for st in loaded), default=0.0),
            ingest="degraded" if reasons else "ok", ingest_reason="; ".join(reasons),
            role="replica",
            ranks=tuple(RankStatus(rank, st.model_version, st.snapshot_events,
                                   st.snapshot_age_seconds) for rank, st, _ in each))


class Router:
    """The :class:`~ncf_stream.recommend.Serving` the replica's servers call: each call to
    the Recommender of the rank that owns its user, or of the fixed rank."""

    def __init__(self, group: Group, metrics: ReplicaMetrics) -> None:
        self.group, self.metrics = group, metrics

    @property
    def max_k(self) -> int:
        return self.group.top.recommender.max_k

    def ready(self) -> Snapshot | None:
        return self.group.ready()

    def _fixed(self) -> Recommender:
        """The fixed rank's: the lowest one with a snapshot (the only one, for one trainer)."""
        members = self.group.members()
        if len(members) == 1:
            return members[0].recommender
        loaded = self.group.loaded()
        if not loaded:
            raise NotReady("no model snapshot is published yet")
        return loaded[0][0].recommender

    def _owner(self, user: str) -> Recommender:
        members = self.group.members()
        if len(members) == 1:
            return members[0].recommender
        answer, pick = self._owners([user])
        return answer[int(pick[0])]

    def _owners(self, users: list[str]) -> tuple[list[Recommender], np.ndarray]:
        """The Recommenders that answer, and the index of each user's among them."""
        members = self.group.members()
        if len(members) == 1:
            return [members[0].recommender], np.zeros(len(users), dtype=np.int64)
        loaded = self.group.loaded()
        if not loaded:
            raise NotReady("no model snapshot is published yet")
        answer = [member.recommender for member, _ in loaded]
        pick = np.zeros(len(users), dtype=np.int64)  # 0: the fixed rank (nobody knows them)
        if len(loaded) == 1:
            return answer, pick
        known = np.stack([_knows(snap, users) for _, snap in loaded])  # (ranks, users)
        # Newest snapshot first, ties to the lower rank; assigned last so that it wins.
        order = sorted(range(len(loaded)), key=lambda i: (-loaded[i][1].published_at, i))
        for i in reversed(order):
            pick[known[i]] = i
        several = int((known.sum(axis=0) > 1).sum())
        if several:
            self.metrics.users_in_several_ranks.inc(several)
        return answer, pick

    def recommend(self, user: str, k: int = DEFAULT_K, exclude: Exclude = "seen",
                  filters: Filters = NO_FILTERS) -> Recommendation:
        return self._owner(user).recommend(user, k, exclude, filters)

    def recommend_many(self, users: list[str], k: int = DEFAULT_K, exclude: Exclude = "seen",
                       filters: Filters = NO_FILTERS) -> list[Recommendation]:
        """Each owner's users in one call to its Recommender (all from one snapshot of
        that rank), the answers put back in the request's order."""
        answer, pick = self._owners(users)
        if len(answer) == 1 or not len(pick) or (pick == pick[0]).all():
            return answer[int(pick[0]) if len(pick) else 0].recommend_many(
                users, k, exclude, filters)
        out: list[Recommendation | None] = [None] * len(users)
        for i in np.unique(pick).tolist():
            at = np.flatnonzero(pick == i).tolist()
            for j, r in zip(at, answer[i].recommend_many([users[j] for j in at], k, exclude,
                                                         filters), strict=True):
                out[j] = r
        return [r for r in out if r is not None]

    def recommend_items(self, items: list[str], k: int = DEFAULT_K, exclude: Exclude = "seen",
                        filters: Filters = NO_FILTERS) -> Recommendation:
        return self._fixed().recommend_items(items, k, exclude, filters)

    def similar(self, item: str, k: int = DEFAULT_K) -> Similar:
        return self._fixed().similar(item, k)

    def popular(self, k: int = DEFAULT_K) -> Popular:
        return self._fixed().popular(k)

    def known_items(self, user: str, offset: int = 0, limit: int = DEFAULT_PAGE) -> KnownItems:
        return self._owner(user).known_items(user, offset, limit)

    def score(self, user: str, items: list[str]) -> Scores:
        return self._owner(user).score(user, items)


def _knows(snap: Snapshot, users: list[str]) -> np.ndarray:
    """Which of ``users`` the snapshot has a row of."""
    rows = snap.user_ids.rows(users, add=False)
    return (rows >= 0) & (rows < snap.n_users)
