"""Each user's most recent trained items: the model's history input.

NeuMF as published knows a user only through one embedding row, learnt from
all of the user's history at once, oldest and newest alike. A user's next
interaction is better predicted by what they did last: on the validation
split of ml-latest-small, EASE scored from a user's recent items with
exponentially decaying weights (bench/quality.py's ``ease_recent``) reached
full-catalogue NDCG@10 0.069 against 0.046 from the whole history. So the model
adds to the user row a decayed mean of *context* embeddings of the user's
``length`` most recent items (FISM / SVD++ style; :meth:`ncf_stream.model.NeuMF.user_rows`).

**Each positive sees only what came before it** (``Trainer._history``): the
items here with an event time up to its own, itself excluded. Trained with the
user's latest items as context instead, whatever the positive's time, the input
gained nothing (validation full NDCG@10 0.026 with and without it, 3 seeds); with
the history that preceded each positive, 0.042-0.044. A replayed positive older
than everything kept here gets no history and trains its user row alone.

Only trained interactions enter: the store's hold-out is never here (a
released hold-out enters when it is released, with its own time). "Recent"
is by event time in whole seconds, as the store keeps it, ties going to the later
arrival, as the store's hold-out is chosen; a repeated item moves to the front
instead of appearing twice.

**Memory:** 12 bytes per user and slot (int32 item, float64 time): 240 bytes per
user at length 20; a snapshot copies the items (80 bytes per user).
"""

from __future__ import annotations

import numpy as np

from ncf_stream.store import pair_keys


class RecentItems:
    """(users, length) item rows, newest first, -1 where a user has fewer items."""

    def __init__(self, length: int, capacity: int = 1024) -> None:
        if length < 1:
            raise ValueError("length must be >= 1")
        self.length = length
        self.items = np.full((capacity, length), -1, dtype=np.int32)
        self.ts = np.full((capacity, length), -np.inf, dtype=np.float64)
        self.n_users = 0

    def ensure(self, n_users: int) -> None:
        """Rows for users [0, n_users); capacity doubles, so growth is amortised."""
        if n_users > len(self.items):
            capacity = len(self.items)
            while capacity < n_users:
                capacity *= 2
            for name, fill in (("items", -1), ("ts", -np.inf)):
                old = getattr(self, name)
                grown = np.full((capacity, self.length), fill, dtype=old.dtype)
                grown[: len(old)] = old
                setattr(self, name, grown)
        self.n_users = max(self.n_users, n_users)

    def add(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> None:
        """Trained (user, item, time) in arrival order: each user's rows keep the
        ``length`` newest distinct items."""
        users = np.asarray(users, dtype=np.int64)
        if len(users) == 0:
            return
        self.ensure(int(users.max()) + 1)
        touched = np.unique(users)
        old_items = self.items[touched]  # (T, L)
        valid = old_items >= 0
        rows = np.repeat(np.arange(len(touched)), self.length)[valid.ravel()]
        # Candidates: the kept items, then the new ones; later arrival = larger seq.
        cand_row = np.concatenate([rows, np.searchsorted(touched, users)])
        cand_item = np.concatenate([old_items[valid].astype(np.int64), np.asarray(items)])
        # Whole seconds, as the store keeps them: a replayed positive's time comes from
        # the store, and what came before it is decided by comparing the two.
        cand_ts = np.concatenate([self.ts[touched][valid], np.round(np.asarray(ts, np.float64))])
        kept_seq = -np.tile(np.arange(self.length), len(touched))[valid.ravel()]
        cand_seq = np.concatenate([kept_seq, np.arange(1, len(users) + 1)])
        order = np.lexsort((-cand_seq, -cand_ts, cand_row))  # per row: newest first
        row, item, t = cand_row[order], cand_item[order], cand_ts[order]
        # A repeated item keeps its newest place only (np.unique: first occurrence).
        _, first = np.unique(pair_keys(row, item), return_index=True)
        first.sort()
        row, item, t = row[first], item[first], t[first]
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        place = np.arange(len(row)) - np.repeat(starts, np.diff(np.r_[starts, len(row)]))
        keep = place < self.length
        new_items = np.full((len(touched), self.length), -1, dtype=np.int32)
        new_ts = np.full((len(touched), self.length), -np.inf)
        new_items[row[keep], place[keep]] = item[keep]
        new_ts[row[keep], place[keep]] = t[keep]
        self.items[touched] = new_items
        self.ts[touched] = new_ts

    def forget_user(self, user: int) -> None:
        if 0 <= user < self.n_users:
            self.items[user], self.ts[user] = -1, -np.inf

    def forget_item(self, item: int) -> None:
        """Remove ``item`` from every user's row, the newer ones keeping their order."""
        hit = np.flatnonzero((self.items[: self.n_users] == item).any(axis=1))
        if not len(hit):
            return
        keep = self.items[hit] != item
        order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in order
        self.items[hit] = np.take_along_axis(np.where(keep, self.items[hit], -1), order, 1)
        self.ts[hit] = np.take_along_axis(np.where(keep, self.ts[hit], -np.inf), order, 1)

    def of(self, users: np.ndarray) -> np.ndarray:
        """(len(users), length) int64 item rows, newest first, -1 padding."""
        return self.items[np.asarray(users, dtype=np.int64)].astype(np.int64)

    def copy(self) -> RecentItems:
        out = RecentItems.__new__(RecentItems)
        out.length, out.n_users = self.length, self.n_users
        out.items = self.items[: self.n_users].copy()
        out.ts = self.ts[:0].copy()  # readers never add
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"recent_items": self.items[: self.n_users], "recent_ts": self.ts[: self.n_users]}

    @classmethod
    def from_arrays(cls, items: np.ndarray, ts: np.ndarray) -> RecentItems:
        out = cls(items.shape[1], max(1, len(items)))
        out.ensure(len(items))
        out.items[: len(items)] = items
        if len(ts):  # a reader's copy keeps no times (copy): its rows stay -inf
            out.ts[: len(items)] = ts
        return out


def bag_offsets(valid: np.ndarray) -> np.ndarray:
    """``F.embedding_bag`` offsets of each row's valid entries, the rows laid end to end."""
    return np.r_[0, np.cumsum(valid.sum(1))[:-1]].astype(np.int64)
