"""Item state the stream sets for serving, beside the interactions: availability and
recent popularity.

Availability events (``item_unavailable`` / ``item_available``, :mod:`ncf_stream.events`)
mark items that must not be recommended for now (out of stock, withdrawn) and
back. They are not interactions: the item keeps its history, its embedding and
its place in training; only the recommendations leave it out.

The set is kept **by item id**, not by row: an event may name an item the
stream has not shown yet (a catalogue feed often runs ahead of the clicks), and
its flag then applies as soon as the item appears, with no row created for an
item that has no interaction (a row without one would be an untrained vector
served to users). The engine applies the events in stream order, checkpoints the
set with the state, and the publisher turns it into item rows in each snapshot,
which is all serving reads.

Recent popularity (``GET /v1/popular``) counts interaction events per item over
the last ``popular_window_s`` of event time, kept incrementally so a snapshot
only ranks a running total (:class:`RecentCounts`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ncf_stream.events import Availability
from ncf_stream.ids import IdMap
from ncf_stream.settings import default


class ItemAvailability:
    """The ids of the items marked unavailable, and their rows for a snapshot."""

    def __init__(self, unavailable: Iterable[str] = ()) -> None:
        self._off: set[str] = set(unavailable)
        self._cached: tuple[int, int, np.ndarray] | None = None  # (changes, n_items, rows)
        self._changes = 0

    def __len__(self) -> int:
        return len(self._off)

    def __contains__(self, item: object) -> bool:
        return item in self._off

    def apply(self, events: Availability) -> None:
        """Apply availability events in their order: the last one per item wins."""
        for item, available in zip(events.items.tolist(), events.available.tolist(),
                                   strict=True):
            if available:
                self._off.discard(item)
            else:
                self._off.add(item)
        if len(events):
            self._changes += 1

    def forget(self, item: str) -> None:
        """A deleted item leaves the set: its id is kept nowhere."""
        if item in self._off:
            self._off.discard(item)
            self._changes += 1

    def rows(self, item_ids: IdMap, n_items: int) -> np.ndarray:
        """Sorted rows below ``n_items`` of the unavailable items the map knows.

        Cached until the set changes or the catalogue grows: the publisher asks at
        every snapshot, and the set rarely changes between two."""
        if self._cached is not None and self._cached[:2] == (self._changes, n_items):
            return self._cached[2]
        rows = item_ids.rows(sorted(self._off), add=False) if self._off else np.empty(0, np.int64)
        rows = np.unique(rows[(rows >= 0) & (rows < n_items)]).astype(np.int64)
        self._cached = (self._changes, n_items, rows)
        return rows

    def ids(self) -> list[str]:
        return sorted(self._off)

    def arrays(self) -> dict[str, np.ndarray]:
        """The ids as UTF-8 bytes plus offsets, as :class:`ncf_stream.ids.IdMap` saves them."""
        encoded = [s.encode("utf-8", "surrogatepass") for s in self.ids()]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        return {"unavailable_blob": np.frombuffer(b"".join(encoded), dtype=np.uint8),
                "unavailable_offsets": offsets}

    @classmethod
    def from_arrays(cls, z: Mapping[str, np.ndarray]) -> ItemAvailability:
        blob, offsets = z["unavailable_blob"].tobytes(), z["unavailable_offsets"].tolist()
        return cls(blob[a:b].decode("utf-8", "surrogatepass")
                   for a, b in itertools.pairwise(offsets))


BUCKETS = 24  # steps per window: the window's edge is exact to 1/24 of it (an hour a day)


class RecentCounts:
    """Interaction events per item row over a sliding window of event time.

    Event time is cut into buckets of ``window_s / BUCKETS`` seconds; the window is
    the newest event's bucket and the ``BUCKETS - 1`` before it. A ring holds each
    bucket's counts per item, a running total their sum: an event costs a count, a
    bucket leaving the window one subtraction, and a snapshot ranks the total. Every
    event counts, repeats and hold-outs included (what is popular is what is being
    done). Late events still inside the window count; older ones are dropped. The
    result is the same whatever the arrival order: the events whose bucket is within
    ``BUCKETS`` of the newest bucket seen.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = float(window_s)
        self.width = self.window_s / BUCKETS
        self.head: int | None = None  # bucket number of the newest event
        # [bucket % BUCKETS, item]; int32: 96 bytes per item (96 MB at 1M items)
        self.ring = np.zeros((BUCKETS, 0), dtype=np.int32)
        self.total = np.zeros(0, dtype=np.int64)  # ring summed over buckets

    def add(self, items: np.ndarray, ts: np.ndarray) -> None:
        """Count events (item rows, event times)."""
        if not len(items):
            return
        buckets = np.floor(np.asarray(ts, dtype=np.float64) / self.width).astype(np.int64)
        self._advance(int(buckets.max()))
        assert self.head is not None
        keep = buckets > self.head - BUCKETS
        items = np.asarray(items, dtype=np.int64)[keep]
        if not len(items):
            return
        self._ensure(int(items.max()) + 1)
        width = self.ring.shape[1]
        cells, times = np.unique((buckets[keep] % BUCKETS) * width + items, return_counts=True)
        self.ring.reshape(-1)[cells] += times.astype(np.int32)  # 5x faster than np.add.at
        rows, times = np.unique(items, return_counts=True)
        self.total[rows] += times

    def forget(self, item: int) -> None:
        """A deleted item's counts to zero, in every bucket."""
        if 0 <= item < len(self.total):
            self.ring[:, item] = 0
            self.total[item] = 0

    def _advance(self, newest: int) -> None:
        """Move the window's head to bucket ``newest``, emptying the buckets it leaves."""
        if self.head is not None and newest <= self.head:
            return
        if self.head is None or newest - self.head >= BUCKETS:
            self.ring[:] = 0
            self.total[:] = 0
        else:
            for b in range(self.head + 1, newest + 1):
                slot = b % BUCKETS
                self.total -= self.ring[slot]
                self.ring[slot] = 0
        self.head = newest

    def _ensure(self, n_items: int) -> None:
        if n_items <= self.ring.shape[1]:
            return
        cap = max(n_items, 2 * self.ring.shape[1], 1024)
        ring = np.zeros((BUCKETS, cap), dtype=np.int32)
        ring[:, : self.ring.shape[1]] = self.ring
        total = np.zeros(cap, dtype=np.int64)
        total[: len(self.total)] = self.total
        self.ring, self.total = ring, total

    def top(self, n_items: int, hidden: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``keep`` item rows below ``n_items`` with the most events in the window
        (none without one), ``hidden`` rows left out: (rows, counts), most first, ties by
        row."""
        counts = self.total[:n_items].copy()
        counts[hidden[hidden < len(counts)]] = 0
        rows = np.flatnonzero(counts)
        if len(rows) > keep:  # only what reaches the keep-th count is sorted (rows stay sorted)
            kth = np.partition(counts[rows], len(rows) - keep)[len(rows) - keep]
            rows = rows[counts[rows] >= kth]
        rows = rows[np.argsort(-counts[rows], kind="stable")[:keep]]
        return rows, counts[rows]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"recent_window_s": np.array([self.window_s]),
                "recent_head": np.array([-1 if self.head is None else self.head]),
                "recent_ring": self.ring, "recent_total": self.total}

    @classmethod
    def from_arrays(cls, z: Mapping[str, np.ndarray]) -> RecentCounts:
        recent = cls(float(z["recent_window_s"][0]))
        head = int(z["recent_head"][0])
        recent.head = None if head < 0 else head
        recent.ring, recent.total = z["recent_ring"].copy(), z["recent_total"].copy()
        return recent


class Catalogue:
    """The stream's item state for serving; checkpointed as one file of plain arrays."""

    def __init__(self, availability: ItemAvailability | None = None,
                 recent: RecentCounts | None = None,
                 popular_window_s: float = default("popular_window_s")) -> None:
        self.availability = availability or ItemAvailability()
        self.recent = recent or RecentCounts(popular_window_s)

    def forget_item(self, item: str, row: int) -> None:
        """Forget a deleted item (id ``item``, row ``row``, -1 when it had none)."""
        self.availability.forget(item)
        self.recent.forget(row)

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.availability.arrays(), **self.recent.arrays())  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        with np.load(path, allow_pickle=False) as z:
            return cls(ItemAvailability.from_arrays(z),
                       RecentCounts.from_arrays(z) if "recent_ring" in z else None)
