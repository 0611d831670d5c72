"""The live interaction store: who touched what, popularity, and the rolling hold-out.

An interaction is a distinct (user row, item row) pair; a repeat keeps the
latest timestamp and is counted as a repeat. Pairs live in a :class:`KeySet`
as ``user << 32 | item`` keys, so a user's items are one contiguous key range.

**Rolling hold-out.** For every user marked as evaluated (the trainer marks
``holdout_fraction`` of users by a hash of their id: :func:`evaluated_users`) with at
least ``min_history`` interactions, the newest interaction (largest ts, ties broken
by arrival) is held out: it is never handed to training while it is the newest. When a newer
one arrives, the previous one is released to training and the new one is held
out. A late event older than the hold-out goes straight to training. One edge
is unavoidable online: when a user reaches ``min_history`` through a late
event, the newest is an interaction that was already trained on (it arrived
while the user had too little history to hold anything out).

**Forgetting and retention.** :meth:`InteractionStore.forget_user` and
:meth:`~InteractionStore.forget_item` remove every pair of a deleted user or
item; :meth:`~InteractionStore.expire` removes the pairs whose last event is
older than a cutoff (the ``retention_s`` setting). A user whose hold-out is
removed with the pair has **no hold-out until their next event**, which becomes
it: their next newest was trained on already, so holding it out would score the
model on what it learnt from. A deleted item's row is marked dead, so negatives
are never drawn from it.

**Memory** (1M users, 200k items, 100M interactions): 12 bytes per
interaction in the key set, 1-2 for its filter, 28 per user and 8 per item.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ncf_stream.keyset import KeySet, KeyView, mix64
from ncf_stream.settings import check, default

ITEM_BITS = 32
ITEM_MASK = (1 << ITEM_BITS) - 1
_I32 = np.iinfo(np.int32)


def evaluated_users(ids: Sequence[str], fraction: float) -> np.ndarray:
    """Whether each user id has a hold-out: ``fraction`` of ids, by a hash of the id
    (CRC-32, mixed), so the same users on every run and every machine."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    crc = np.fromiter((zlib.crc32(i.encode()) for i in ids), dtype=np.uint64, count=len(ids))
    return mix64(crc) < np.uint64(fraction * 2.0**64)


def pair_keys(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    return (np.asarray(users, dtype=np.int64) << ITEM_BITS) | np.asarray(items, dtype=np.int64)


def split_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return keys >> ITEM_BITS, keys & ITEM_MASK


@dataclass(frozen=True)
class AppendResult:
    """What an append hands to training, and what it did to the store."""

    train_users: np.ndarray  # (m,) int64: fresh positives in arrival order, then released hold-outs
    train_items: np.ndarray  # (m,) int64
    train_ts: np.ndarray  # (m,) float64: each one's event time
    new: int  # distinct interactions added
    repeats: int  # events whose (user, item) was already stored or repeated in the batch
    released: int  # earlier hold-outs released to training by a newer event
    held_out: int  # events withheld because they are (now) their user's hold-out


@dataclass(frozen=True)
class HoldOut:
    """The current hold-out of every eligible user, as arrays."""

    users: np.ndarray  # (h,) int64
    items: np.ndarray  # (h,) int64
    ts: np.ndarray  # (h,) float64
    seq: np.ndarray  # (h,) int64 arrival number: changes exactly when the hold-out changes


@dataclass(frozen=True)
class StoreView:
    """An immutable view for readers (snapshots): seen pairs, popularity, hold-outs."""

    keys: KeyView
    n_users: int
    n_items: int
    item_counts: np.ndarray  # (n_items,) int64
    holdout: HoldOut
    t0: float = 0.0  # the origin of the stored timestamps (whole seconds after it)
    # Sorted rows of deleted items (tombstones): never an evaluation negative.
    dead: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self.keys.contains(pair_keys(users, items))

    def seen_csr(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _seen_csr(self.keys, users)

    def seen(self, user: int) -> np.ndarray:
        """One user's item rows, sorted: a few calls per level, for the request path."""
        return _seen(self.keys, user)

    def newest_first(self, user: int) -> tuple[np.ndarray, np.ndarray]:
        """One user's (item rows, last event times), newest first, ties by row.

        The items are the view's; a time may be later than the view when the user
        repeated the item since (payloads grow in place: copying them per snapshot
        would cost 4 bytes per interaction)."""
        keys, rel = self.keys.range_values(user << ITEM_BITS, (user + 1) << ITEM_BITS)
        order = np.argsort(-rel.astype(np.int64), kind="stable")  # keys sorted: ties by row
        return keys[order] & ITEM_MASK, rel[order].astype(np.float64) + self.t0

    # Plain arrays in one .npz, like InteractionStore.save: nothing executes on load.
    def save(self, path: str | Path) -> None:
        keys, vals = self.keys.arrays()
        ho = self.holdout
        np.savez(path, keys=keys, vals=vals, item_counts=self.item_counts, dead=self.dead,
                 holdout_users=ho.users, holdout_items=ho.items, holdout_ts=ho.ts,
                 holdout_seq=ho.seq, shape=np.array([self.n_users, self.n_items]),
                 t0=np.array([self.t0]))

    @classmethod
    def load(cls, path: str | Path) -> StoreView:
        """A view equal to the saved one for every query (its keys in one level)."""
        with np.load(path, allow_pickle=False) as z:
            n_users, n_items = z["shape"].tolist()
            holdout = HoldOut(z["holdout_users"], z["holdout_items"], z["holdout_ts"],
                              z["holdout_seq"])
            return cls(KeySet.from_arrays(z["keys"], z["vals"]).view(), n_users, n_items,
                       z["item_counts"], holdout, float(z["t0"][0]), z["dead"])


class _Growable:
    """Per-row arrays that grow by doubling, so growth never reallocates per event."""

    def __init__(self, **columns: tuple[np.dtype, object]) -> None:
        self._spec = columns
        self.capacity = 0
        self.cols: dict[str, np.ndarray] = {
            name: np.empty(0, dtype=dtype) for name, (dtype, _) in columns.items()
        }

    def ensure(self, n: int) -> None:
        if n <= self.capacity:
            return
        cap = max(n, 2 * self.capacity, 1024)
        for name, (dtype, fill) in self._spec.items():
            grown = np.full(cap, fill, dtype=dtype)
            grown[: self.capacity] = self.cols[name]
            self.cols[name] = grown
        self.capacity = cap

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]


class InteractionStore:
    def __init__(self, min_history: int = default("min_history")) -> None:
        check("min_history", min_history, "InteractionStore.min_history")
        self.min_history = min_history
        # A user without the mark never has a hold-out; unmarked rows count as marked, so
        # a store used alone (and a checkpoint from before the mark) holds every user out.
        self._pairs = KeySet()  # payload: ts as int32 seconds since _t0
        self._users = _Growable(
            count=(np.dtype(np.int32), 0),
            newest_item=(np.dtype(np.int64), -1),
            newest_ts=(np.dtype(np.float64), -np.inf),
            newest_seq=(np.dtype(np.int64), -1),
            evaluated=(np.dtype(np.bool_), True),
        )
        self._items = _Growable(count=(np.dtype(np.int64), 0), dead=(np.dtype(np.bool_), False))
        self.n_users = 0
        self.n_items = 0
        self.events = 0  # events appended, repeats included: the arrival counter
        self.repeats = 0
        self.removed = 0  # pairs removed (deletions, retention): caches keyed on changes
        self._t0: float | None = None

    def __len__(self) -> int:
        return len(self._pairs)

    # ---- appending -----------------------------------------------------------------------

    def append(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> AppendResult:
        """Add a batch in arrival order; returns the positives to train on now."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.float64)
        if not (len(users) == len(items) == len(ts)):
            raise ValueError("users, items and ts must have the same length")
        if len(users) == 0:
            empty = np.empty(0, dtype=np.int64)
            return AppendResult(empty, empty, np.empty(0), 0, 0, 0, 0)
        if users.min() < 0 or items.min() < 0 or items.max() > ITEM_MASK:
            raise ValueError("user and item rows must be >= 0 (and items < 2**32)")
        if self._t0 is None:
            self._t0 = float(np.floor(ts.min()))
        self._grow(int(users.max()) + 1, int(items.max()) + 1)
        seq = self.events + np.arange(len(users), dtype=np.int64)
        self.events += len(users)

        last = _newest_per_user(users, ts)
        count_before = self._users["count"][users[last]]
        new = self._add_pairs(users, items, ts)
        self.repeats += len(users) - new
        return self._roll_holdouts(users, items, ts, seq, last, count_before, new)

    def mark_evaluated(self, users: np.ndarray, evaluated: np.ndarray) -> None:
        """Whether each of these (new) users has a hold-out; before their first event."""
        users = np.asarray(users, dtype=np.int64)
        if len(users):
            self._users.ensure(int(users.max()) + 1)
            self._users["evaluated"][users] = evaluated

    def _has_holdout(self, users: np.ndarray, count: np.ndarray) -> np.ndarray:
        # newest_item < 0: the hold-out was forgotten or expired; none until the next event
        u = self._users
        return (count >= self.min_history) & u["evaluated"][users] & (u["newest_item"][users] >= 0)

    def _grow(self, n_users: int, n_items: int) -> None:
        self._users.ensure(n_users)
        self._items.ensure(n_items)
        self.n_users = max(self.n_users, n_users)
        self.n_items = max(self.n_items, n_items)

    def _rel_ts(self, ts: np.ndarray) -> np.ndarray:
        assert self._t0 is not None
        return np.clip(np.round(ts - self._t0), _I32.min, _I32.max).astype(np.int32)

    def _add_pairs(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> int:
        keys = pair_keys(users, items)
        order = np.argsort(keys)
        k = keys[order]
        starts = _run_starts(k)
        ukeys, uts = k[starts], np.maximum.reduceat(ts[order], starts)
        fresh = ukeys[self._pairs.upsert_max(ukeys, self._rel_ts(uts))]
        fu, fi = split_keys(fresh)
        if len(fresh) == 0:
            return 0
        # Fresh keys are sorted, so their users come in runs.
        starts = _run_starts(fu)
        self._users["count"][fu[starts]] += np.diff(np.r_[starts, len(fu)]).astype(np.int32)
        item, times = np.unique(fi, return_counts=True)  # 5x faster than np.add.at
        self._items["count"][item] += times.astype(np.int32)
        return len(fresh)

    def _roll_holdouts(
        self, users: np.ndarray, items: np.ndarray, ts: np.ndarray, seq: np.ndarray,
        last: np.ndarray, count_before: np.ndarray, new: int,
    ) -> AppendResult:
        u = self._users
        bu = users[last]  # sorted unique users, aligned with count_before
        # Batch events arrive after everything stored, so a tie in ts goes to them.
        newer = ts[last] >= u["newest_ts"][bu]
        old_item, old_ts = u["newest_item"][bu], u["newest_ts"][bu]
        was_active = self._has_holdout(bu, count_before)
        released = was_active & newer & (items[last] != old_item)

        nu = bu[newer]
        u["newest_item"][nu] = items[last][newer]
        u["newest_ts"][nu] = ts[last][newer]
        u["newest_seq"][nu] = seq[last][newer]

        active = self._has_holdout(users, u["count"][users])
        held = active & (items == u["newest_item"][users])
        train_u = np.concatenate([users[~held], bu[released]])
        train_i = np.concatenate([items[~held], old_item[released]])
        train_ts = np.concatenate([ts[~held], old_ts[released]])
        return AppendResult(train_u, train_i, train_ts, new, len(users) - new,
                            int(released.sum()), int(held.sum()))

    # ---- forgetting and retention -----------------------------------------------------------

    def forget_user(self, user: int) -> int:
        """Remove every pair of user row ``user``; returns how many."""
        if not 0 <= user < self.n_users:
            return 0
        gone = self._pairs.remove_where(lambda k, _: np.ones(len(k), dtype=bool),
                                        user << ITEM_BITS, (user + 1) << ITEM_BITS)
        self._removed(gone)
        return len(gone)

    def forget_item(self, item: int) -> int:
        """Remove every pair of item row ``item`` (a scan of every key), and never draw it
        as a negative again; returns how many pairs."""
        if not 0 <= item < self.n_items:
            return 0
        self._items["dead"][item] = True
        gone = self._pairs.remove_where(lambda k, _: (k & ITEM_MASK) == item)
        self._removed(gone)
        return len(gone)

    def expire(self, cutoff: float) -> int:
        """Remove the pairs whose last event time is before ``cutoff``; returns how many."""
        if self._t0 is None or len(self._pairs) == 0:
            return 0
        rel = int(np.clip(np.ceil(cutoff - self._t0), _I32.min, _I32.max))
        gone = self._pairs.remove_where(lambda _, v: v < rel)
        self._removed(gone)
        return len(gone)

    def _removed(self, keys: np.ndarray) -> None:
        """Counts and hold-outs after ``keys`` (sorted) left the pairs."""
        if len(keys) == 0:
            return
        self.removed += len(keys)
        users, items = split_keys(keys)
        starts = _run_starts(users)
        bu = users[starts]
        self._users["count"][bu] -= np.diff(np.r_[starts, len(users)]).astype(np.int32)
        item, times = np.unique(items, return_counts=True)
        self._items["count"][item] -= times
        u = self._users
        lost = bu[u["newest_item"][bu] >= 0]
        lost = lost[~self._pairs.contains(pair_keys(lost, u["newest_item"][lost]))]
        u["newest_item"][lost], u["newest_ts"][lost], u["newest_seq"][lost] = -1, -np.inf, -1

    def _user_columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Every per-user column at ``rows`` (a row past the store's: its defaults)."""
        out: dict[str, np.ndarray] = {}
        for name, (dtype, fill) in self._users._spec.items():
            column = self._users[name]
            inside = rows < len(column)
            values = np.full(len(rows), fill, dtype=dtype)
            values[inside] = column[rows[inside]]
            out[name] = values
        return out

    def is_dead(self, items: np.ndarray) -> np.ndarray:
        return self._items["dead"][items]

    def dead_items(self) -> np.ndarray:
        """Rows of deleted items, sorted."""
        return np.flatnonzero(self._items["dead"][: self.n_items])

    # ---- queries -------------------------------------------------------------------------

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return self._pairs.contains(pair_keys(users, items))

    def last_ts(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Latest timestamp of stored pairs (whole seconds)."""
        assert self._t0 is not None
        return self._pairs.get(pair_keys(users, items)).astype(np.float64) + self._t0

    def seen(self, user: int) -> np.ndarray:
        """Items the user has touched, held-out one included, sorted."""
        return _seen(self._pairs.view(), user)

    def seen_csr(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, items) of the users' seen items, each row sorted."""
        return _seen_csr(self._pairs.view(), users)

    def user_counts(self) -> np.ndarray:
        return self._users["count"][: self.n_users]

    def count_of(self, users: np.ndarray) -> np.ndarray:
        """Interactions of each user; 0 for a row the store has never seen."""
        counts = self.user_counts()
        known = users < len(counts)
        return np.where(known, counts[np.where(known, users, 0)], 0)

    def item_counts(self) -> np.ndarray:
        """Distinct users per item (popularity)."""
        return self._items["count"][: self.n_items]

    def holdout(self) -> HoldOut:
        u = self._users
        every = np.arange(self.n_users)
        rows = np.flatnonzero(self._has_holdout(every, u["count"][: self.n_users]))
        return HoldOut(rows, u["newest_item"][rows], u["newest_ts"][rows], u["newest_seq"][rows])

    def is_holdout(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        u = self._users
        return self._has_holdout(users, u["count"][users]) & (u["newest_item"][users] == items)

    def holdout_items(self, users: np.ndarray) -> np.ndarray:
        """Each user's current hold-out item row, or -1 for a user without one."""
        u = self._users
        active = self._has_holdout(users, u["count"][users])
        return np.where(active, u["newest_item"][users], -1)

    def sample_positives(
        self, rng: np.random.Generator, n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` stored interactions, uniformly, never a current hold-out (replay)."""
        if len(self._pairs) == 0:
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        # Drawn with the hold-out excluded by its place, not filtered by its value, so
        # the draws are the same whichever item a user holds out (KeySet.sample_excluding).
        return split_keys(self._pairs.sample_excluding(rng, n, ITEM_BITS, self._holdout_keys))

    def _holdout_keys(self, users: np.ndarray) -> np.ndarray:
        """Each user's hold-out key, or -1 for a user without one."""
        items = self.holdout_items(users)
        return np.where(items >= 0, pair_keys(users, np.maximum(items, 0)), -1)

    def training_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Every stored (user, item) except the current hold-outs: the offline training set."""
        keys, _ = self._pairs.arrays()
        users, items = split_keys(keys)
        keep = ~self.is_holdout(users, items)
        return users[keep], items[keep]

    def view(self) -> StoreView:
        ho = self.holdout()
        return StoreView(self._pairs.view(), self.n_users, self.n_items,
                         self.item_counts().copy(), ho, self._t0 or 0.0, self.dead_items())

    def nbytes(self) -> int:
        per_row = sum(a.nbytes for a in self._users.cols.values())
        return self._pairs.nbytes() + per_row + sum(a.nbytes for a in self._items.cols.values())

    # ---- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Plain arrays in one .npz: nothing executes on load."""
        keys, vals = self._pairs.arrays()
        n = self.n_users
        arrays: dict[str, np.ndarray] = {f"user_{k}": v[:n] for k, v in self._users.cols.items()}
        arrays |= {
            "keys": keys, "vals": vals, "item_count": self.item_counts(),
            "item_dead": self._items["dead"][: self.n_items],
            "scalars": np.array([self.min_history, n, self.n_items, self.events, self.repeats]),
            "t0": np.array([np.nan if self._t0 is None else self._t0]),
        }
        np.savez(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> InteractionStore:
        with np.load(path, allow_pickle=False) as z:
            min_history, n_users, n_items, events, repeats = z["scalars"].tolist()
            store = cls(min_history=min_history)
            store._grow(n_users, n_items)
            store._pairs = KeySet.from_arrays(z["keys"], z["vals"])
            for name in store._users.cols:
                if f"user_{name}" in z:  # else its default: a checkpoint from before it
                    store._users[name][:n_users] = z[f"user_{name}"]
            store._items["count"][:n_items] = z["item_count"]
            if "item_dead" in z:  # else none: a checkpoint from before forgetting
                store._items["dead"][:n_items] = z["item_dead"]
            store.events, store.repeats = events, repeats
            t0 = float(z["t0"][0])
            store._t0 = None if np.isnan(t0) else t0
        return store


def merge_stores(parts: Sequence[tuple[InteractionStore, np.ndarray]]) -> InteractionStore:
    """A new store holding, of each ``(store, rows)`` part, the user rows listed, renumbered:
    the first part's rows become rows ``0, 1, ...`` in the order listed, the next part's
    continue from there. Re-deals a group's users at another size
    (:mod:`ncf_stream.reshard`); one part with some of its rows is a split.

    Item rows are one numbering across the parts (a group's trainers share their item
    ids) and stay as they are. Per user everything carries over exactly: the pairs with
    their times, the count, the hold-out (item, time and arrival number) and the
    evaluated mark; a row the part's store never saw stays empty. Per item: the counts
    are recomputed over the merged users (distinct users per item), the dead items are
    the union of the parts'.

    The counters: ``events`` and ``repeats`` are the sums over the distinct stores
    (each store counted once however many parts it feeds). Merging every user of a
    group's stores gives what one store of all their events counts; a split keeps its
    whole store's. ``events`` then exceeds every kept arrival number, so a user's
    number still changes exactly when the hold-out does. ``removed`` starts at 0 (it
    keys the caches of whoever reads this store, all new). The origin of times is the
    earliest of the parts'; each part's stored times (whole seconds after its own
    origin) are moved to it unchanged. Every part must have the same ``min_history``;
    a row listed twice in one part is refused (ValueError)."""
    if not parts:
        raise ValueError("merge_stores needs at least one part")
    min_history = {store.min_history for store, _ in parts}
    if len(min_history) != 1:
        raise ValueError(f"the parts' min_history differ: {sorted(min_history)}")
    selected = [np.asarray(rows, dtype=np.int64).reshape(-1) for _, rows in parts]
    for rows in selected:
        if len(rows) and rows.min() < 0:
            raise ValueError("user rows must be >= 0")
        if len(np.unique(rows)) != len(rows):
            raise ValueError("a user row is listed twice in one part")
    stores = list({id(store): store for store, _ in parts}.values())
    origins = [store._t0 for store in stores if store._t0 is not None]
    t0 = min(origins) if origins else None
    n_users = sum(len(rows) for rows in selected)
    n_items = max(store.n_items for store in stores)

    out = InteractionStore(min_history=min_history.pop())
    out._grow(n_users, n_items)
    keys: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    base = 0
    for (store, _), rows in zip(parts, selected, strict=True):
        new = base + np.arange(len(rows))
        for name, column in store._user_columns(rows).items():
            out._users[name][new] = column
        if len(store._pairs) and len(rows):
            new_of = np.full(max(store.n_users, int(rows.max()) + 1), -1, dtype=np.int64)
            new_of[rows] = new
            k, v = store._pairs.arrays()
            users, items = split_keys(k)
            moved = new_of[users]
            keep = moved >= 0
            assert store._t0 is not None and t0 is not None  # it holds pairs
            shift = int(store._t0 - t0)  # both whole seconds
            keys.append(pair_keys(moved[keep], items[keep]))
            vals.append(np.clip(v[keep].astype(np.int64) + shift, _I32.min, _I32.max)
                        .astype(np.int32))
        base += len(rows)
    if keys:
        out._pairs = KeySet.from_arrays(np.concatenate(keys), np.concatenate(vals))
        _, items = split_keys(out._pairs.arrays()[0])
        out._items["count"][:n_items] = np.bincount(items, minlength=n_items)
    for store in stores:
        out._items["dead"][store.dead_items()] = True
    out.events = sum(store.events for store in stores)
    out.repeats = sum(store.repeats for store in stores)
    out._t0 = t0
    return out


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values."""
    return np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def _newest_per_user(users: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Batch index of each user's newest event (largest ts, then the later arrival),
    one per user, in ascending user order. Unstable sorts are 5x faster than lexsort
    here, so the tie-break is made explicit instead."""
    order = np.argsort(users)
    starts = _run_starts(users[order])
    ts_sorted = ts[order]
    lengths = np.diff(np.r_[starts, len(users)])
    at_max = ts_sorted == np.repeat(np.maximum.reduceat(ts_sorted, starts), lengths)
    return np.maximum.reduceat(np.where(at_max, order, -1), starts)


def _seen(view: KeyView, user: int) -> np.ndarray:
    return view.range(user << ITEM_BITS, (user + 1) << ITEM_BITS) & ITEM_MASK


def _seen_csr(view: KeyView, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    users = np.asarray(users, dtype=np.int64)
    rows, keys = view.ranges(users << ITEM_BITS, (users + 1) << ITEM_BITS)
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=len(users)), out=indptr[1:])
    return indptr, keys & ITEM_MASK
