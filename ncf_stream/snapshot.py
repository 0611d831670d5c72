"""Immutable snapshots for readers, published by one atomic reference swap.

Serving and evaluation read snapshots only, never the live model: training
never waits for a request and a request never sees half an update. A snapshot
holds a frozen copy of the weights, a candidate index over its item vectors,
an immutable view of the store (seen pairs, hold-outs, popularity), the rows
of the items marked unavailable (:mod:`ncf_stream.catalogue`), the id maps
bounded by the rows that existed when it was taken, a version and the number
of consumed events it includes.

The publisher runs on the training thread between steps (so the copy is never
torn) every ``every_s`` seconds or ``every_events`` events. A flat index is
rebuilt with every snapshot (a copy of the item vectors); an IVF index is
refreshed in the background every ``index_refresh_s`` and reused until the
new one is ready, so publishing never pays for a full IVF build.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from ncf_stream.catalogue import Catalogue
from ncf_stream.faults import crash_point
from ncf_stream.ids import IdMap
from ncf_stream.model import NeuMF
from ncf_stream.retrieval import CandidateIndex, IndexConfig
from ncf_stream.settings import default
from ncf_stream.store import StoreView
from ncf_stream.trainer import Trainer

log = logging.getLogger(__name__)

# Cold-start answers come from the most popular items, /v1/popular from the most
# recently popular: each list keeps this many (the default max_k).
POPULAR_KEPT = 1000


@dataclass(frozen=True)
class Snapshot:
    version: int
    published_at: float  # wall clock (time.time())
    events: int  # consumed events whose effect this snapshot includes
    model: NeuMF  # frozen copy, eval mode
    index: CandidateIndex  # may lag the weights by up to one index refresh
    index_version: int  # the snapshot version whose item vectors the index holds
    a_ref: torch.Tensor  # the index's linearization point (NeuMF.retrieval_items)
    store: StoreView
    user_ids: IdMap  # live maps; rows >= n_users / n_items did not exist yet
    item_ids: IdMap
    popular: np.ndarray  # item rows, most popular first (unavailable ones left out)
    popularity: np.ndarray  # their share of all interactions
    # Sorted rows of the items marked unavailable, and of deleted items: never recommended.
    unavailable: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # The most interacted-with available items over the recent window, and their counts.
    recent: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    recent_counts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    popular_window_s: float = 0.0

    @property
    def n_users(self) -> int:
        return self.model.n_users

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def user_row(self, user_id: str) -> int | None:
        row = int(self.user_ids.rows([user_id], add=False)[0])
        return row if 0 <= row < self.n_users else None

    def item_rows(self, item_ids: list[str]) -> np.ndarray:
        """Rows of the given items; -1 where the snapshot does not know the item."""
        rows = self.item_ids.rows(item_ids, add=False)
        return np.where(rows < self.n_items, rows, -1)

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.published_at


class SnapshotHolder:
    """The current snapshot; swapping a reference is atomic, so readers need no lock."""

    def __init__(self) -> None:
        self._current: Snapshot | None = None
        self._published = threading.Event()

    def get(self) -> Snapshot | None:
        return self._current

    def set(self, snapshot: Snapshot) -> None:
        self._current = snapshot
        self._published.set()

    def wait(self, timeout: float | None = None) -> Snapshot | None:
        self._published.wait(timeout)
        return self._current


@dataclass(frozen=True)
class PublishStats:
    version: int
    seconds: float
    index_rebuilt: bool


class Publisher:
    def __init__(self, trainer: Trainer, holder: SnapshotHolder,
                 index_config: IndexConfig | None = None,
                 every_s: float = default("publish_every_s"),
                 every_events: int = default("publish_every_events"),
                 index_refresh_s: float = default("index_refresh_s"),
                 catalogue: Catalogue | None = None) -> None:
        self.trainer, self.holder = trainer, holder
        self.catalogue = catalogue or Catalogue()
        self.index_config = index_config or IndexConfig()
        self.every_s, self.every_events = every_s, every_events
        self.index_refresh_s = index_refresh_s
        self.version = 0
        self._last_time = 0.0
        self._last_events = 0
        self._last_steps = 0
        self._touched = False  # the state changed outside training (a deletion, retention)
        self._index: CandidateIndex | None = None
        self._a_ref: torch.Tensor | None = None
        self._index_version = 0
        self._index_time = 0.0
        self._building: Future[tuple[CandidateIndex, torch.Tensor]] | None = None
        self._building_version = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ncf-index")

    def due(self, events: int, now: float | None = None) -> bool:
        """Time or volume says publish, and the model changed since the last snapshot
        (replay steps change it too, so an idle stream still gets fresher snapshots)."""
        if self.trainer.model.n_items == 0 or self.trainer.model.n_users == 0:
            return False  # nothing to serve yet: /readyz stays 503
        if self.version == 0:
            return True
        now = time.monotonic() if now is None else now
        changed = (events != self._last_events or self.trainer.steps != self._last_steps
                   or self._touched)
        return changed and (now - self._last_time >= self.every_s
                            or events - self._last_events >= self.every_events)

    def touch(self, items_removed: bool = False) -> None:
        """The state changed outside training: the next publish is due on time alone.
        ``items_removed``: items were deleted, so an IVF index (which the publisher
        reuses between refreshes) is rebuilt from the next snapshot at once; until it
        is ready the old one serves, its copies of their vectors hidden from answers."""
        self._touched = True
        if items_removed:
            self._index_time = -float("inf")

    def since_last(self) -> float:
        """Seconds since the last publish."""
        return time.monotonic() - self._last_time

    def publish(self, events: int) -> PublishStats:
        """Take a snapshot now (on the training thread, between steps) and swap it in."""
        start = time.perf_counter()
        live = self.trainer.model
        model = live.frozen_copy(item_hidden=live.n_items <= self.index_config.exact_items)
        self.version += 1
        rebuilt = self._refresh_index(model)
        assert self._index is not None and self._a_ref is not None
        unavailable = self.catalogue.availability.rows(self.trainer.item_ids, model.n_items)
        dead = self.trainer.store.dead_items()
        if len(dead):  # deleted items' rows (tombstones) are hidden like unavailable ones
            unavailable = np.union1d(unavailable, dead[dead < model.n_items])
        counts = self.trainer.store.item_counts()
        popular = np.argsort(-counts, kind="stable")
        if len(unavailable):
            popular = popular[~np.isin(popular, unavailable)]
        popular = popular[:POPULAR_KEPT]
        total = max(int(counts.sum()), 1)
        recent = self.catalogue.recent
        recent_rows, recent_counts = recent.top(model.n_items, unavailable, POPULAR_KEPT)
        snapshot = Snapshot(
            version=self.version, published_at=time.time(), events=events, model=model,
            index=self._index, index_version=self._index_version, a_ref=self._a_ref,
            store=self.trainer.store.view(), user_ids=self.trainer.user_ids,
            item_ids=self.trainer.item_ids, popular=popular, popularity=counts[popular] / total,
            unavailable=unavailable, recent=recent_rows, recent_counts=recent_counts,
            popular_window_s=recent.window_s,
        )
        crash_point("publish")
        self.holder.set(snapshot)
        self._last_time, self._last_events = time.monotonic(), events
        self._last_steps, self._touched = self.trainer.steps, False
        return PublishStats(self.version, time.perf_counter() - start, rebuilt)

    def _refresh_index(self, model: NeuMF) -> bool:
        if self._building is not None and self._building.done():
            (self._index, self._a_ref), self._index_version = (self._building.result(),
                                                              self._building_version)
            self._building = None
        flat = model.n_items < self.index_config.ivf_threshold
        if flat or self._index is None:
            # Flat: a copy, cheap enough for every snapshot. The first IVF build is
            # synchronous: there is nothing older to serve from.
            self._index, self._a_ref = _build_index(model, self.index_config, self._quantizer())
            self._index_version, self._index_time = self.version, time.monotonic()
            return True
        stale = time.monotonic() - self._index_time >= self.index_refresh_s
        if stale and self._building is None:
            self._building = self._pool.submit(_build_index, model, self.index_config,
                                               self._quantizer())
            self._building_version, self._index_time = self.version, time.monotonic()
        return False

    def _quantizer(self) -> faiss.Index | None:
        return getattr(self._index, "quantizer", None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _build_index(model: NeuMF, config: IndexConfig,
                 quantizer: faiss.Index | None) -> tuple[CandidateIndex, torch.Tensor]:
    vectors, a_ref = model.retrieval_items()
    return CandidateIndex(vectors.detach().cpu().numpy(), config, quantizer), a_ref
