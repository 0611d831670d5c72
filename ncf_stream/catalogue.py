"""Item state the stream sets for serving, beside the interactions: availability.

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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ncf_stream.events import Availability
from ncf_stream.ids import IdMap


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


class Catalogue:
    """The stream's item state for serving; checkpointed as one file of plain arrays."""

    def __init__(self, availability: ItemAvailability | None = None) -> None:
        self.availability = availability or ItemAvailability()

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.availability.arrays())  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Catalogue:
        with np.load(path, allow_pickle=False) as z:
            return cls(ItemAvailability.from_arrays(z))
